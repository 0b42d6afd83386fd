"""Per-row int8 embedding tables: the rewritten graph answers like the float one, in a quarter of the size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from models.embedding_table import MIN_ROWS, compress_embedding_tables, quantize_rows


def _gather_graph(path: Path, table: np.ndarray, small: np.ndarray) -> None:
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "seq", table.shape[1]])
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["words", "ids"], ["looked_up"], name="words_gather"),
            helper.make_node("Gather", ["positions", "ids"], ["pos"], name="positions_gather"),
            helper.make_node("Add", ["looked_up", "pos"], ["out"]),
        ],
        "lookup",
        [ids],
        [out],
        initializer=[numpy_helper.from_array(table, "words"), numpy_helper.from_array(small, "positions")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _run(path: Path, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["out"], {"ids": ids})[0])


def test_large_tables_become_int8_per_row_and_answer_alike(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # Rows of very different magnitudes: one scale for the table would flatten the small ones.
    table = (rng.normal(size=(MIN_ROWS + 10, 32)) * rng.uniform(0.001, 5.0, size=(MIN_ROWS + 10, 1))).astype(
        np.float32
    )
    small = rng.normal(size=(MIN_ROWS + 10, 32)).astype(np.float32)[:100]
    source, target = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    _gather_graph(source, table, small)
    assert compress_embedding_tables(source, target) == ["words"]
    ids = rng.integers(0, 100, size=(3, 7))
    want, got = _run(source, ids), _run(target, ids)
    looked_up = table[ids]
    # Error per element within half a quantization step of its own row.
    step = np.abs(table).max(axis=1)[ids] / 127.0
    assert np.all(np.abs(got - want) <= step[..., None] / 2 + 1e-6)
    cos = np.sum(got * want, -1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.min() > 0.9999
    assert np.abs(looked_up).max() > 0  # the lookup really went through the big table
    assert target.stat().st_size < source.stat().st_size / 3
    # The small table stayed float.
    initializers = {i.name: i.data_type for i in onnx.load(str(target)).graph.initializer}
    assert initializers["positions"] == TensorProto.FLOAT and initializers["words.int8"] == TensorProto.INT8


def test_quantize_rows_keeps_zero_rows_and_the_sign() -> None:
    table = np.array([[0.0, 0.0], [1.0, -2.0], [-0.001, 0.0005]], dtype=np.float32)
    rows, scales = quantize_rows(table)
    assert rows.dtype == np.int8 and rows[0].tolist() == [0, 0]
    np.testing.assert_allclose(rows * scales[:, None], table, atol=(scales / 2)[:, None].max())
    assert rows[1].tolist() == [64, -127] and rows[2].tolist() == [-127, 64]
