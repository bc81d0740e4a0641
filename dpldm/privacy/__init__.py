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
import importlib

# name -> module: imported on first use (PEP 562), so `dpldm privacy` (accounting only) does not
# load the engine, the kernels or torch's autograd machinery
_LAZY = {
    "PrivacyLedger": "accountant", "PrivacyParameterError": "accountant", "calibrate_noise": "accountant",
    "compute_epsilon": "accountant",
    "DPStep": "dp_step", "DPStepOrderError": "dp_step", "World": "dp_step",
    "BookKeepingEngine": "engine", "NonFiniteGradientError": "engine", "RowMismatchError": "engine",
    "UnsupportedLayerError": "engine", "clipped_gradient_sum": "engine",
    "GaussianNoise": "noise", "PoissonPlan": "sampler",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'dpldm.privacy' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"dpldm.privacy.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
