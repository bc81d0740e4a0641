"""Per-example independence is checked, not assumed (issue 28 item 3; dpldm.privacy.independence).

A model that mixes the rows of a batch (`h - h.mean(0)`) passes every per-layer rule, yet adding one
example moves another example's clipped gradient: the neighbouring-dataset bound fails. The set-up
probe of the engine, of DPStep and of the trainer refuses such a model on a public batch, before any
private data is read; a clean model passes with a difference at rounding level."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from dpldm.privacy.accountant import PrivacyLedger
from dpldm.privacy.dp_step import DPStep
from dpldm.privacy.engine import BookKeepingEngine
from dpldm.privacy.batches import pad_rows, select_rows
from dpldm.privacy.independence import ExampleMixingError, check_independence
from dpldm.privacy.sampler import PoissonPlan
from dpldm.train.dp_finetune import FinetuneOptions, Trainer, train
import test_privacy_path
from test_privacy_path import _Head, _sq_loss, cfg_for

world = test_privacy_path.world  # the fixture, shared with test_privacy_path

C = 0.01


class _Center(nn.Module):
    """Subtracts the batch mean: each example's output depends on every other example."""

    def forward(self, h):
        return h - h.mean(0, keepdim=True)


def _flat(sums):
    return torch.cat([s.flatten() for s in sums.values()]).double()


def test_mixing_breaks_the_neighbour_bound_that_the_check_protects():
    """The negative control: with the mix, adding example 3 moves the clipped sum by far more than C
    (the DP bound fails); without it, by at most C. This is what the probe must refuse."""
    torch.manual_seed(0)
    x = torch.randn(4, 4)
    for extra, broken in ((_Center(), True), (nn.Identity(), False)):
        engine = BookKeepingEngine(_Head(extra), C)
        small = _flat(engine.clipped_sums(_sq_loss, x[:3], acc_dtype=torch.float64).sums)
        big = _flat(engine.clipped_sums(_sq_loss, x, acc_dtype=torch.float64).sums)
        moved = float((big - small).norm())
        assert (moved > 1.05 * C) if broken else (moved <= C * (1 + 1e-6)), (extra, moved)


def test_engine_probe_refuses_a_model_that_mixes_examples():
    x = torch.randn(3, 4)
    with pytest.raises(ExampleMixingError, match="mixes examples.*3 examples"):
        BookKeepingEngine(_Head(_Center()), C).probe(_sq_loss, x)
    BookKeepingEngine(_Head(nn.Identity()), C).probe(_sq_loss, x)  # a clean model passes
    BookKeepingEngine(_Head(_Center()), C).probe(_sq_loss, x[:1])  # one example cannot show a mix


def test_check_reports_rounding_level_for_a_clean_model_and_order_of_c_for_a_mix():
    x = torch.randn(5, 4)
    clean = BookKeepingEngine(_Head(nn.Identity()), C)
    ratio = check_independence(lambda b: clean.clipped_sums(_sq_loss, b, acc_dtype=torch.float64).sums, x, C)
    assert ratio < 1e-5
    mixed = BookKeepingEngine(_Head(_Center()), C)
    with pytest.raises(ExampleMixingError) as err:
        check_independence(lambda b: mixed.clipped_sums(_sq_loss, b, acc_dtype=torch.float64).sums, x, C)
    assert "differs from the sum of each example's clipped gradient computed alone" in str(err.value)


def test_dpstep_probe_refuses_a_mixing_model():
    model = _Head(_Center())
    ledger = PrivacyLedger(plan=PoissonPlan(num_examples=10, sample_rate=0.5, seed=0), noise_multiplier=1.0,
                           max_grad_norm=C, delta=1e-5)
    dp = DPStep(model, _sq_loss, ledger)
    with pytest.raises(ExampleMixingError):
        dp.probe(torch.randn(3, 4))
    assert ledger.steps_done == 0 and dp.phase == "idle"


@dataclass
class _Batch:
    z: torch.Tensor
    y: torch.Tensor
    step: int


def test_select_rows_keeps_structure():
    b = _Batch(torch.arange(6.0).view(3, 2), torch.tensor([7, 8, 9]), 4)
    one = select_rows(b, torch.tensor([1]), 3)
    assert one.z.tolist() == [[2.0, 3.0]] and one.y.tolist() == [8] and one.step == 4
    t = select_rows((torch.arange(3), {"k": torch.zeros(3, 1), "s": "x"}, torch.zeros(2)), torch.tensor([2]), 3)
    assert t[0].tolist() == [2] and t[1]["k"].shape == (1, 1) and t[1]["s"] == "x" and t[2].shape == (2,)
    padded = pad_rows(b, 3, 5)
    assert padded.z.shape == (5, 2) and padded.z[3:].abs().sum() == 0 and padded.y.tolist() == [7, 8, 9, 0, 0]
    assert padded.step == 4


def test_trainer_refuses_a_unet_that_mixes_examples(world, monkeypatch):  # noqa: F811
    """Through the trainer: a UNet whose output is centred over the batch is refused at set-up, before
    any private chunk is loaded; the run folder is left as it was."""
    from dpldm.models.unet import UNet

    real = UNet.forward
    monkeypatch.setattr(UNet, "forward", lambda self, x, t, y: (lambda e: e - e.mean(0, keepdim=True))(
        real(self, x, t, y)))
    loads = []
    monkeypatch.setattr(Trainer, "load", lambda self, idx: loads.append(idx) or pytest.fail("private chunk loaded"))
    out = world["root"] / "mixing"
    cfg = cfg_for(world, out, "privacy.backend=\"torch\"", "train.wandb=false")
    with pytest.raises(ExampleMixingError, match="mixes examples"):
        train(cfg, FinetuneOptions(out=out, init=str(world["public"])))
    assert not loads and not out.exists()
