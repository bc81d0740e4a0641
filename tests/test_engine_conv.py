"""Conv2d rule of the book-keeping engine against the float64 per-example loop of test_engine.py.

A Conv2d is clipped as a Linear on its unfolded input; these tests check the clipped sums
(relative 1e-6 in float64) over kernel/stride/padding/bias/B/K, a whole tiny UNet trained
with finetune="all", a small CNN classifier, and the set-up refusals.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpldm.privacy import (BookKeepingEngine, NonFiniteGradientError, RowMismatchError, UnsupportedLayerError,
                           clipped_gradient_sum)
from helpers import assert_close, norms_of, per_example_grads, reference_clipped_sum, repeat_k, unet_k_case

DT = torch.float64


def _median_clip(grads):
    norms = sorted(norms_of(grads))
    return norms[len(norms) // 2] if norms else 1.0  # some examples clipped, some not


def _check(model, loss_fn, batch, B, **kw):
    grads = per_example_grads(model, loss_fn, batch, B)
    C = _median_clip(grads)
    got = clipped_gradient_sum(model, loss_fn, batch, C, **kw)
    assert_close(got, reference_clipped_sum(model, grads, C))
    for p in model.parameters():
        assert p.grad is None
    return got


class ConvNet(nn.Module):
    """conv (the layer under test) -> tanh -> fixed random read-out: a non-trivial per-position G."""

    def __init__(self, k, stride, padding, bias, c_in=3, c_out=4, **conv_kw):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, bias=bias, **conv_kw)
        self.register_buffer("w", torch.randn(c_out, 1, 1))

    def forward(self, x):  # (R, 3, H, W) -> (R,)
        return (torch.tanh(self.conv(x)) * self.w).pow(2).sum(dim=(1, 2, 3))


def _k_loss(K, shift):
    def loss_fn(m, b):
        return m(repeat_k(b[0], K, shift)).view(-1, K).mean(dim=1)  # K copies averaged before clipping
    return loss_fn


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("B", [0, 1, 5])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k,stride,padding", [(1, 1, 0), (1, 2, 0), (3, 1, 1), (3, 2, 1), (3, 1, 0), (3, 2, 0),
                                              (1, 1, 1)])
def test_conv_clipped_sum_matches_per_example_loop(k, stride, padding, bias, B, K):
    torch.manual_seed(10 * B + K + 100 * k + stride)
    model = ConvNet(k, stride, padding, bias).to(DT)
    x, shift = torch.randn(B, 3, 6, 7, dtype=DT), torch.randn(K, 3, 6, 7, dtype=DT) * 0.3
    _check(model, _k_loss(K, shift), (x,), B)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("method", ["ghost", "materialize"])
@pytest.mark.parametrize("conv_kw", [dict(k=3, stride=1, padding="same"), dict(k=(2, 4), stride=1, padding="same"),
                                     dict(k=(2, 3), stride=(2, 1), padding=(1, 0)),
                                     dict(k=3, stride=1, padding=2, dilation=2), dict(k=3, stride=2, padding="valid")])
def test_conv_general_shapes_and_forced_methods(conv_kw, method):
    """Rectangular kernels, asymmetric 'same' (even kernel), dilation; both norm paths, K=2."""
    torch.manual_seed(7)
    kw = dict(conv_kw)
    model = ConvNet(kw.pop("k"), kw.pop("stride"), kw.pop("padding"), True, **kw).to(DT)
    x, shift = torch.randn(4, 3, 7, 6, dtype=DT), torch.randn(2, 3, 7, 6, dtype=DT) * 0.3
    _check(model, _k_loss(2, shift), (x,), 4, norm_method=method)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_forward_output_bit_identical_and_input_grad():
    """The captured forward is F.conv2d exactly as nn.Conv2d calls it (bit-identical output);
    the input gradient it passes on equals autograd's."""
    torch.manual_seed(0)
    for dt in (torch.float32, DT):
        for conv in (nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(3, 5, 3, stride=2, bias=False),
                     nn.Conv2d(3, 5, (2, 4), padding="same")):
            conv = conv.to(dt)
            x = torch.randn(4, 3, 9, 8, dtype=dt, requires_grad=True)
            want = conv(x)
            (want_gx,) = torch.autograd.grad(want.pow(2).sum(), x)
            eng = BookKeepingEngine(nn.Sequential(conv), 1.0)
            with eng._capture():
                got = conv(x)
                (gx,) = torch.autograd.grad(got.pow(2).sum(), x)
            eng._reset()
            assert torch.equal(got, want)
            assert torch.allclose(gx, want_gx, rtol=1e-12 if dt == DT else 1e-5, atol=1e-12 if dt == DT else 1e-6)


