"""The invariant that matters (DESIGN.md): on the path a user runs, adding one example to the
private set moves a step's clipped sum by at most C -- here THE trainer (`dpldm.train.dp_finetune`,
what `dpldm finetune`, `make demo` and `launch/train.py` run) with its real loss on the demo UNet,
for several N, physical batch sizes, sample rates, and world sizes 1 and 2.

Stronger than the bound: the difference must EQUAL the new example's own clipped gradient,
computed independently (plain UNet, one autograd gradient, clip) when it was sampled, and be 0
when it was not; the other examples' Poisson inclusions must not change. A negative control runs
the same measurement with the old chunk-position-keyed randomness and must break the bound, so
the test can fail. See tests/dist_scripts/neighbours.py for the measurement."""
from __future__ import annotations

import json
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist_scripts"))
import neighbours  # noqa: E402
from test_distributed_ranks import spawn, torchrun  # noqa: E402

REL = 1e-5


def check_rows(rows: list[dict]) -> None:
    assert len(rows) == len(neighbours.CASES)
    assert any(r["new_example_sampled"] for r in rows) and any(not r["new_example_sampled"] for r in rows)
    for r in rows:
        assert r["samples_agree"], r  # the old examples' Poisson inclusion is unchanged by the new one
        assert r["diff_norm"] <= r["C"] * (1 + REL), r
        if r["new_example_sampled"]:
            assert r["diff_norm"] > 0.1 * r["C"], r  # the new example did contribute
            if "own_norm" in r:  # = its own clipped gradient, nothing else moved
                assert r["diff_minus_own"] <= REL * r["C"], r
        else:
            assert r["diff_norm"] <= REL * r["C"], r


def test_neighbouring_datasets_one_process(tmp_path):
    from dpldm.parallel.dist import single_process_context

    check_rows(neighbours.run_cases(tmp_path, single_process_context()))


def test_neighbouring_datasets_two_ranks(tmp_path):
    r = spawn(torchrun(2, [str(ROOT / "tests" / "dist_scripts" / "neighbours.py"), str(tmp_path)]))
    assert r.returncode == 0, r.stdout[-6000:]
    check_rows(json.loads((tmp_path / "neighbours_w2.json").read_text()))


def test_negative_control_chunk_position_randomness_breaks_the_bound(tmp_path):
    """The measurement has power: keying the draws on the row position inside a chunk (the rule
    `dpldm finetune` had) makes one added example move the sum by more than C."""
    from dpldm.parallel.dist import single_process_context

    rows = neighbours.run_cases(tmp_path, single_process_context(), cases=[(61, 7, 1.0)], control=True)
    assert rows[0]["diff_norm"] > 1.5 * rows[0]["C"], rows
