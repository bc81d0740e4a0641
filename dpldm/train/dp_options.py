"""What a DP fine-tuning run is asked to do beyond its recipe (FinetuneOptions: run folder, init,
resume mode, launcher options), and the checks that fail closed on privacy before any work."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from dpldm.config import RunConfig
from dpldm.errors import UserError

RESUME_MODES = ("never", "auto", "must")


@dataclass
class FinetuneOptions:
    out: Path
    init: str | None = None  # public LDM folder; default train.init_checkpoint, else the shipped glyph model
    # never (False): checkpoints in `out` are refused; must (True, `dpldm finetune --resume`): `out` must hold a
    # step checkpoint to continue from, else refused (a fresh run would start with a full budget); auto
    # (launch/train.py's default): continue from the newest checkpoint if there is one, else start a new run
    resume: bool | str = False
    max_steps: int | None = None  # stop (checkpoint, exit 0) after this many logical steps of this invocation
    zero: str = "0"  # several ranks: ZeRO stage 0-3 or a DeepSpeed JSON
    dist_backend: str = "auto"  # several ranks: auto | gloo | nccl
    synthetic_latents: int = 0  # smoke runs: random latents instead of data.private (NOT private data)
    random_init: bool = False  # smoke runs: a randomly initialised model instead of the public one
    check_every: int = 0  # several ranks: check the replicas are bit-identical every K steps
    verbose: bool = True
    command: str = "dpldm finetune"  # what the user ran: the stop message says how to resume it
    allow_older_checkpoint: bool = False  # a corrupt newest checkpoint: fall back (re-run steps, journal them)
    collective_timeout_s: float = 1800.0  # several ranks: how long a collective waits for its peers

    def __post_init__(self) -> None:
        if isinstance(self.resume, bool):
            self.resume = "must" if self.resume else "never"
        if self.resume not in RESUME_MODES:
            raise UserError(f"resume must be one of {RESUME_MODES} (or a bool), got {self.resume!r}")


# -- checks that fail closed on privacy ------------------------------------------------------------

def check_privacy_settings(cfg: RunConfig) -> None:
    """Refuse configurations whose privacy claim would be false (before any work)."""
    tc, pc = cfg.train, cfg.privacy
    if not pc.enabled:
        raise UserError("privacy.enabled = false: this is the DP fine-tuning trainer; use `dpldm/experiments/utility.py` for the "
                        "non-private ceiling")
    if tc.deterministic and not tc.not_private:
        raise UserError("train.deterministic = true seeds the noise, the Poisson sampling and the diffusion draws from "
                        "train.seed, which is saved with the run: anyone holding the config can remove the noise, so "
                        "the run is NOT private. For tests and reproducible debugging pass --not-private "
                        "(train.not_private = true); epsilon is then reported as infinite")
    if tc.deterministic and pc.secure_noise:
        raise UserError("train.deterministic = true and privacy.secure_noise = true contradict each other: secure noise "
                        "is seeded from the OS")


def check_explicit_sigma(pc, ledger) -> None:
    """An explicit noise_multiplier must not spend more than the target epsilon."""
    from dpldm.privacy.accountant import PrivacyParameterError

    if pc.noise_multiplier is None or pc.epsilon is None:
        return
    eps = ledger.epsilon_after(pc.steps)
    if eps > pc.epsilon * (1 + 1e-9):
        raise PrivacyParameterError(
            f"privacy.noise_multiplier={pc.noise_multiplier:g} spends epsilon {eps:.4g} after {pc.steps} steps at "
            f"q={ledger.sample_rate:.4g}, delta={pc.delta:g}, above the target privacy.epsilon={pc.epsilon:g}: raise "
            f"privacy.epsilon to at least {math.ceil(eps * 1000) / 1000:g} to accept that, or raise the noise / "
            "lower the steps (or leave noise_multiplier unset: it is then calibrated for the target)")
