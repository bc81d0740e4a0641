"""The kernel registry (one select()) and selection by measurement (KernelSelector).

References: the documented fixed rule (written out here), the per-example float64 loop for the
engine's results, and timed fake candidates whose speed order is known in advance.
"""
from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

import dpldm.kernels as K
from dpldm.kernels import registry
from dpldm.kernels.registry import Impl, LinearShape, NormShape
from dpldm.kernels.selection import KernelSelector, synthetic_inputs
from dpldm.privacy import BookKeepingEngine
from helpers import assert_close, make, per_example_grads, reference_clipped_sum, rel

CPP = "cpp" in K.available_backends("cpu")


# ---- registry ---------------------------------------------------------------------------------------
def test_registry_covers_every_op_on_torch_and_names_its_dtypes():
    for op in registry.OPS:
        torch_impls = registry.impls(op, "torch")
        assert torch_impls and all(torch.float64 in i.dtypes and "cpu" in i.devices for i in torch_impls)
    rows = registry.table()
    assert {r["op"] for r in rows} == set(registry.OPS)
    assert {r["impl"] for r in rows if r["op"] == "linear_sqnorm"} >= {
        "torch/ghost", "torch/materialize", "cpp/ghost", "cpp/fused", "triton/ghost", "triton/fused",
        "cuda/ghost", "cuda/fused"}
    # where the torch code is another backend's implementation, the registry says so
    served = [r for r in rows if r["note"]]
    assert served and all("torch code" in r["note"] for r in served)
    assert registry.dtype_names((torch.float16, torch.bfloat16, torch.float32)) == "fp16, bf16 or fp32"


def test_explicit_backend_that_cannot_run_is_an_error_with_the_reason():
    from dpldm.errors import InputError

    cpu = torch.device("cpu")
    with pytest.raises(K.BackendUnavailableError, match="CUDA") as e:
        registry.select("linear_sqnorm", cpu, torch.float32, backend="cuda", method="fused")
    assert isinstance(e.value, InputError)  # a config choice: one line and exit 2 from the CLI
    with pytest.raises(K.BackendDtypeError, match="fp16, bf16 or fp32") as e:
        registry.select("linear_clipped_sum", cpu, torch.float64, backend="triton")
    assert isinstance(e.value, TypeError)
    with pytest.raises(ValueError, match="op must be one of"):
        registry.select("conv_sqnorm", cpu, torch.float32)
    with pytest.raises(ValueError, match="needs shape"):
        registry.select("linear_sqnorm", cpu, torch.float32, backend="torch")


def test_explicit_backend_served_by_torch_code_says_so():
    if not CPP:
        pytest.skip("the C++ extension is not built")
    impl, reason = registry.select("embedding_clipped_sum", torch.device("cpu"), torch.float32, backend="cpp")
    assert impl.backend == "cpp" and "torch code" in reason and "scatter-add" in reason


@pytest.mark.parametrize("T,d_in,d_out", [(1, 8, 8), (4, 64, 64), (64, 40, 40), (16, 80, 80), (64, 40, 320),
                                          (64, 640, 640), (256, 32, 32)])
def test_fixed_rule_on_cpu_is_the_documented_one(T, d_in, d_out):
    """selector=None on CPU: ghost when T*(d_in+d_out) < d_in*d_out (torch for T < 64, cpp above),
    else cpp/fused; clipped sums and norm-layer grads on cpp; embeddings on torch."""
    cpu = torch.device("cpu")
    shape = LinearShape(T, d_in, d_out, False)
    impl, reason = registry.select("linear_sqnorm", cpu, torch.float32, shape=shape)
    if T * (d_in + d_out) < d_in * d_out:
        want = "torch/ghost" if T < 64 or not CPP else "cpp/ghost"
    else:
        want = "cpp/fused" if CPP else "torch/materialize"
    assert impl.name == want and reason.startswith("fixed rule")
    for op, sh, b in (("linear_clipped_sum", shape, "cpp"), ("norm_affine_grads", NormShape(T, d_in), "cpp"),
                      ("embedding_sqnorm", None, "torch"), ("embedding_clipped_sum", None, "torch")):
        assert registry.select(op, cpu, torch.float32, shape=sh)[0].name == (b if CPP else "torch")
    # deterministic: the same answer every time
    assert all(registry.select("linear_sqnorm", cpu, torch.float32, shape=shape)[0] == impl for _ in range(3))


