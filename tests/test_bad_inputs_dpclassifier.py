"""Bad input to the public tool that chooses the direct DP-SGD classifier's settings,
`dpldm/experiments/tune_dp_classifier.py` (docs/errors.md, section "DP classifier tuning tool (issue 16)").

Each row runs the tool's `main([...])` in-process: exit code 2, ONE stderr line
`tune_dp_classifier: error: ...` naming the problem (no traceback, no usage block), and nothing
written: the row's folder `<case>` hashes the same before and after (`--out` is not created).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_harness import tree_hash

REPO = Path(__file__).resolve().parents[1]
SECTION = "## DP classifier tuning tool (issue 16)"


def load_tool():
    return importlib.import_module("dpldm.experiments.tune_dp_classifier")


@dataclass
class Row:
    id: str
    argv: list[str]  # <case> is replaced by the row's folder
    message: str  # the whole error line after "tune_dp_classifier: error: " (<case> replaced)
    files: dict[str, str] | None = None  # files the row prepares in <case>


ROWS = [
    Row("dpc-epsilon-zero", ["--epsilons", "0"], "--epsilons must be finite numbers > 0, got 0.0"),
    Row("dpc-epsilon-nan", ["--epsilons", "1", "nan"], "--epsilons must be finite numbers > 0, got nan"),
    Row("dpc-clip-negative", ["--clip", "-1"], "--clip must be finite numbers > 0, got -1.0"),
    Row("dpc-lr-repeated", ["--lr", "1e-3", "0.001"], "--lr: a value is repeated"),
    Row("dpc-schedule-form", ["--schedule", "200-500"],
        "--schedule '200-500': expected STEPSxBATCH with two integers >= 1, e.g. 200x500"),
    Row("dpc-schedule-zero-steps", ["--schedule", "0x500"],
        "--schedule '0x500': expected STEPSxBATCH with two integers >= 1, e.g. 200x500"),
    Row("dpc-batch-exceeds-n", ["--schedule", "200x5000"],
        "--schedule: expected batch 5000 exceeds the stand-in set's N=4000"),
    Row("dpc-seed-negative", ["--seeds", "-1"], "--seeds must be distinct integers in [0, 2**63), got [-1]"),
    Row("dpc-threads-zero", ["--threads", "0"], "--threads must lie in [1, 4096], got 0"),
    Row("dpc-delta-too-large", ["--delta", "0.5"],
        "--delta: delta=0.5 must be < 1/N = 0.00025 for N=4000 private examples (a delta >= 1/N allows releasing "
        "one example outright)"),
    Row("dpc-n-zero", ["--n", "0"], "--n must lie in [1, 1000000], got 0"),
    Row("dpc-unknown-flag", ["--bogus"], "unrecognized arguments: --bogus"),
    Row("dpc-proxy-missing", ["--proxy", "<case>/nope.toml"], "<case>/nope.toml: proxy config file not found"),
    Row("dpc-out-below-file", ["--out", "<case>/a_file/run"],
        "--out <case>/a_file/run: cannot use it as the output folder, <case>/a_file is a file", {"a_file": "x"}),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, tmp_path: Path, capsys) -> None:
    case = tmp_path / "case"
    case.mkdir()
    for name, text in (row.files or {}).items():
        (case / name).write_text(text)
    argv = [a.replace("<case>", str(case)) for a in row.argv]
    if "--out" not in argv:
        argv += ["--out", str(case / "out")]
    before = tree_hash(case)
    tool = load_tool()
    try:
        rc = tool.main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1, err
    assert err[0] == "tune_dp_classifier: error: " + row.message.replace("<case>", str(case))
    assert tree_hash(case) == before
    assert not (case / "out").exists()


def test_rows_are_documented() -> None:
    doc = (REPO / "docs" / "errors.md").read_text()
    assert SECTION in doc
    section = doc.split(SECTION, 1)[1].split("\n## ", 1)[0]
    missing = [r.id for r in ROWS if f"`{r.id}`" not in section]
    assert not missing, f"rows missing from docs/errors.md ({SECTION}): {missing}"
    assert len({r.id for r in ROWS}) == len(ROWS)
