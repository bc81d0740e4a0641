"""Bad input to the results protocol `dpldm/experiments/utility.py` (`make results`; docs/errors.md, section
"Results protocol (issue 16)").

Each row runs the tool's `main([...])` in-process: exit code 2, ONE stderr line `utility: error: ...`
naming the problem (no traceback, no usage block), and nothing written: the row's folder `<case>`
hashes the same before and after (`--out <case>/out` is not created unless the row prepared it).
"""
from __future__ import annotations

import importlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np
import pytest
from cli_harness import run_in_process, tree_hash

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Results protocol (issue 16)"


def load_tool():
    return importlib.import_module("dpldm.experiments.utility")


tool = load_tool()


def other_settings() -> str:
    """A results.json made by the same recipe and protocol but data.seed = 7 (as if the recipe changed)."""
    args = tool.parse_args(["--threads", "1"])
    args.epsilons, args.repeats = list(tool.EPSILONS), tool.REPEATS
    base = tool.load_config(str(REPO / "configs" / "demo.toml"), ["train.threads=1"])
    settings, _ = tool.settings_of(base, args)
    settings["recipe"]["data"]["seed"] = 7
    return json.dumps({"schema": 2, "settings_sha256": "0" * 16, "settings": settings, "runs": {}})


def quick_settings(source: str) -> str:
    """A results.json of `--quick` runs whose subset was cut from `source` (<case>: the row's folder)."""
    args = tool.parse_args(["--quick", "--threads", "1"])
    args.epsilons, args.repeats = list(tool.QUICK_EPSILONS), tool.QUICK_REPEATS
    subset = f'data.private="<case>/out/{tool.QUICK_NPZ}"'
    base = tool.load_config(str(REPO / "configs" / "demo.toml"), tool.QUICK_SETS + ["train.threads=1", subset])
    settings, _ = tool.settings_of(base, args, quick_source=source)
    return json.dumps({"schema": 2, "settings_sha256": "0" * 16, "settings": settings, "runs": {}})


def quick_subset(source: str) -> bytes:
    """A --quick subset .npz as the tool writes it, cut from `source`."""
    buf = io.BytesIO()
    np.savez(buf, source=np.array(source), train_images=np.zeros((2, 28, 28), np.uint8),
             train_labels=np.arange(2), test_images=np.zeros((2, 28, 28), np.uint8), test_labels=np.arange(2))
    return buf.getvalue()


@dataclass
class Row:
    id: str
    argv: list[str]  # <case> is replaced by the row's folder
    message: str  # the whole error line after "utility: error: " (<case> replaced)
    files: dict[str, Union[str, bytes, Callable[[], str]]] | None = None  # files the row prepares in <case>


