"""The DP engine under bf16 autocast (fp32 parameters): fp32 norms, factors and sums from the
SAME bf16 inputs, so every example's clipped contribution has norm <= C.

References: the fp32 model without autocast (the sums agree to bf16 forward/backward rounding),
a float64 per-example loop over the (A, G) the rules recorded, and the norm of the engine's own
output on one example (its clipped contribution). CPU autocast here; the same checks on a GPU,
with every GPU backend, at the end (skipped with "needs a CUDA GPU" elsewhere).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpldm.kernels as K
from dpldm.kernels.linear import split_bf16
from dpldm.privacy import BookKeepingEngine
from dpldm.privacy.layers import LinearRule
from dpldm.privacy.recording_fns import autocast_input_dtype
from helpers import make, rel

C = 0.02  # below every example's gradient norm here: all examples are clipped


class AttnStack(nn.Module):
    """Class embedder + GroupNorm + proj_in + LN/self-attention (q, k, v, out) + LN/GEGLU-FF + proj_out,
    like one SpatialTransformer of the demo UNet, on (R, 16, 4, 4) feature maps."""

    def __init__(self, c=16, heads=2, n_cls=5):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(n_cls, c)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.norm = nn.GroupNorm(4, c)
        self.proj_in = nn.Linear(c, c)
        self.ln1, self.ln2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.q, self.k, self.v = (nn.Linear(c, c, bias=False) for _ in range(3))
        self.o = nn.Linear(c, c)
        self.ff1, self.ff2 = nn.Linear(c, 4 * c), nn.Linear(2 * c, c)
        self.proj_out = nn.Linear(c, c)

    def forward(self, x, y):  # x (R, C, H, W), y (R,) -> (R,)
        b, c, h, w = x.shape
        x = self.conv(x) + self.emb(y)[:, :, None, None]
        t = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (R, HW, C)
        n = self.ln1(t)
        q, k, v = (m(n).view(b, h * w, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // self.heads), dim=-1) @ v  # (R, heads, HW, d)
        t = t + self.o(a.transpose(1, 2).reshape(b, h * w, c))
        val, gate = self.ff1(self.ln2(t)).chunk(2, dim=-1)
        t = t + self.ff2(val * F.gelu(gate))
        out = x + self.proj_out(t).transpose(1, 2).reshape(b, c, h, w)
        return (out - 0.5).pow(2).mean(dim=(1, 2, 3))


def _model(seed=0):
    torch.manual_seed(seed)
    m = AttnStack()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def _batch(B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 16, 4, 4, generator=g), torch.randint(0, 5, (B,), generator=g)


def fp32_loss(m, b):
    return m(*b)


def bf16_loss(m, b):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return m(*b).float()


def _total_rel(got: dict, want: dict) -> float:
    num = math.sqrt(sum(float((got[n].double() - want[n].double()).pow(2).sum()) for n in want))
    den = math.sqrt(sum(float(want[n].double().pow(2).sum()) for n in want))
    return num / den


def _norm(sums: dict) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in sums.values()))


# ---- the rules record bf16 and the forward is autocast's own ---------------------------------------
def test_forward_under_autocast_is_bit_identical_and_records_bf16():
    model = _model()
    batch = _batch(6)
    want = bf16_loss(model, batch)
    eng = BookKeepingEngine(model, C, group_shared_inputs=False)  # spies on each rule's own records
    seen = {}
    for rule in eng.rules:
        orig = rule.sqnorm

        def spy(B, *, _r=rule, _orig=orig, **kw):
            c = _r.done_calls()[0]
            a = c.a[0] if isinstance(c.a, tuple) else c.a
            seen[_r.name] = (a.dtype, c.g.dtype)
            return _orig(B, **kw)
        rule.sqnorm = spy
    got = {}

    def loss(m, b):
        got["loss"] = bf16_loss(m, b)
        return got["loss"]

    res = eng.clipped_sums(loss, batch)
    assert torch.equal(got["loss"], want)  # the capture changes nothing in the autocast forward
    assert seen["q"] == (torch.bfloat16, torch.bfloat16) and seen["ff2"] == (torch.bfloat16, torch.bfloat16)
    assert seen["ln1"][0] == torch.bfloat16  # CPU autocast runs LayerNorm in its input dtype
    assert seen["norm"][0] == torch.float32 and seen["proj_in"][0] == torch.float32  # conv(bf16) + emb(fp32) -> fp32
    assert seen["emb"][1] == torch.float32  # embedding output stays fp32 under autocast
    assert all(t.dtype == torch.float32 for t in res.sums.values())


def test_norm_layers_cast_like_autocast_would():
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    assert autocast_input_dtype("layer_norm", x) == torch.bfloat16  # autocast off
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for op, f in (("layer_norm", lambda t: F.layer_norm(t, (8,))), ("group_norm", lambda t: F.group_norm(t, 1))):
            assert autocast_input_dtype(op, x) == f(x).dtype


# ---- sums agree with the fp32 model; contributions never exceed C ---------------------------------------
@pytest.mark.parametrize("backend", ["auto", "torch"] + (["cpp"] if "cpp" in K.available_backends("cpu") else []))
def test_bf16_clipped_sums_match_fp32_within_1e_2(backend):
    model = _model()
    batch = _batch(8)
    ref = BookKeepingEngine(model, C, backend=backend).clipped_sums(fp32_loss, batch).sums
    got = BookKeepingEngine(model, C, backend=backend).clipped_sums(bf16_loss, batch, acc_dtype=torch.float32).sums
    assert all(t.dtype == torch.float32 for t in got.values())
    assert _total_rel(got, ref) < 1e-2, _total_rel(got, ref)
    for n in ("q.weight", "ff2.weight", "emb.weight", "norm.weight", "conv.weight"):
        assert rel(got[n], ref[n]) < 3e-2, (n, rel(got[n], ref[n]))


@pytest.mark.parametrize("backend", ["auto", "torch"] + (["cpp"] if "cpp" in K.available_backends("cpu") else []))
def test_each_clipped_contribution_has_norm_at_most_C(backend):
    """One example per chunk: the engine's output IS that example's clipped contribution; its norm
    (float64, from the output) is C: never above C*(1+1e-3)."""
    model = _model()
    x, y = _batch(6, seed=5)
    eng = BookKeepingEngine(model, C, backend=backend)
    for i in range(6):
        s = eng.clipped_sums(bf16_loss, (x[i:i + 1], y[i:i + 1])).sums
        n = _norm(s)
        assert n <= C * (1 + 1e-3) and n >= C * (1 - 1e-3), (i, n / C)


def test_factors_and_sums_come_from_the_recorded_bf16_inputs():
    """Independent float64 loop over the (A, G) the Linear rules recorded (bf16): the per-example
    norm the engine clipped with equals the loop's, so c_i * ||g_i|| <= C; and each Linear's clipped
    sum equals sum_i c_i G_i^T A_i of those same inputs (not of fp32 or re-rounded ones)."""
    model = _model()
    batch = _batch(7, seed=3)
    eng = BookKeepingEngine(model, C, backend="torch", group_shared_inputs=False)  # per-rule records
    rec = {}
    for rule in eng.rules:
        orig = rule.clipped_sums

        def spy(coef, keep, *, _r=rule, _orig=orig, **kw):
            rec[_r.name] = (coef.clone(), _r._prep)
            return _orig(coef, keep, **kw)
        rule.clipped_sums = spy
    sums = eng.clipped_sums(bf16_loss, batch).sums
    coef = next(iter(rec.values()))[0].double()  # (B,) the clipping factors, fp32
    sq = torch.zeros(7, dtype=torch.float64)
    for rule in eng.rules:
        _, prep = rec[rule.name]
        if isinstance(rule, LinearRule):
            A, G = prep
            assert A.dtype == torch.bfloat16 or rule.name == "proj_in"  # proj_in's input is GroupNorm's
            A, G = A.double(), G.double()
            per_ex = torch.einsum("bto,bti->boi", G, A)  # (B, d_out, d_in) in float64
            sq += per_ex.pow(2).sum(dim=(1, 2))
            if "bias" in rule.trainable:
                sq += G.sum(dim=1).pow(2).sum(dim=1)
            want = torch.einsum("b,boi->oi", coef, per_ex)
            assert rel(sums[f"{rule.name}.weight"], want) < 1e-5, rule.name
        elif prep is not None and not isinstance(prep, list):  # norm layers: (gw, gb) (B, C), emb: (idx, G)
            if rule.name == "emb":
                idx, G = prep
                same = (idx[:, :, None] == idx[:, None, :]).double()
                Gd = G.double()
                sq += (same * (Gd @ Gd.transpose(1, 2))).sum(dim=(1, 2))
            else:
                sq += sum(t.double().pow(2).sum(dim=1) for t in prep)
        else:  # conv: recompute its per-example grads in float64 from the recorded calls
            call = prep[0]
            xin = call.a.double()
            g = call.g.double()
            per = [torch.autograd.grad(F.conv2d(xin[i:i + 1].requires_grad_(False), w, None, 1, 1), w, g[i:i + 1])[0]
                   for i, w in ((i, rule.module.weight.detach().double().requires_grad_(True)) for i in range(7))]
            sq += torch.stack([p.pow(2).sum() for p in per]) + g.sum(dim=(2, 3)).pow(2).sum(dim=1)
    norms = sq.sqrt()
    assert (coef * norms <= C * (1 + 1e-3)).all(), (coef * norms / C)
    assert rel(torch.minimum(torch.ones_like(norms), C / (norms + 1e-6)), coef) < 1e-3


# ---- kernels: the bf16 hi/lo split used on tensor cores ---------------------------------------------------
def test_split_bf16_is_exact_to_2e_minus_16():
    x = torch.randn(1000) * torch.logspace(-8, 3, 1000)
    hi, lo = split_bf16(x)
    assert hi.dtype == lo.dtype == torch.bfloat16
    assert ((hi.float() + lo.float() - x).abs() <= x.abs() * 2.0 ** -16).all()


def test_split_clipped_sum_keeps_contributions_within_C():
    """The tensor-core clipped sum (c*G in fp32 -> bf16 hi + lo, fp32 accumulation), run on CPU with
    the same arithmetic: equal to the float64 sum of the same bf16 inputs to 1e-5, and each example's
    contribution (one-hot coef) has norm <= C (1 + 1e-5) when c_i = C / ||g_i||."""
    A, G, _, _ = make(6, 33, 40, 24, dtype=torch.bfloat16, seed=4)
    norms = K.per_example_sqnorm_linear_torch(A, G, bias=True, method="materialize").sqrt()  # fp32 from bf16
    coef = (0.1 / norms).float()
    W, b = K.clipped_sum_linear_torch(A, G, coef, bias=True, split=True)
    Wr, br = K.clipped_sum_linear_torch(A.double(), G.double(), coef.double(), bias=True)
    assert W.dtype == torch.float32 and rel(W, Wr) < 1e-5 and rel(b, br) < 1e-5
    plain = (G.float() * coef.view(-1, 1, 1)).to(torch.bfloat16)  # what a single bf16 rounding would feed
    Wp = plain.reshape(-1, 24).float().t() @ A.reshape(-1, 40).float()
    assert rel(Wp, Wr) > 10 * rel(W, Wr)  # the split matters
    for i in range(6):
        e = torch.zeros(6)
        e[i] = coef[i]
        Wi, bi = K.clipped_sum_linear_torch(A, G, e, bias=True, split=True)
        n = math.sqrt(float(Wi.double().pow(2).sum() + bi.double().pow(2).sum()))
        assert n <= 0.1 * (1 + 1e-5), n / 0.1


# ---- the same on a GPU (every backend) ---------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda", "auto"])
def test_gpu_bf16_engine(backend):
    from dpldm.kernels import dispatch

    dev = torch.device("cuda")
    if backend == "cuda" and __import__("os").environ.get("DPLDM_SKIP_CUDA_BUILD") == "1":
        pytest.skip("the CUDA extension build was skipped (DPLDM_SKIP_CUDA_BUILD=1)")
    if backend != "auto" and dispatch.why_unavailable(backend, dev) is not None:
        pytest.fail(f"backend {backend} unavailable on the GPU: {dispatch.why_unavailable(backend, dev)}")
    model = _model().to(dev)
    x, y = (t.to(dev) for t in _batch(8))

    def loss16(m, b):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return m(*b).float()

    ref = BookKeepingEngine(model, C, backend="torch").clipped_sums(fp32_loss, (x, y)).sums
    eng = BookKeepingEngine(model, C, backend=backend)
    got = eng.clipped_sums(loss16, (x, y)).sums
    assert _total_rel(got, ref) < 1e-2
    for i in range(4):
        n = _norm(eng.clipped_sums(loss16, (x[i:i + 1], y[i:i + 1])).sums)
        assert C * (1 - 1e-3) <= n <= C * (1 + 1e-3), (backend, i, n / C)