def test_tiny_unet_finetune_all():
    """A whole tiny UNet with every parameter trainable (Conv2d, Linear, GroupNorm, LayerNorm,
    Embedding), K=2 noises per example, against the per-example loop."""
    from dpldm.config import UNetConfig
    from dpldm.models.selection import apply_finetune
    from dpldm.models.unet import UNet

    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=2, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1),
                     num_heads=2, context_dim=8, num_classes=3)
    unet = UNet(cfg).to(DT)
    names = apply_finetune(unet, "all")
    assert any(isinstance(m, nn.Conv2d) for m in unet.modules())
    unet.time_embed.register_forward_pre_hook(lambda m, args: (args[0].to(DT),))  # sinusoid is built in fp32
    loss_fn, (z, y, t), B = unet_k_case(unet, DT)  # re-drawn weights: zero-initialised output convs
    got = _check(unet, loss_fn, (z, y, t), B)
    assert set(got) == set(names)
    assert any(n.endswith(".weight") and got[n].dim() == 4 for n in got)  # conv weights are in the sums


def test_small_cnn_classifier():
    """The downstream-accuracy CNN (conv-ReLU-maxpool x2 + MLP) with cross-entropy."""
    from dpldm.eval.classifier import SmallCNN

    torch.manual_seed(1)
    net = SmallCNN(1, (16, 16), 10, channels=(4, 6), hidden=12, dropout=0.0).to(DT)
    x, yl = torch.randn(6, 1, 16, 16, dtype=DT), torch.randint(0, 10, (6,))
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    _check(net, loss_fn, (x, yl), 6)


