"""Bad input to the results protocol `bench/utility.py` (`make results`; docs/errors.md, section
"Results protocol (issue 16)").

Each row runs the tool's `main([...])` in-process: exit code 2, ONE stderr line `utility: error: ...`
naming the problem (no traceback, no usage block), and nothing written: the row's folder `<case>`
hashes the same before and after (`--out <case>/out` is not created unless the row prepared it).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import pytest
from cli_harness import run_in_process, tree_hash

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Results protocol (issue 16)"


def load_tool():
    spec = importlib.util.spec_from_file_location("results_utility_bad", REPO / "bench" / "utility.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["results_utility_bad"] = mod
    spec.loader.exec_module(mod)
    return mod


tool = load_tool()


def other_settings() -> str:
    """A results.json made by the same recipe and protocol but data.seed = 7 (as if the recipe changed)."""
    args = tool.parse_args(["--threads", "1"])
    args.epsilons, args.repeats = list(tool.EPSILONS), tool.REPEATS
    base = tool.load_config(str(REPO / "configs" / "demo.toml"), ["train.threads=1"])
    settings, _ = tool.settings_of(base, args)
    settings["recipe"]["data"]["seed"] = 7
    return json.dumps({"schema": 2, "settings_sha256": "0" * 16, "settings": settings, "runs": {}})


@dataclass
class Row:
    id: str
    argv: list[str]  # <case> is replaced by the row's folder
    message: str  # the whole error line after "utility: error: " (<case> replaced)
    files: dict[str, Union[str, Callable[[], str]]] | None = None  # files the row prepares in <case>


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
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, tmp_path: Path) -> None:
    case = tmp_path / "case"
    case.mkdir()
    for name, text in (row.files or {}).items():
        (case / name).parent.mkdir(parents=True, exist_ok=True)
        (case / name).write_text(text() if callable(text) else text)
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