def test_fixed_rule_results_match_the_loop():
    for T in (3, 40):
        A, G, mask, coef = make(4, T, 24, 40, masked=True, seed=T)
        got = K.per_example_sqnorm_linear(A, G, bias=True, mask=mask)
        assert rel(got, K.per_example_sqnorm_linear_loop(A, G, bias=True, mask=mask)) < 1e-5


# ---- selector with fake candidates of known speed ------------------------------------------------------
def _fake(name: str, delay: float, calls: list):
    def fn(*args):
        calls.append((name, tuple(a.shape for a in args if isinstance(a, torch.Tensor))))
        time.sleep(delay)
        return args[0].new_zeros(args[0].shape[0])
    return Impl("linear_sqnorm", name.split("/")[0], fn, name.split("/")[1])


def test_selector_keeps_the_fastest_times_on_public_shapes_and_caches(tmp_path):
    calls: list = []
    slow, fast = _fake("torch/ghost", 0.03, calls), _fake("cpp/fused", 0.001, calls)
    log: list[str] = []
    path = tmp_path / "run" / "kernels.json"
    sel = KernelSelector(16, cache_path=path, repeats=3, warmup=1, log=log.append)
    shape = LinearShape(7, 24, 40, True)
    impl, reason = sel.choose("linear_sqnorm", torch.device("cpu"), torch.float32, shape, [slow, fast])
    assert impl is fast and reason.startswith("measured")
    # every candidate: warmup + 1 calibration + repeats calls (a group of n = 1 call: each lasts >= 1 ms),
    # on synthetic (P=16, T, d) tensors, not the chunk
    assert len(calls) == 10 and all(s == ((16, 7, 24), (16, 7, 40)) for _, s in calls)
    entry = sel.choices[sel.key("linear_sqnorm", torch.device("cpu"), torch.float32, shape)]
    assert entry.choice == "cpp/fused" and entry.times_ms["cpp/fused"] < entry.times_ms["torch/ghost"]
    assert entry.times_ms["torch/ghost"] >= 30.0  # the median of real sleeps, in ms
    assert len(log) == 1 and "cpp/fused" in log[0] and "P=16" in log[0]
    # second ask: no new timing
    sel.choose("linear_sqnorm", torch.device("cpu"), torch.float32, shape, [slow, fast])
    assert len(calls) == 10
    # the cache file (atomic JSON) is reloaded by a new selector: same choice, nothing timed
    data = json.loads(path.read_text())
    assert data["version"] == 1 and list(data["choices"].values())[0]["choice"] == "cpp/fused"
    sel2 = KernelSelector(16, cache_path=path)
    impl2, reason2 = sel2.choose("linear_sqnorm", torch.device("cpu"), torch.float32, shape, [slow, fast])
    assert impl2 is fast and reason2.startswith("cached") and len(calls) == 10
    assert "cpp/fused" in sel2.summary() and "torch/ghost" in sel2.summary()


def test_huge_physical_batch_on_a_tiny_set_measures_at_most_n_rows(monkeypatch):
    """privacy.physical_batch_size=200000 on a private set of N = 40 (was: every candidate timed at 200,000
    rows, 2.6-10 s and 6-12 GB each): after cap_rows(N) the synthetic inputs, every call timed and the key
    have at most N rows; the measurement is that of a selector configured with P = N."""
    import dpldm.kernels.selection as selection

    made: list = []

    def spy(op, P, *a, **k):
        made.append(P)
        return synthetic_inputs(op, P, *a, **k)

    monkeypatch.setattr(selection, "synthetic_inputs", spy)
    calls: list = []
    shape = LinearShape(3, 5, 6, True)
    sel = KernelSelector(200_000, repeats=1, warmup=0)
    assert sel.cap_rows(40) == 40 and sel.cap_rows(10_000) == 40  # a cap never raises P
    sel.choose("linear_sqnorm", torch.device("cpu"), torch.float32, shape,
               [_fake("torch/ghost", 0, calls), _fake("cpp/fused", 0, calls)])
    assert made == [40] and calls and all(s == ((40, 3, 5), (40, 3, 6)) for _, s in calls)
    (key,) = sel.choices
    assert key == KernelSelector(40).key("linear_sqnorm", torch.device("cpu"), torch.float32, shape)
    assert "P=40 " in key
    small = KernelSelector(16)
    assert small.cap_rows(40) == 16 and small.P == 16  # P <= N: unchanged (the keys of existing runs too)
    with pytest.raises(ValueError, match="positive int"):
        small.cap_rows(0)


