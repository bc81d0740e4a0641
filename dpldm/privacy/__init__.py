"""DP-SGD for dpldm: book-keeping per-example clipping, Poisson sampling, noise, accounting.

    from dpldm.privacy import PrivacyLedger, DPStep, GaussianNoise, World, clipped_gradient_sum

See `dp_step.py` for the call sequence of one logical step.
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
