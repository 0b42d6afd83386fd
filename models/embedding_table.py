"""Store an ONNX graph's large embedding tables as int8 with one scale per row.

The word-embedding table of a multilingual encoder dominates its size (e5-small: 250,037 x 384
float32 = 366 MiB of a 388 MiB graph) while each query reads a few dozen rows. Symmetric int8 per
row keeps every row's error under half a step of its own scale (cosine of the served vectors
against float tables 0.9999+) and takes a quarter of the memory; onnxruntime's dynamic quantizer
only offers one scale for the whole table, which costs retrieval quality.

Each ``Gather(table, ids)`` becomes ``Gather(int8 table, ids) -> Cast -> Mul(Gather(scales, ids))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Tables smaller than this stay float: position and token-type tables are a few hundred KiB.
MIN_ROWS = 4096


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 rows, float32 scale per row) with table ~= rows * scales[:, None]."""
    peak = np.abs(table).max(axis=1)
    scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    rows = np.clip(np.rint(table / scales[:, None]), -127, 127).astype(np.int8)
    return rows, scales


def compress_embedding_tables(source: Path, target: Path) -> list[str]:
    """Rewrite ``source`` into ``target`` with per-row int8 tables; returns the tables converted."""
    model = onnx.load(str(source))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    converted = []
    nodes = []
    for node in graph.node:
        table = initializers.get(node.input[0]) if node.op_type == "Gather" else None
        if table is None or table.data_type != TensorProto.FLOAT or table.dims[0] < MIN_ROWS:
            nodes.append(node)
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if axis != 0:
            nodes.append(node)
            continue
        name, ids, out = table.name, node.input[1], node.output[0]
        rows, scales = quantize_rows(numpy_helper.to_array(table))
        graph.initializer.remove(table)
        graph.initializer.extend(
            [numpy_helper.from_array(rows, f"{name}.int8"), numpy_helper.from_array(scales, f"{name}.scale")]
        )
        nodes += [
            helper.make_node("Gather", [f"{name}.int8", ids], [f"{out}.int8"], name=f"{node.name}.int8"),
            helper.make_node("Cast", [f"{out}.int8"], [f"{out}.float"], to=TensorProto.FLOAT),
            helper.make_node("Gather", [f"{name}.scale", ids], [f"{out}.scale"], name=f"{node.name}.scale"),
            helper.make_node("Unsqueeze", [f"{out}.scale", f"{name}.axis"], [f"{out}.scale2"]),
            helper.make_node("Mul", [f"{out}.float", f"{out}.scale2"], [out], name=f"{node.name}.dequantize"),
        ]
        graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{name}.axis"))
        converted.append(name)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(target))
    return converted


def trim_vocabulary(source: Path, target: Path, keep: Sequence[int], unknown_id: int) -> int:
    """Rewrite ``source`` into ``target`` keeping only the rows ``keep`` of every word-embedding
    table the graph input ``input_ids`` indexes; any other id reads ``unknown_id``'s row.

    An LLM's vocabulary is mostly tokens a Chinese medical query never uses (EmbeddingGemma: 262,144
    rows, 805 MB in float32, 201 MB in int8; cmedqa-im's corpus and queries use 7,516 of them). Token
    ids keep their values (models.vocabulary.trim_tokenizer keeps them too): ``Gather(remap,
    input_ids)`` turns them into rows of the smaller table inside the graph. Returns the rows kept.
    """
    model = onnx.load(str(source))
    graph = model.graph
    inputs = {i.name for i in graph.input}
    initializers = {init.name: init for init in graph.initializer}
    rows = sorted({*keep, unknown_id})
    trimmed_tables = 0
    for node in graph.node:
        if node.op_type != "Gather" or node.input[1] != "input_ids" or "input_ids" not in inputs:
            continue
        table = initializers.get(node.input[0])
        if table is None:
            continue
        vocab = int(table.dims[0])
        if rows[-1] >= vocab:
            raise ValueError(f"token id {rows[-1]} is outside the {vocab}-row table {table.name}")
        remap = np.full(vocab, rows.index(unknown_id), dtype=np.int64)
        remap[rows] = np.arange(len(rows), dtype=np.int64)
        values = numpy_helper.to_array(table)[rows]
        graph.initializer.remove(table)
        graph.initializer.extend(
            [
                numpy_helper.from_array(values, table.name),
                numpy_helper.from_array(remap, f"{table.name}.remap"),
            ]
        )
        remapped = f"{node.output[0]}.ids"
        node.input[1] = remapped
        graph.node.insert(
            list(graph.node).index(node),
            helper.make_node(
                "Gather", [f"{table.name}.remap", "input_ids"], [remapped], name=f"{node.name}.remap"
            ),
        )
        trimmed_tables += 1
    if trimmed_tables == 0:
        raise ValueError(f"{source}: no word-embedding table indexed by input_ids")
    onnx.checker.check_model(model)
    onnx.save(model, str(target))
    return len(rows)