def test_cached_choice_that_cannot_run_here_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "kernels.json"
    sel = KernelSelector(8, cache_path=path)
    shape = LinearShape(3, 4, 4, False)
    key = sel.key("linear_sqnorm", torch.device("cpu"), torch.float32, shape)
    path.write_text(json.dumps({"version": 1, "choices": {key: {"choice": "cuda/fused", "times_ms": {}}}}))
    sel = KernelSelector(8, cache_path=path)
    with pytest.raises(K.BackendUnavailableError, match="kernels.json.*cannot run here"):
        sel.choose("linear_sqnorm", torch.device("cpu"), torch.float32, shape, registry.impls("linear_sqnorm", "torch"))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="kernels.json is unreadable") as e:
        KernelSelector(8, cache_path=path)
    from dpldm.errors import InputError
    assert isinstance(e.value, InputError)
    assert path.read_text() == "{not json"  # never overwritten


def test_choices_travel_between_selectors(tmp_path):
    """Rank 0 measures, the others load its state_dict: the same kernels everywhere, nothing timed."""
    calls: list = []
    slow, fast = _fake("torch/ghost", 0.01, calls), _fake("cpp/fused", 0.0, calls)
    shape = LinearShape(5, 8, 8, False)
    cpu = torch.device("cpu")
    rank0 = KernelSelector(4)
    rank0.choose("linear_sqnorm", cpu, torch.float32, shape, [slow, fast])
    n = len(calls)
    rank1 = KernelSelector(4, cache_path=tmp_path / "r1.json")
    rank1.load_state_dict(rank0.state_dict())
    impl, reason = rank1.choose("linear_sqnorm", cpu, torch.float32, shape, [slow, fast])
    assert impl is fast and reason.startswith("cached") and len(calls) == n
    assert KernelSelector(4, cache_path=tmp_path / "r1.json").state_dict() == rank0.state_dict()
    with pytest.raises(ValueError, match="keeps its kernel choices"):
        rank1.load_state_dict({k: "torch/ghost" for k in rank0.state_dict()})


def test_memory_guard_and_failing_candidates_are_stated():
    calls: list = []

    def boom(*args):
        raise RuntimeError("out of memory (simulated)")

    ok = _fake("cpp/ghost", 0.0, calls)
    bad = Impl("linear_sqnorm", "cpp", boom, "fused")
    big = registry.impls("linear_sqnorm", "torch")[1]  # torch/materialize: P*d_out*d_in floats
    assert big.name == "torch/materialize"
    sel = KernelSelector(4, max_bytes=1000)
    impl, _ = sel.choose("linear_sqnorm", torch.device("cpu"), torch.float32, LinearShape(2, 64, 64), [big, bad, ok])
    assert impl is ok
    line = sel.summary()
    assert "torch/materialize skipped: needs" in line and "cpp/fused skipped: RuntimeError: out of memory" in line
    with pytest.raises(RuntimeError, match="no candidate ran"):
        KernelSelector(4).choose("linear_sqnorm", torch.device("cpu"), torch.float32, LinearShape(2, 3, 3), [bad])


def test_selector_arguments_are_checked():
    with pytest.raises(ValueError, match="physical_batch_size"):
        KernelSelector(0)
    with pytest.raises(ValueError, match="repeats"):
        KernelSelector(4, repeats=0)
    with pytest.raises(TypeError, match="KernelSelector"):
        BookKeepingEngine(nn.Linear(2, 2), 1.0, selector="fast")


def test_time_call_groups_short_calls():
    from dpldm.kernels.selection import time_call

    n = [0]

    def tiny():
        n[0] += 1

    t = time_call(tiny, (), torch.device("cpu"), repeats=3, warmup=2)
    assert 0 < t < 1e-3 and n[0] > 2 + 1 + 3  # grouped: many calls per timed repeat


def test_synthetic_inputs_depend_only_on_public_shape():
    a = synthetic_inputs("linear_clipped_sum", 5, LinearShape(3, 4, 6, True), torch.float32, torch.device("cpu"))
    b = synthetic_inputs("linear_clipped_sum", 5, LinearShape(3, 4, 6, True), torch.float32, torch.device("cpu"))
    assert [t.shape for t in a[:3]] == [(5, 3, 4), (5, 3, 6), (5,)] and a[4] is True
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))


