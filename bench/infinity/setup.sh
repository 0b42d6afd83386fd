#!/usr/bin/env bash
# Serve the built int8 e5-small query encoder with infinity-emb for `medsearch bench service --compare`.
# Usage: bench/infinity/setup.sh [WORKDIR]   (then start with the command it prints)
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
work="${1:-$repo/var/infinity}"
models="${MEDSEARCH_MODELS_DIR:-$repo/var/models}"
mkdir -p "$work/model/1_Pooling"
# infinity's optimum engine loads a Hugging Face model folder; the graph is ours, unchanged.
ln -sf "$models/multilingual-e5-small-onnx-int8/model.onnx" "$work/model/model.onnx"
ln -sf "$models/multilingual-e5-small-onnx-int8/tokenizer.json" "$work/model/tokenizer.json"
cp "$models/multilingual-e5-small/config.json" "$work/model/config.json"
cat > "$work/model/tokenizer_config.json" <<'JSON'
{"tokenizer_class": "XLMRobertaTokenizerFast", "bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>",
 "mask_token": "<mask>", "pad_token": "<pad>", "sep_token": "</s>", "unk_token": "<unk>",
 "model_max_length": 512, "padding_side": "right"}
JSON
echo '{"word_embedding_dimension": 384, "pooling_mode_mean_tokens": true}' > "$work/model/1_Pooling/config.json"
if [ ! -x "$work/venv/bin/python" ]; then
  python3 -m venv "$work/venv"
  # optimum 1.x cannot import with torch 2.13 (torch.onnx internals moved); optimum 2.1 + optimum-onnx can.
  "$work/venv/bin/pip" install -q torch==2.13.0 -r "$repo/bench/infinity/requirements.lock.txt"
fi
cat <<EOT
start (offline, telemetry off):
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 INFINITY_ANONYMOUS_USAGE_STATS=0 \\
  $work/venv/bin/python $repo/bench/infinity/run_infinity.py v2 --model-id $work/model \\
    --served-model-name multilingual-e5-small-onnx-int8 --engine optimum --device cpu \\
    --pooling-method mean --onnx-disable-optimize --batch-size 32 --port 7997 --no-model-warmup
then: medsearch bench service --spawn --compare http://127.0.0.1:7997
EOT