VARIANT_CHOICES = ", ".join(f"'{v}'" for v in tool.VARIANTS)
ROWS = [
    Row("results-repeats-zero", ["--repeats", "0"], "--repeats must be >= 1, got 0"),
    Row("results-repeats-negative", ["--repeats", "-2"], "--repeats must be >= 1, got -2"),
    Row("results-repeats-not-int", ["--repeats", "two"], "argument --repeats: invalid int value: 'two'"),
    Row("results-epsilon-zero", ["--epsilons", "0"],
        "--epsilons: every epsilon must be a finite number > 0, got 0.0"),
    Row("results-epsilon-negative", ["--epsilons", "1", "-5"],
        "--epsilons: every epsilon must be a finite number > 0, got -5.0"),
    Row("results-epsilon-nan", ["--epsilons", "nan"], "--epsilons: every epsilon must be a finite number > 0, got nan"),
    Row("results-epsilon-inf", ["--epsilons", "10", "inf"],
        "--epsilons: every epsilon must be a finite number > 0, got inf"),
    Row("results-epsilon-repeated", ["--epsilons", "10", "1", "10.0"], "--epsilons: 10 given twice"),
    Row("results-threads-zero", ["--threads", "0"], "--threads must lie in [1, 4096], got 0"),
    Row("results-samples-per-class-one", ["--samples-per-class", "1"],
        "--samples-per-class must be >= 2 (the downstream CNN holds some out for validation), got 1"),
    Row("results-fid-samples-one", ["--fid-samples", "1"], "--fid-samples must be >= 2, got 1 (or pass --no-fid)"),
    Row("results-unknown-variant", ["--variants", "dp-lora"],
        f"argument --variants: invalid choice: 'dp-lora' (choose from {VARIANT_CHOICES})"),
    Row("results-unknown-flag", ["--bogus"], "unrecognized arguments: --bogus"),
    Row("results-config-missing", ["--config", "<case>/nope.toml"], "<case>/nope.toml: config file not found"),
    Row("results-set-no-value", ["--set", "train.lr"], "--set 'train.lr': expected section.key=value"),
    Row("results-set-bad-value", ["--set", "privacy.steps=0"], "privacy.steps: must lie in [1, 1000000000], got 0"),
    Row("results-out-below-file", ["--out", "<case>/a_file/run"],
        "--out <case>/a_file/run: cannot use it as the output folder, <case>/a_file is a file", {"a_file": "x"}),
    Row("results-json-corrupt", [],
        "<case>/out/results.json: not a readable results file (JSONDecodeError: Expecting property name enclosed in "
        "double quotes: line 1 column 2 (char 1)); move it away or use another --out",
        {"out/results.json": "{not json"}),
    Row("results-json-schema", [],
        "<case>/out/results.json: results schema 3 is not understood (expected 2 with a 'runs' object)",
        {"out/results.json": '{"schema": 3, "runs": {}}'}),
    Row("results-json-legacy-variant", [],
        f"<case>/out/results.json: entry 'dp-lora@eps=1' names no known variant ({', '.join(tool.VARIANTS)})",
        {"out/results.json": '{"dp-lora@eps=1": {"accuracy": 0.5}}'}),
    Row("results-json-other-settings", [],
        "<case>/out/results.json holds runs made with other settings (recipe.data.seed: 7 -> 0); use another --out "
        "(nothing was changed)", {"out/results.json": other_settings}),
    Row("results-json-is-folder", [], "<case>/out/results.json: is a folder, not a results file; move it away or "
        "use another --out", {"out/results.json/notes.txt": "mine"}),
    Row("results-json-run-not-object", [], "<case>/out/results.json: run 'public' is not a run (expected a JSON "
        "object, got int); fix or remove the run, or use another --out",
        {"out/results.json": '{"schema": 2, "runs": {"public": 3}}'}),
    Row("results-json-run-no-variant", [], "<case>/out/results.json: run 'x': variant None is not one of "
        f"{', '.join(tool.VARIANTS)}; fix or remove the run, or use another --out",
        {"out/results.json": '{"schema": 2, "runs": {"x": {"accuracy": 0.5}}}'}),
    Row("results-json-run-bad-number", [], "<case>/out/results.json: run 'public': 'accuracy' must be a number or "
        "null, got 'high'; fix or remove the run, or use another --out",
        {"out/results.json": '{"schema": 2, "runs": {"public": {"variant": "public", "accuracy": "high"}}}'}),
    Row("results-json-run-rep-text", [], "<case>/out/results.json: run 'dp-full@eps=1@rep=0': 'rep' must be an "
        "integer, got '0'; fix or remove the run, or use another --out",
        {"out/results.json": '{"schema": 2, "runs": {"dp-full@eps=1@rep=0": {"variant": "dp-full", "rep": "0"}}}'}),
    Row("results-json-legacy-bad-epsilon", [], "<case>/out/results.json: entry 'dp-full@eps=ten': 'ten' after "
        "'@eps=' is not a number", {"out/results.json": '{"dp-full@eps=ten": {"accuracy": 0.5}}'}),
    Row("results-quick-other-private", ["--quick", "--set", 'data.private="<case>/other.npz"'],
        "<case>/out/results.json holds runs made with other settings (quick_source: 'mnist5k' -> '<case>/other.npz'); "
        "use another --out (nothing was changed)", {"out/results.json": lambda: quick_settings("mnist5k")}),
    Row("results-quick-subset-other-source", ["--quick", "--set", 'data.private="<case>/other.npz"'],
        f"<case>/out/{tool.QUICK_NPZ}: a --quick subset cut from data.private='mnist5k', not from '<case>/other.npz'; "
        "use another --out (nothing was changed)", {f"out/{tool.QUICK_NPZ}": quick_subset("mnist5k")}),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, tmp_path: Path) -> None:
    case = tmp_path / "case"
    case.mkdir()
    for name, text in (row.files or {}).items():
        (case / name).parent.mkdir(parents=True, exist_ok=True)
        text = text() if callable(text) else text
        (case / name).write_bytes(text if isinstance(text, bytes) else text.replace("<case>", str(case)).encode())
    argv = [a.replace("<case>", str(case)) for a in row.argv]
    if "--out" not in argv:
        argv += ["--out", str(case / "out")]
    if "--threads" not in argv:
        argv += ["--threads", "1"]
    prepared_out = (case / "out").exists()
    before = tree_hash(case)
    rc, _, err = run_in_process(tool.main, argv)
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1, lines
    assert lines[0] == "utility: error: " + row.message.replace("<case>", str(case))
    assert tree_hash(case) == before
    assert (case / "out").exists() == prepared_out


def test_rows_are_documented() -> None:
    doc = (REPO / "docs" / "errors.md").read_text()
    assert SECTION in doc
    section = doc.split(SECTION, 1)[1].split("\n## ", 1)[0]
    missing = [r.id for r in ROWS if f"`{r.id}`" not in section]
    assert not missing, f"rows missing from docs/errors.md ({SECTION}): {missing}"
    assert len({r.id for r in ROWS}) == len(ROWS)


def test_quick_subset_is_reused_only_for_its_own_source(tmp_path: Path) -> None:
    """The --quick subset records the data.private it was cut from: the same source reuses it (byte for
    byte), another source is refused (`results-quick-subset-other-source`), never silently reused."""
    src = tmp_path / "src.npz"
    np.savez(src, train_images=np.zeros((60, 8, 8), np.uint8), train_labels=np.arange(60) % 3,
             test_images=np.zeros((30, 8, 8), np.uint8), test_labels=np.arange(30) % 3)
    path = tmp_path / "out" / tool.QUICK_NPZ
    path.parent.mkdir()
    assert tool.quick_private_source(str(src), path) == path
    with np.load(path) as z:
        assert str(z["source"]) == str(src) and sorted(z["train_labels"].tolist()) == sorted([0, 1, 2] * tool.QUICK_PER_CLASS)
    before = path.read_bytes()
    assert tool.quick_private_source(str(src), path) == path and path.read_bytes() == before
    with pytest.raises(tool.UserError, match="a --quick subset cut from data.private=.*, not from 'other'"):
        tool.quick_private_source("other", path)
    assert path.read_bytes() == before