# ---- the engine with a real selector ---------------------------------------------------------------------
class Stack(nn.Module):
    """LayerNorm -> q/k/v self-attention -> out -> FF, on (R, T, 16) sequences; T picks ghost vs fused."""

    def __init__(self, d=16):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.o = nn.Linear(d, d)
        self.ff = nn.Linear(d, 2 * d)

    def forward(self, x):  # (R, T, d) -> (R,)
        h = self.ln(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / 4.0, dim=-1) @ self.v(h)
        return torch.tanh(self.ff(x + self.o(a))).pow(2).mean(dim=(1, 2))


def _loss(m, b):
    return m(b[0])


def test_engine_with_selector_matches_loop_and_keys_on_configured_batch(tmp_path):
    torch.manual_seed(0)
    model = Stack().double()
    sel = KernelSelector(8, cache_path=tmp_path / "k.json", repeats=1, warmup=0)
    eng = BookKeepingEngine(model, 0.05, selector=sel)
    for B in (5, 3):  # realised chunk sizes differ; the keys use the configured P = 8
        x = torch.randn(B, 12, 16, dtype=torch.float64)
        grads = per_example_grads(model, _loss, (x,), B)
        assert_close(eng.clipped_sums(_loss, (x,)).sums, reference_clipped_sum(model, grads, 0.05))
        if B == 5:
            first = dict(sel.choices)
            used = {k: dict(v) for k, v in eng.kernels_used.items()}
    assert sel.choices.keys() == first.keys()  # nothing re-measured for the second chunk size
    assert {k: dict(v) for k, v in eng.kernels_used.items()} == used  # the choice never changes within a run
    keys = list(sel.choices)
    assert all("P=8" in k and "float64 cpu" in k for k in keys)
    assert not any("P=5" in k or "P=3" in k for k in keys)
    # distinct public shapes: q/k/v/o (16->16, no bias vs bias), ff (16->32), the LayerNorm
    ops = {k.split()[0] for k in keys}
    assert ops == {"linear_sqnorm", "linear_clipped_sum", "norm_affine_grads"}
    assert len(sel.summary().splitlines()) == len(keys)
    assert eng.kernels_used["q"]["linear_sqnorm"] in {c.choice for c in sel.choices.values()}
    # the engine's report of the norm method follows what ran
    assert eng.methods["q"] == eng.kernels_used["q"]["linear_sqnorm"].split("/")[1]


def test_engine_explicit_backend_with_selector_chooses_only_its_methods():
    torch.manual_seed(1)
    model = Stack().double()
    sel = KernelSelector(4, repeats=1, warmup=0)
    eng = BookKeepingEngine(model, 0.05, backend="torch", selector=sel)
    x = torch.randn(4, 9, 16, dtype=torch.float64)
    grads = per_example_grads(model, _loss, (x,), 4)
    assert_close(eng.clipped_sums(_loss, (x,)).sums, reference_clipped_sum(model, grads, 0.05))
    assert all(v.startswith("torch") for d in eng.kernels_used.values() for k, v in d.items() if k != "group")
    assert eng.kernels_used["q"]["group"] == "q+k+v"  # q, k, v read the same LayerNorm output
    assert all(k.endswith("backend=torch") for k in sel.choices if k.startswith("linear_sqnorm"))


def test_trainer_with_a_huge_physical_batch_on_a_tiny_set_measures_at_most_n_rows(tmp_path, monkeypatch):
    """`dpldm finetune` with privacy.physical_batch_size=200000 on N = 40 private examples: the set-up
    probe's kernel measurements use at most N rows (the spy refuses more before anything is timed)."""
    import dpldm.kernels.selection as selection
    from dpldm.cli import main
    from test_bad_inputs import N, Env, ft

    rows: list[int] = []

    def spy(op, P, *a, **k):
        rows.append(P)
        assert P <= N, f"kernel selection measures {P} rows for a private set of N = {N}"
        return synthetic_inputs(op, P, *a, **k)

    monkeypatch.setattr(selection, "synthetic_inputs", spy)
    env = Env(tmp_path)
    assert main(ft(env, tmp_path / "run", sets=("privacy.physical_batch_size=200000",))) == 0
    assert rows and max(rows) <= N
