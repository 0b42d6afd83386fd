from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medsearch.cli import main


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MEDSEARCH_HOME", str(tmp_path))
    return tmp_path


def test_index_reports_bad_lines_by_file_and_line_and_exits_1(
    home: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = home / "corpus.jsonl"
    good = json.dumps({"id": "a", "text": "高血压病人可以口服党参"}, ensure_ascii=False)
    corpus.write_text(f"{good}\n{{broken\n", encoding="utf-8")
    rejects = home / "rejects.jsonl"
    code = main(["index", str(corpus), "--model", str(tiny_bert), "--rejects", str(rejects)])
    captured = capsys.readouterr()
    assert code == 1
    assert f"{corpus}:2: invalid JSON" in captured.err
    assert "indexed 1, skipped 0 (unchanged), deleted 0, rejected 1" in captured.out
    assert json.loads(rejects.read_text(encoding="utf-8"))["source"] == f"{corpus}:2"
    assert "NOT switched" in captured.out
    report = json.loads(captured.out.splitlines()[-1])
    assert (report["exit_code"], report["switched"], report["rejected_samples"]) == (
        1,
        False,
        [f"{corpus}:2: invalid JSON: Expecting property name enclosed in double quotes at column 2"],
    )
    # Fixed input: a new version, validated and switched to; the same input again changes nothing.
    corpus.write_text(f"{good}\n", encoding="utf-8")
    assert main(["index", str(corpus), "--model", str(tiny_bert), "--report", str(home / "r.json")]) == 0
    first = json.loads((home / "r.json").read_text(encoding="utf-8"))
    assert (first["switched"], first["indexed"], first["validation"]["problems"]) == (True, 1, [])
    assert main(["index", str(corpus), "--model", str(tiny_bert)]) == 0
    again = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (again["collection"], again["up_to_date"], again["indexed"]) == (first["collection"], True, 0)


def test_index_declares_typed_filter_fields_and_bm25(home: Path, tiny_bert: Path) -> None:
    from store.factory import open_store

    corpus = home / "corpus.jsonl"
    row = {"id": "a", "text": "高血压", "metadata": {"dept": "心内", "year": 2020, "seen": "2024-05-01"}}
    corpus.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    args = ["--keyword-field", "dept", "--integer-field", "year", "--date-field", "seen", "--sparse", "bm25"]
    assert main(["index", str(corpus), "--model", str(tiny_bert), "--collection", "c", *args]) == 0
    store = open_store(None, home / "qdrant")
    try:
        spec = store.get_collection("c")
    finally:
        store.close()
    assert spec is not None and spec.sparse is not None
    assert (spec.keyword_fields, spec.integer_fields, spec.date_fields) == (("dept",), ("year",), ("seen",))


def test_index_names_a_missing_input_file(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["index", str(home / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_index_without_built_models_says_how_to_build_them(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = home / "c.jsonl"
    corpus.write_text('{"id": "a", "text": "x"}\n', encoding="utf-8")
    assert main(["index", str(corpus)]) == 2
    assert "medsearch models build" in capsys.readouterr().err


def test_models_build_refuses_unknown_names(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "build", "no-such-model"]) == 2
    assert "no recipe for no-such-model" in capsys.readouterr().err


def test_models_list_shows_role_and_space(
    home: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MEDSEARCH_MODELS_DIR", str(tiny_bert.parent))
    assert main(["models", "list"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("tiny-bert "))
    assert "document" in line and "tiny-bert-space" in line


def test_align_names_the_recipe_file_line_and_field(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = home / "recipe.json"
    recipe.write_text('{\n  "name": "x",\n  oops\n}\n', encoding="utf-8")
    assert main(["models", "align", "--recipe", str(recipe)]) == 2
    assert f"{recipe}:3: invalid JSON" in capsys.readouterr().err

    recipe.write_text(json.dumps({"name": "x", "query_model": "q", "document_model": "d"}), encoding="utf-8")
    assert main(["models", "align", "--recipe", str(recipe)]) == 2
    assert "field 'dataset'" in capsys.readouterr().err

    assert main(["models", "align", "--recipe", str(home / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_align_refuses_the_dev_split(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = home / "recipe.json"
    recipe.write_text(
        json.dumps(
            {"name": "x", "query_model": "q", "document_model": "d", "dataset": str(home), "split": "dev"}
        ),
        encoding="utf-8",
    )
    assert main(["models", "align", "--recipe", str(recipe)]) == 2
    assert "held out" in capsys.readouterr().err


def test_shipped_recipes_are_valid() -> None:
    from medsearch.align_cli import DEFAULT_RECIPE
    from models.align.frozen import FrozenAlignRecipe
    from models.align.pipeline import AlignRecipe

    default = FrozenAlignRecipe.model_validate_json(DEFAULT_RECIPE.read_text(encoding="utf-8"))
    assert default.split == "train"  # never the dev split
    assert default.name == "embeddinggemma-300m-k4"  # the served query encoder's recipe
    assert default.training.stage == "query_distillation"
    issue13 = FrozenAlignRecipe.model_validate_json(
        (DEFAULT_RECIPE.parent / "care-embeddinggemma-300m.json").read_text()
    )
    assert (issue13.document_model, issue13.query_model) == ("embeddinggemma-300m", "multilingual-e5-small")
    gemma = AlignRecipe.model_validate_json(
        (DEFAULT_RECIPE.parent / "care-gemma-3-270m.json").read_text(encoding="utf-8")
    )
    assert gemma.split == "train"
    assert gemma.document_side.mode != "frozen"
    # The issue-25 towers: the same text set, teacher and stages, one student each.
    towers = {
        name: FrozenAlignRecipe.model_validate_json((DEFAULT_RECIPE.parent / f"{name}.json").read_text())
        for name in ("embeddinggemma-300m-k4", "e5-small-distilled-embeddinggemma")
    }
    k4, e5 = towers["embeddinggemma-300m-k4"], towers["e5-small-distilled-embeddinggemma"]
    assert k4.teacher_layers is not None and k4.teacher_layers.layers == 4 and k4.query_model is None
    assert e5.query_model == "multilingual-e5-small" and e5.teacher_layers is None
    for tower in (k4, e5):
        assert tower.split == "train" and tower.document_model == "embeddinggemma-300m"
        assert tower.text_set == k4.text_set and tower.stage_one is not None
    assert k4.stage_one is not None and e5.stage_one is not None
    assert (k4.stage_one.steps, k4.training.steps) == (e5.stage_one.steps, e5.training.steps)


def test_build_of_an_aligned_model_without_its_delta_says_how_to_train_it(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import models.registry as registry

    monkeypatch.setattr(registry, "DELTAS_DIR", home / "no-deltas")
    (home / "models").mkdir()
    assert main(["models", "build", "care-gemma-3-270m-query-onnx-int8"]) == 2
    err = capsys.readouterr().err
    assert "care-gemma-3-270m-query.safetensors not found" in err and "medsearch models align" in err
    assert not any((home / "models").iterdir())  # failed before building e5 or anything else


def test_build_all_skips_aligned_models_without_deltas_and_says_so(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import models.registry as registry

    aligned = {name: r for name, r in registry.RECIPES.items() if name.startswith(registry.ALIGNED)}
    assert len(aligned) == 4
    monkeypatch.setattr(registry, "RECIPES", aligned)  # the base models are not built here
    monkeypatch.setattr(registry, "DELTAS_DIR", home / "no-deltas")
    assert main(["models", "build", "--all"]) == 0
    out = capsys.readouterr().out
    assert out.count(": skipped, ") == 4 and "medsearch models align" in out
    assert not any((home / "models").iterdir())


# The development commands' modules, and what they need that the serving image lacks.
DEV_COMMAND_MODULES = (
    "medsearch.bench_cli",
    "medsearch.eval_cli",
    "medsearch.align_cli",
    "medsearch.finetune_cli",
)
NOT_IN_THE_API_IMAGE = ("evaluation", "bench", "torch", "transformers")


@pytest.mark.parametrize(
    ("argv", "imported"),
    [
        (["serve", "--port", "1"], []),
        (["models", "list"], []),
        (["eval", "some-dir"], ["medsearch.eval_cli", "evaluation"]),
        (["models", "align"], ["medsearch.align_cli", "evaluation", "torch", "transformers"]),
    ],
)
def test_a_command_imports_only_its_own_module(argv: list[str], imported: list[str]) -> None:
    # The serving image lacks the development commands' packages: parsing `serve` must not import
    # them. A fresh interpreter, since this one's tests import everything.
    modules = DEV_COMMAND_MODULES + NOT_IN_THE_API_IMAGE
    script = (
        "import json, sys\n"
        "from medsearch.cli import build_parser\n"
        f"build_parser({argv!r}).parse_args({argv!r})\n"
        f"print(json.dumps([m for m in {modules!r} if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == imported


# A fresh interpreter where the packages the api image lacks cannot be imported, as there.
API_IMAGE_SCRIPT = r"""
import contextlib, importlib.abc, io, json, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in MISSING:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Block())
from medsearch.cli import main

answers = []
for argv in COMMANDS:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    answers.append([code, err.getvalue()])
print(json.dumps(answers))
"""


def test_a_development_command_says_in_one_line_what_the_install_lacks(home: Path) -> None:
    commands = [
        ["eval", "some-dir"],
        ["bench", "all", "--spawn"],
        ["models", "align"],
        ["models", "finetune-e5", "some-dir"],
        ["models", "list"],  # other commands still run (this one: no models dir)
    ]
    script = API_IMAGE_SCRIPT.replace("MISSING", repr(set(NOT_IN_THE_API_IMAGE))).replace(
        "COMMANDS", repr(commands)
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    answers = json.loads(out.stdout)
    missing = ["evaluation", "bench", "evaluation", "evaluation"]
    for (code, err), argv, module in zip(answers, commands, missing, strict=False):
        assert code == 2
        assert err == (
            f"medsearch: error: medsearch {' '.join(argv[: 2 if argv[0] == 'models' else 1])} is not part "
            f"of this installation (module {module} is missing); it ships with the source checkout: "
            "pip install -e '.[index,dev]'\n"
        )
    assert answers[-1][0] == 2 and "models directory" in answers[-1][1]


def test_index_from_stdin_then_versions_and_rollback(
    home: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    def rows(n: int) -> str:
        return "".join(
            json.dumps({"id": f"d{i}", "text": f"第 {i} 篇"}, ensure_ascii=False) + "\n" for i in range(n)
        )

    for n in (3, 4):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(rows(n).encode())))
        assert main(["index", "-", "--model", str(tiny_bert)]) == 0
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["indexed"], r["switched"]) for r in reports] == [(3, True), (4, True)]
    first, second = (r["collection"] for r in reports)

    assert main(["index", "versions"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"  {first} 3 documents", f"* {second} 4 documents"]
    assert main(["index", "rollback"]) == 0
    assert capsys.readouterr().out.strip() == f"medsearch: {second} -> {first}"
    assert main(["index", "rollback"]) == 2
    assert "no older complete version" in capsys.readouterr().err


def test_index_refuses_bad_shards_and_keep(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = home / "c.jsonl"
    corpus.write_text('{"id": "a", "text": "x"}\n', encoding="utf-8")
    assert main(["index", str(corpus), "--shard", "2/2"]) == 2
    assert "0 <= i < N" in capsys.readouterr().err
    assert main(["index", str(corpus), "--keep", "1"]) == 2
    assert main(["index", str(corpus), "--shard", "0/2", "--incremental"]) == 2


def test_a_model_name_never_leads_outside_the_models_directory(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = home / "c.jsonl"
    corpus.write_text('{"id": "a", "text": "x"}\n', encoding="utf-8")
    (home / "outside").mkdir()
    for name in ("../outside", "a/../../outside", "/nonexistent/model"):
        assert main(["index", str(corpus), "--model", name]) == 2
        assert "is not a directory name inside" in capsys.readouterr().err


def test_the_service_refuses_a_query_model_name_leading_outside(home: Path) -> None:
    from service.state import StartupError, load_state
    from settings import Settings

    (home / "models").mkdir()
    with pytest.raises(StartupError, match=r"MEDSEARCH_QUERY_MODEL: model name '\.\./\.\./etc'"):
        load_state(Settings(home=home, query_model="../../etc"))


@pytest.mark.parametrize("name", ["multilingual-e5-small", "gemma-3-270m", "embeddinggemma-300m"])
@pytest.mark.parametrize("occupant", ["a directory of other files", "a file"])
def test_models_build_refuses_a_path_that_is_not_a_model_in_one_line(
    home: Path, name: str, occupant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every bootstrap refuses the same way, and the CLI prints that refusal as one line naming the
    fix, with no traceback; what was there is left untouched."""
    target = home / "models" / name
    target.parent.mkdir()
    if occupant == "a file":
        target.write_text("mine")
    else:
        target.mkdir()
        (target / "notes.txt").write_text("mine")

    assert main(["models", "build", name]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"medsearch: error: refusing to replace {target}: ")
    assert err.rstrip().endswith("move it away or choose another directory")
    assert (target if occupant == "a file" else target / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["models"],
        ["models", "align"],
        ["models", "text-set"],
        ["models", "finetune-e5"],
        ["eval"],
        ["bench"],
        *([["bench", name] for name in ("service", "query", "indexer", "precision", "all")]),
    ],
)
def test_every_help_page_renders(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # argparse formats help strings with %: a bare '%' in one crashes the page (it did for bench).
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    assert "usage: " in capsys.readouterr().out
