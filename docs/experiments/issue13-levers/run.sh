#!/bin/bash
# One device call of the lever sweep: sweep workers in parallel on one GPU (16 CPU cores: 2 threads
# each), then the best-by-selection state copied to $OUT. `run.sh 1` and `run.sh 2` are the two calls
# made on 2026-11-30 (an H200; 437 s and 106 s of command time). Needs var/gpu/pack.npz (pack.py)
# carried to the device machine.
set -u
HERE=$(dirname "$0")
export PYTHONUNBUFFERED=1 THREADS=2
if [ "${1:-1}" = 1 ]; then
  export BUDGET_S=330 DEADLINE_S=420; LIMIT=520
  W=("recipe-300,steps-3000" "steps-1000,batch64-1000" "maxtok-128-1000,lr1e-4-1000"
     "teacher-hard30-1000" "pseudo-none-1000,pseudo-half-1000"
     "pseudo-extra-1000,embeddings-1000" "combo-3000" "steps-2000-extra")
else
  export BUDGET_S=100 DEADLINE_S=200; LIMIT=260
  W=("teacher-mask0-300" "teacher-mask0-1000" "teacher-mask-0.03-300" "dup-0.90-300" "dup-none-300"
     "kl2-300" "t0.05-300")
fi
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
for i in "${!W[@]}"; do
  mkdir -p /tmp/w$i
  ONLY="${W[$i]}" OUT=/tmp/w$i STATE_DIR=/tmp/w$i/state timeout $LIMIT python3 "$HERE/sweep.py" > /tmp/w$i/log 2>&1 &
done
wait
cat /tmp/w*/results.jsonl > "$OUT/results.jsonl" 2>/dev/null
python3 - <<'PY'
import glob, json, os, shutil
rows = [json.loads(line) for line in open(os.environ["OUT"] + "/results.jsonl")]
for r in sorted(rows, key=lambda r: -r["selection_best"]):
    print(f'{r["name"]:24s} sel {r["selection_best"]:6.2f} step {r["shipped_step"]:5d} '
          f'dev {r["dev_at_selected"]["ndcg10"]:6.2f} R@100 {r["dev_at_selected"]["recall100"]:6.2f} '
          f'last-dev {r["dev_at_last"]["ndcg10"]:6.2f} {r["seconds"]}s')
runs = [json.load(open(p)) | {"dir": os.path.dirname(p)} for p in glob.glob("/tmp/w*/state/best.json")]
best = max(runs, key=lambda r: r["selection_best"])
for f in [*glob.glob(best["dir"] + "/best-*.safetensors"), best["dir"] + "/best.json"]:
    shutil.copy(f, os.environ["OUT"])
print("best by selection:", best["name"])
PY
