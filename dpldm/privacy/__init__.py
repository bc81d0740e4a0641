"""DP-SGD for dpldm: book-keeping per-example clipping, Poisson sampling, noise, accounting.

One run (single process; `world=` for several ranks, see dp_step.World):

    from dpldm.privacy import DPStep, GaussianNoise, PrivacyLedger

    ledger = PrivacyLedger.from_config(cfg.privacy, num_examples=N, seed=None)  # sigma calibrated
    #   (or PrivacyLedger.from_state_dict(meta["privacy"]["ledger"]) on resume)
    dp = DPStep(unet, per_example_loss_fn, ledger, noise=GaussianNoise(secure=cfg.privacy.secure_noise),
                optimizer=opt, norm_method=cfg.privacy.norm_method, backend=cfg.privacy.backend)
    while ledger.steps_done < cfg.privacy.steps:
        idx = dp.begin_step()                       # Poisson sample of this step (may be empty)
        for s in range(0, len(idx), physical_batch):
            dp.accumulate(load(idx[s:s + physical_batch]))   # per_example_loss_fn(model, batch) -> (B,)
        dp.step()                                   # noise once, all-reduce, / (q*N), optimizer.step()
        log(epsilon=ledger.epsilon_spent())         # never per-example losses or norms
        save(..., meta={"privacy": dp.state_dict()})  # JSON: the ledger (accountant history, plan)

Noise-free check: `clipped_gradient_sum(model, per_example_loss_fn, batch, C)`.
Accounting alone: `calibrate_noise(eps, delta, q, steps, accountant)`, `compute_epsilon(...)`.
"""
from dpldm.privacy.accountant import (PrivacyLedger, PrivacyParameterError, calibrate_noise,
                                      compute_epsilon)
from dpldm.privacy.dp_step import DPStep, DPStepOrderError, World
from dpldm.privacy.engine import (BookKeepingEngine, NonFiniteGradientError, RowMismatchError,
                                  UnsupportedLayerError, clipped_gradient_sum)
from dpldm.privacy.noise import GaussianNoise
from dpldm.privacy.sampler import PoissonPlan

__all__ = ["BookKeepingEngine", "DPStep", "DPStepOrderError", "GaussianNoise", "NonFiniteGradientError",
           "PoissonPlan", "PrivacyLedger", "PrivacyParameterError", "RowMismatchError", "UnsupportedLayerError",
           "World", "calibrate_noise", "clipped_gradient_sum", "compute_epsilon"]
