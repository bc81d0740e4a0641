"""The thread tuner used by the evaluation's CPU loops (pure logic, fake timings)."""
import torch

from dpldm.eval.runtime import ThreadTuner, restore_threads


def _drive(tuner, rates, units):
    used = []
    for _ in range(units):
        n = tuner.choose()
        used.append(n)
        tuner.record(n, 10.0 / rates[n], 10)
    return used


def test_tuner_warms_up_probes_both_and_keeps_the_faster():
    t = ThreadTuner(window=2, reprobe=5, base=4)
    used = _drive(t, {4: 1.0, 1: 3.0}, 10)  # one thread is 3x faster (a busy machine)
    assert used[:5] == [4, 4, 4, 1, 1]  # warm-up, then two units each
    assert used[5:10] == [1] * 5 and t.best == 1
    t = ThreadTuner(window=1, reprobe=3, base=2)
    used = _drive(t, {2: 5.0, 1: 3.0}, 9)  # idle machine: two threads win, re-probed later
    assert used[:3] == [2, 2, 1] and used[3:6] == [2, 2, 2] and used[6:8] == [2, 1]


def test_tuner_forced_and_single_thread(monkeypatch):
    monkeypatch.setenv("DPLDM_EVAL_THREADS", "3")
    assert _drive(ThreadTuner(base=2), {3: 1.0}, 4) == [3, 3, 3, 3]
    monkeypatch.delenv("DPLDM_EVAL_THREADS")
    assert _drive(ThreadTuner(base=1), {1: 1.0}, 3) == [1, 1, 1]


def test_unit_sets_and_restore_threads_restores():
    before = torch.get_num_threads()
    with restore_threads():
        t = ThreadTuner(window=1, base=before)
        with t.unit(1) as n:
            assert torch.get_num_threads() == n
        torch.set_num_threads(1)
    assert torch.get_num_threads() == before
