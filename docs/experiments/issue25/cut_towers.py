"""Build untrained EmbeddingGemma first-K-layer query towers (K = 2, 4, 6), exported and int8 with the
k4 recipe's int8 plan (trimmed vocabulary, float down_proj), so `medsearch bench query` can time them
beside e5-small int8 in one run.

Latency does not depend on the weights' values, only on K and the graph, so the cuts need no training:

    python docs/experiments/issue25/cut_towers.py var/models 2 4 6
    medsearch bench query --query-model multilingual-e5-small-onnx-int8 \\
        --query-model embeddinggemma-300m-first2-onnx-int8 \\
        --query-model embeddinggemma-300m-first4-onnx-int8 \\
        --query-model embeddinggemma-300m-first6-onnx-int8
"""

from __future__ import annotations

import sys
from pathlib import Path

from models.align.teacher_layers import TeacherLayersConfig, TeacherLayersTower
from models.export import export_query_encoder, quantize_int8
from models.int8_plan import INT8_PLAN_SUFFIX, load_int8_plan
from models.manifest import staged_model_dir

TEACHER = "embeddinggemma-300m"
PLAN = Path(__file__).resolve().parents[3] / "models" / "deltas" / f"{TEACHER}-k4-query{INT8_PLAN_SUFFIX}"


def main(models_dir: Path, layers: list[int]) -> None:
    for k in layers:
        name = f"{TEACHER}-first{k}"
        tower = TeacherLayersTower(models_dir / TEACHER, TeacherLayersConfig(layers=k))
        with staged_model_dir(models_dir / name) as work:
            tower.save(work, name=name, space=tower.source.space)
        export_query_encoder(models_dir / name, models_dir / f"{name}-onnx", name=f"{name}-onnx")
        plan = load_int8_plan(PLAN, models_dir / name / "tokenizer.json") if PLAN.is_file() else None
        quantize_int8(models_dir / f"{name}-onnx", models_dir / f"{name}-onnx-int8", plan=plan)


if __name__ == "__main__":
    main(Path(sys.argv[1]), [int(k) for k in sys.argv[2:]])
