"""Launcher for infinity-emb 0.0.78 (optimum engine) serving our pre-pooled ONNX e5-small.

Usage: same CLI as `infinity_emb v2 ...`, e.g.
    python run_infinity.py v2 --model-id /work/infinity/e5-small-onnx-int8 --engine optimum ...

It applies three small runtime patches before handing over to infinity's own CLI
(nothing on disk is modified; the ONNX file is loaded as-is):

1. get_onnx_files(): infinity returns the *absolute* path of the .onnx file for a local
   directory and passes it as `file_name`; optimum-onnx 0.1.0 compares `file_name` with
   the bare file name and raises FileNotFoundError. We return the path relative to the
   model directory instead (i.e. "model.onnx").
2. Our model.onnx already ends with masked mean pooling + L2 normalize and has a single
   output `embedding` [batch, 384] (no `last_hidden_state`). optimum's
   ORTModelForFeatureExtraction.forward() would KeyError on `last_hidden_state`, so when the
   session has no `last_hidden_state` output, encode_core() runs the session directly and
   returns the pooled vectors; pooling becomes identity. infinity's own normalize() is still
   applied in encode_post (idempotent on unit vectors).
3. Optional: INFINITY_ORT_INTRA_OP_THREADS / INFINITY_ORT_INTER_OP_THREADS env vars set
   onnxruntime SessionOptions threads (infinity itself passes no session options, so ORT
   defaults apply: intra_op = #physical cores, inter_op sequential).
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("INFINITY_ANONYMOUS_USAGE_STATS", "0")

import infinity_emb.transformer.embedder.optimum as inf_opt
from infinity_emb.log_handler import logger

# --- patch 1: relative onnx file name for local model dirs --------------------------
_orig_get_onnx_files = inf_opt.get_onnx_files


def _get_onnx_files(*, model_name_or_path, **kw):
    p = _orig_get_onnx_files(model_name_or_path=model_name_or_path, **kw)
    if Path(model_name_or_path).is_dir() and p.is_absolute():
        p = p.relative_to(Path(model_name_or_path))
    logger.info(f"[patch] onnx file_name passed to optimum: {p}")
    return p


inf_opt.get_onnx_files = _get_onnx_files

# --- patch 3: optional ORT thread settings ------------------------------------------
_intra = os.environ.get("INFINITY_ORT_INTRA_OP_THREADS")
_inter = os.environ.get("INFINITY_ORT_INTER_OP_THREADS")
if _intra or _inter:
    import onnxruntime as ort

    _BaseORT = inf_opt.ORTModelForFeatureExtraction

    class _ORTWithThreads(_BaseORT):  # type: ignore[misc,valid-type]
        @classmethod
        def from_pretrained(cls, *a, **kw):
            so = kw.get("session_options") or ort.SessionOptions()
            if _intra:
                so.intra_op_num_threads = int(_intra)
            if _inter:
                so.inter_op_num_threads = int(_inter)
            kw["session_options"] = so
            logger.info(f"[patch] ORT intra_op={so.intra_op_num_threads} inter_op={so.inter_op_num_threads}")
            return _BaseORT.from_pretrained(*a, **kw)

    inf_opt.ORTModelForFeatureExtraction = _ORTWithThreads

# --- patch 2: pre-pooled 'embedding' output ------------------------------------------
_Emb = inf_opt.OptimumEmbedder
_orig_init = _Emb.__init__
_orig_core = _Emb.encode_core


def _init(self, *, engine_args):
    _orig_init(self, engine_args=engine_args)
    outs = list(self.model.output_names)
    self._prepooled = "last_hidden_state" not in outs and "embedding" in outs
    if self._prepooled:
        self._ort_inputs = set(self.model.input_names)
        self.pooling = lambda emb, _mask: emb  # graph already mean-pools
        logger.info(f"[patch] ONNX outputs {outs}: pre-pooled 'embedding', inputs {sorted(self._ort_inputs)}")


def _encode_core(self, onnx_input):
    if not getattr(self, "_prepooled", False):
        return _orig_core(self, onnx_input)
    feed = {k: v for k, v in onnx_input.items() if k in self._ort_inputs}
    emb = self.model.session.run(["embedding"], feed)[0]
    return {"token_embeddings": emb, "attention_mask": onnx_input["attention_mask"]}


_Emb.__init__ = _init
_Emb.encode_core = _encode_core

if __name__ == "__main__":
    from infinity_emb.cli import cli

    sys.argv[0] = "infinity_emb"
    cli()
