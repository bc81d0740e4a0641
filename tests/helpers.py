"""Independent references shared by the kernel and engine tests (imported as `helpers`; pytest puts
tests/ on sys.path)."""
from __future__ import annotations

import math

import torch


# -- kernel cases --------------------------------------------------------------------------------

def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64 (0 for empty tensors)."""
    a, b = a.double().cpu(), b.double().cpu()
    if a.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def make(B, T, d_in, d_out, dtype=torch.float32, masked=False, seed=0):
    """A (B,T,d_in), G (B,T,d_out), an optional 0/1 row mask (B,T) and coefficients (B,)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, T, d_in, generator=g).to(dtype)
    G = torch.randn(B, T, d_out, generator=g).to(dtype)
    mask = (torch.rand(B, T, generator=g) > 0.35).float() if masked else None
    coef = torch.rand(B, generator=g).to(dtype)
    return A, G, mask, coef


# -- the per-example loop the DP engine is checked against ------------------------------------------

def take(batch, i):
    return tuple(t[i:i + 1] for t in batch)


def per_example_grads(model, loss_fn, batch, B):
    """[{name: grad}] per example, each from that example's own loss (batch of one)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = []
    for i in range(B):
        loss = loss_fn(model, take(batch, i))
        assert loss.shape == (1,)
        gs = torch.autograd.grad(loss[0], list(params.values()), allow_unused=True)
        out.append({n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), gs)})
    return out


def norms_of(grads):
    return [math.sqrt(sum(float((t ** 2).sum()) for t in g.values())) for g in grads]


def reference_clipped_sum(model, grads, C):
    """sum_i min(1, C / (||g_i|| + 1e-6)) g_i over the per-example gradients."""
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    for g, norm in zip(grads, norms_of(grads)):
        c = min(1.0, C / (norm + 1e-6))
        for n in total:
            total[n] += c * g[n]
    return total


def assert_close(got, want, rel=1e-6):
    """Relative `rel` per tensor; a tensor whose exact value is ~0 (e.g. a bias feeding a
    per-channel GroupNorm) is compared against the largest entry of the whole gradient."""
    assert set(got) == set(want)
    overall = max([float(t.abs().max()) for t in want.values() if t.numel()] + [1e-30])
    for n in want:
        scale = max(float(want[n].abs().max()), 1e-6 * overall)
        err = float((got[n] - want[n]).abs().max())
        assert err <= rel * scale, f"{n}: max err {err:.3e} vs scale {scale:.3e}"


def repeat_k(x, K, shifts):
    """(B, ...) -> (B*K, ...) contiguous copies, copy k shifted by shifts[k] (deterministic)."""
    xr = x.repeat_interleave(K, dim=0)
    if shifts is not None:
        xr = xr + shifts.repeat(x.shape[0], *([1] * (x.dim() - 1)))
    return xr


def unet_k_case(unet, dtype=torch.float64):
    """A K=2 diffusion-like per-example loss on a tiny UNet (2 latent channels, 8x8): weights
    re-drawn N(0, 0.2) so zero-initialised output layers do not hide gradients.
    Returns (loss_fn, batch, B)."""
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.2)
    B, K = 3, 2
    z = torch.randn(B, 2, 8, 8, dtype=dtype)
    y = torch.tensor([0, 2, 3])  # 3 = the null class of a 3-class UNet
    t = torch.tensor([5, 100, 700])
    shift = torch.randn(K, 2, 8, 8, dtype=dtype) * 0.5

    def loss_fn(m, b):
        zb, yb, tb = b
        out = m(repeat_k(zb, K, shift), tb.repeat_interleave(K), yb.repeat_interleave(K))
        return out.pow(2).mean(dim=(1, 2, 3)).view(-1, K).mean(dim=1)  # (B,): K copies averaged

    return loss_fn, (z, y, t), B