def test_conv_called_twice_and_partially_frozen():
    """One conv applied twice (weight sharing: calls concatenate), and frozen weight / bias."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.down = nn.Conv2d(3, 2, 3, stride=2)

        def forward(self, x):
            h = self.conv(torch.tanh(self.conv(x)))
            return self.down(h).pow(2).sum(dim=(1, 2, 3))

    torch.manual_seed(2)
    model = Twice().to(DT)
    x, shift = torch.randn(5, 3, 7, 7, dtype=DT), torch.randn(3, 3, 7, 7, dtype=DT) * 0.3
    for method in ("ghost", "materialize"):
        _check(model, _k_loss(3, shift), (x,), 5, norm_method=method)
    model.conv.weight.requires_grad_(False)
    model.down.bias.requires_grad_(False)
    got = _check(model, _k_loss(3, shift), (x,), 5)
    assert set(got) == {"conv.bias", "down.weight"}


def test_auto_method_recorded_for_conv():
    from dpldm.kernels import choose_method, resolve_backend

    conv = nn.Conv2d(2, 3, 3, padding=1).to(DT)
    eng = BookKeepingEngine(nn.Sequential(conv), 1.0, backend="torch")
    x = torch.randn(2, 2, 5, 5, dtype=DT)
    eng.clipped_sums(lambda m, b: m(b[0].repeat_interleave(2, 0)).pow(2).sum(dim=(1, 2, 3)).view(-1, 2).sum(1), (x,))
    assert eng.methods["0"] == choose_method(2 * 25, 18, 3, resolve_backend("torch"))


def test_conv_nonfinite_drop_and_rows():
    torch.manual_seed(3)
    model = ConvNet(3, 1, 1, True).to(DT)
    x = torch.randn(4, 3, 5, 5, dtype=DT)
    x[1, 0, 2, 2] = float("nan")  # example 1's input (and so its loss and gradient) is NaN
    loss_fn = _k_loss(2, torch.randn(2, 3, 5, 5, dtype=DT))
    with pytest.raises(NonFiniteGradientError, match="per-example (losses|gradients) are NaN/inf"):
        clipped_gradient_sum(model, loss_fn, (x,), 0.5)
    got = clipped_gradient_sum(model, loss_fn, (x,), 0.5, nonfinite="drop")
    good = torch.tensor([0, 2, 3])
    assert_close(got, reference_clipped_sum(model, per_example_grads(model, loss_fn, (x[good],), 3), 0.5))

    with pytest.raises(RowMismatchError, match=r"'conv' \(Conv2d\).*5 rows for a batch of 4"):
        clipped_gradient_sum(model, lambda m, b: m(torch.cat([b[0], b[0][:1]]))[:4], (x[good.tolist() + [0]],), 1.0)


def test_conv_refusals_name_the_module():
    for bad, match in ((nn.Conv2d(4, 4, 3, groups=2), r"conv layer 'body\.0'.*groups=2"),
                       (nn.Conv2d(4, 4, 3, groups=4), r"'body\.0'.*groups=4"),
                       (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), r"'body\.0'.*padding_mode='reflect'")):
        model = nn.Module()
        model.body = nn.Sequential(bad, nn.Flatten())
        with pytest.raises(UnsupportedLayerError, match=match):
            BookKeepingEngine(model, 1.0)
        bad.requires_grad_(False)
        model.head = nn.Linear(2, 1)
        BookKeepingEngine(model, 1.0)  # frozen, it is fine

    class OwnConv(nn.Conv2d):
        def _conv_forward(self, input, weight, bias):  # noqa: A002
            return super()._conv_forward(input, weight * 2, bias)

    with pytest.raises(UnsupportedLayerError, match="_conv_forward"):
        BookKeepingEngine(nn.Sequential(OwnConv(2, 2, 1)), 1.0)
    for other in (nn.Conv1d(2, 2, 3), nn.ConvTranspose2d(2, 2, 3), nn.Conv3d(2, 2, 3)):
        with pytest.raises(UnsupportedLayerError, match=type(other).__name__):
            BookKeepingEngine(nn.Sequential(other), 1.0)


@pytest.mark.parametrize("backend", ["torch", "auto", "cpp", "triton", "cuda"])
def test_conv_backends(backend):
    """The conv rule's (non-contiguous, unfolded) A through every available kernel backend;
    triton/cuda take fp32 only: fp32 engine vs the fp64 loop at rel 1e-4."""
    from dpldm.kernels import available_backends

    if backend not in ("auto",) + tuple(available_backends()):
        pytest.skip(f"backend {backend!r} not available here")
    torch.manual_seed(4)
    model = ConvNet(3, 2, 1, True).to(DT)
    x, shift = torch.randn(5, 3, 8, 7, dtype=DT), torch.randn(2, 3, 8, 7, dtype=DT) * 0.3
    loss_fn = _k_loss(2, shift)
    grads = per_example_grads(model, loss_fn, (x,), 5)
    C = _median_clip(grads)
    want = reference_clipped_sum(model, grads, C)
    fp32 = backend in ("triton", "cuda")
    m32 = ConvNet(3, 2, 1, True)
    m32.load_state_dict(model.state_dict())
    for method in ("ghost", "materialize"):
        if fp32:
            got = clipped_gradient_sum(m32, _k_loss(2, shift.float()), (x.float(),), C, norm_method=method,
                                       backend=backend)
            assert_close({n: t.double() for n, t in got.items()}, want, rel=1e-4)
        else:
            assert_close(clipped_gradient_sum(model, loss_fn, (x,), C, norm_method=method, backend=backend), want)
