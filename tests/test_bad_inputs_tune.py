"""Bad input to the public tuning tool `dpldm/experiments/tune_public.py` (docs/errors.md, section "Public tuning
tool (issue 16)").

Each row runs the tool's `main([...])` in-process: exit code 2, ONE stderr line
`tune_public: error: ...` naming the problem (no traceback, no usage block), and nothing written:
the row's folder `<case>` hashes the same before and after (`--out` is not created unless the row
prepared it).
"""
from __future__ import annotations

import importlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cli_harness import tree_hash

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Public tuning tool (issue 16)"


def load_tool():
    return importlib.import_module("dpldm.experiments.tune_public")


@dataclass
class Row:
    id: str
    argv: list[str]  # <case> is replaced by the row's folder
    message: str  # the whole error line after "tune_public: error: " (<case> replaced)
    files: dict[str, str | bytes] | None = None  # files the row prepares in <case>


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


GOOD_PROXY = (REPO / "configs" / "proxy" / "digits.toml").read_text()
ROWS = [
    Row("tune-grid-no-equals", ["--grid", "diffusion.guidance_scale"],
        "--grid 'diffusion.guidance_scale': expected section.key=v1,v2,..."),
    Row("tune-grid-empty-value", ["--grid", "diffusion.guidance_scale=1,"],
        "--grid 'diffusion.guidance_scale=1,': an empty value (expected section.key=v1,v2,...)"),
    Row("tune-grid-no-section", ["--grid", "guidance_scale=1,2"],
        "--grid 'guidance_scale=1': expected section.key=value"),
    Row("tune-grid-controlled-key", ["--grid", "data.private=mnist5k,digits"],
        "--grid 'data.private=mnist5k': data.private is set by the proxy for every candidate and cannot be changed "
        "here (set by the tool: data.private, privacy.epsilon, privacy.sample_rate, privacy.steps, "
        "privacy.noise_multiplier, privacy.enabled, train.deterministic, train.not_private, train.seed, "
        "train.out_dir, train.wandb, train.threads, train.sample_every, train.checkpoint_every)"),
    Row("tune-set-controlled-key", ["--set", "privacy.epsilon=1"],
        "--set 'privacy.epsilon=1': privacy.epsilon is set by the proxy for every candidate and cannot be changed "
        "here (set by the tool: data.private, privacy.epsilon, privacy.sample_rate, privacy.steps, "
        "privacy.noise_multiplier, privacy.enabled, train.deterministic, train.not_private, train.seed, "
        "train.out_dir, train.wandb, train.threads, train.sample_every, train.checkpoint_every)"),
    Row("tune-grid-unknown-key", ["--grid", "diffusion.guidance=1,2"],
        "diffusion.guidance: unknown key (known: beta_end, beta_start, cond_drop_prob, eta, guidance_scale, sample_steps, "
        "sampler, schedule, timesteps, timesteps_per_example)"),
    Row("tune-grid-bad-value", ["--grid", "diffusion.eta=0,2"], "diffusion.eta: must lie in [0, 1], got 2.0"),
    Row("tune-grid-key-twice", ["--grid", "diffusion.eta=0", "--grid", "diffusion.eta=1"],
        "--grid 'diffusion.eta=1': diffusion.eta is swept twice; give all its values in one --grid"),
    Row("tune-grid-repeated-value", ["--grid", "diffusion.eta=0,0"], "--grid 'diffusion.eta=0,0': a value is repeated"),
    Row("tune-epsilon-zero", ["--epsilon", "0"], "--epsilon must be a finite number > 0, got 0.0"),
    Row("tune-epsilon-nan", ["--epsilon", "nan"], "--epsilon must be a finite number > 0, got nan"),
    Row("tune-threads-zero", ["--threads", "0"], "--threads must lie in [1, 4096], got 0"),
    Row("tune-seed-negative", ["--seed", "-1"], "--seed must lie in [0, 2**63), got -1"),
    Row("tune-unknown-flag", ["--bogus"], "unrecognized arguments: --bogus"),
    Row("tune-recipe-missing", ["--recipe", "<case>/nope.toml"], "<case>/nope.toml: config file not found"),
    Row("tune-recipe-classes", ["--set", "data.num_classes=5"],
        f"{REPO / 'configs' / 'demo.toml'}: data.num_classes = 5, the digit proxy has 10 classes"),
    Row("tune-proxy-missing", ["--proxy", "<case>/nope.toml"], "<case>/nope.toml: proxy config file not found"),
    Row("tune-proxy-bad-value", ["--proxy", "<case>/proxy.toml"], "proxy.digit_size: must lie in [8, 32], got 40",
        {"proxy.toml": GOOD_PROXY.replace("digit_size = 24", "digit_size = 40")}),
    Row("tune-proxy-wrong-type", ["--proxy", "<case>/proxy.toml"], "proxy.steps: expected int, got 'ten'",
        {"proxy.toml": GOOD_PROXY.replace("steps = 40", 'steps = "ten"')}),
    Row("tune-proxy-unknown-key", ["--proxy", "<case>/proxy.toml"],
        "<case>/proxy.toml: proxy.digit_sise: unknown key (known: classifier_epochs, digit_size, holdout_fraction, "
        "judge_epochs, judge_seed, match_sigma, max_rotation_deg, max_scale, max_shift_px, num_examples, "
        "reference_num_examples, samples_per_class, score, seed, split_seed, steps)",
        {"proxy.toml": GOOD_PROXY.replace("digit_size = 24", "digit_sise = 24")}),
    Row("tune-proxy-unknown-section", ["--proxy", "<case>/proxy.toml"],
        "<case>/proxy.toml: unknown section [proxi] (known: proxy, quick)",
        {"proxy.toml": "[proxi]\nsteps = 3\n"}),
    Row("tune-proxy-bad-score", ["--proxy", "<case>/proxy.toml"],
        "proxy.score: must be one of mean|fidelity|downstream, got 'fid'",
        {"proxy.toml": GOOD_PROXY.replace('score = "mean"', 'score = "fid"')}),
    Row("tune-out-below-file", ["--out", "<case>/a_file/run"],
        "--out <case>/a_file/run: cannot use it as the output folder, <case>/a_file is a file", {"a_file": "x"}),
    Row("tune-batch-exceeds-proxy", ["--quick", "--set", "privacy.expected_batch_size=100"],
        "privacy.expected_batch_size=100 exceeds the proxy's N=64 (proxy.num_examples)"),
    Row("tune-out-other-standin", ["--quick"],
        "<case>/out/proxy_private_64.npz holds another stand-in set than this run's (made with another --seed or "
        "proxy config); use another --out (nothing was changed)",
        {"out/proxy_private_64.npz": npz_bytes(images=np.zeros((64, 32, 32), np.uint8),
                                               labels=np.arange(64, dtype=np.int64) % 10),
         "out/report.json": '{"proxy": {"seed": 0}}\n'}),
    Row("tune-out-unreadable-standin", ["--quick"],
        "<case>/out/proxy_private_64.npz holds no readable stand-in set; use another --out (nothing was changed)",
        {"out/proxy_private_64.npz": "not an npz"}),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, tmp_path: Path, capsys) -> None:
    case = tmp_path / "case"
    case.mkdir()
    for name, text in (row.files or {}).items():
        (case / name).parent.mkdir(parents=True, exist_ok=True)
        (case / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    argv = [a.replace("<case>", str(case)) for a in row.argv]
    if "--out" not in argv:
        argv += ["--out", str(case / "out")]
    prepared_out = (case / "out").exists()
    before = tree_hash(case)
    tool = load_tool()
    try:
        rc = tool.main(argv + ["--threads", "1"] if "--threads" not in argv else argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1, err
    assert err[0] == "tune_public: error: " + row.message.replace("<case>", str(case))
    assert tree_hash(case) == before
    assert (case / "out").exists() == prepared_out


def test_rows_are_documented() -> None:
    doc = (REPO / "docs" / "errors.md").read_text()
    assert SECTION in doc
    section = doc.split(SECTION, 1)[1].split("\n## ", 1)[0]
    missing = [r.id for r in ROWS if f"`{r.id}`" not in section]
    assert not missing, f"rows missing from docs/errors.md ({SECTION}): {missing}"
    assert len({r.id for r in ROWS}) == len(ROWS)


def test_stopped_proxy_finetune_is_one_line_exit_130(tmp_path: Path, capsys, monkeypatch) -> None:
    """`tune-finetune-stopped` (docs/errors.md): the trainer stopped by SIGINT (Ctrl-C) returns its result
    without a model (was: TypeError traceback in load_ldm(None)); the tool says so in ONE line, exit 130, and
    writes no report; the run folder keeps what the trainer checkpointed."""
    import dpldm.train.dp_finetune as dp_finetune

    calls = []

    def stopped(cfg, opts):  # what DPFinetuner._finish returns after a SIGINT at step 1 of 2
        calls.append(opts.out)
        return {"model": None, "privacy": {}, "steps_done": 1, "finished": False, "stop_reason": "SIGINT",
                "device": "cpu", "precision": "fp32", "world_size": 1, "rank": 0}

    monkeypatch.setattr(dp_finetune, "train", stopped)
    out = tmp_path / "out"
    rc = load_tool().main(["--quick", "--out", str(out), "--threads", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 130 and len(calls) == 1
    assert err == [f"tune_public: stopped: the proxy fine-tuning in {calls[0]} stopped at step 1 of 2 (SIGINT); its "
                   "checkpoint is kept: run the same command again to continue (no report was written)"]
    assert not (out / "report.json").exists()
