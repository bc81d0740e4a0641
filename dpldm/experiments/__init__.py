"""The paper's experiments as commands (`dpldm experiment NAME`), one module each; the shared parts
in store (results.json), common (flags, report, statistics), figures (matplotlib) and protocol
(one private run and its evaluation: utility.py). Tuning tools (tune_*.py) choose recipe values on
public data only (docs/tuning.md)."""
from __future__ import annotations

# name -> (module, help); modules are imported only when their experiment runs
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "epsilon": ("dpldm.experiments.epsilon",
                "accuracy and FID against epsilon, ours beside the direct DP-SGD classifier"),
    "ablation": ("dpldm.experiments.ablation", "which attention modules to fine-tune, at epsilon 1, 5 and 10"),
    "batch": ("dpldm.experiments.batch", "large-batch scaling at fixed privacy (expected batch sweep)"),
    "mia": ("dpldm.experiments.mia", "membership inference on the released model against the DP bound"),
    "transfer": ("dpldm.experiments.transfer", "cross-domain transfer: a private set far from the public one"),
}
