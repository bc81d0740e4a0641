"""Poisson subsampling plan: at step s every one of the N private examples is included
independently with probability q. This is the sampling Opacus' accountants assume.

The plan is a pure function of (seed, step): every rank derives the same global sample without
communication, a resumed run continues the same plan, and each rank reads only its share.
`seed=None` draws the seed from the OS (secrets); it is kept in the privacy ledger so a resumed
run continues the plan. The seed is private state, like the data: never publish it.
"""
from __future__ import annotations

import secrets

import torch

_STEP_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: decorrelates consecutive step seeds


def os_seed() -> int:
    return secrets.randbits(63)


class PoissonPlan:
    def __init__(self, num_examples: int, sample_rate: float, seed: int | None = None):
        if num_examples < 1:
            raise ValueError(f"Poisson sampling needs at least one private example, got N={num_examples}")
        if not (0.0 < sample_rate <= 1.0):
            raise ValueError(f"sample rate q must lie in (0, 1], got {sample_rate}")
        self.num_examples = int(num_examples)
        self.sample_rate = float(sample_rate)
        self.seed = os_seed() if seed is None else int(seed)

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.num_examples  # the public denominator q*N

    def _generator(self, step: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + (step + 1) * _STEP_MIX) % (2**63 - 1))
        return g

    def indices(self, step: int) -> torch.Tensor:
        """Sorted int64 indices of the examples in the logical batch of `step` (may be empty)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        keep = torch.rand(self.num_examples, generator=self._generator(step), dtype=torch.float64) < self.sample_rate
        return keep.nonzero(as_tuple=False).flatten()  # (realised batch size,)

    @staticmethod
    def rank_share(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        """This rank's disjoint slice of a global sample (strided, so shares differ by <= 1)."""
        if not (0 <= rank < world_size):
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        return indices[rank::world_size]

    def state_dict(self) -> dict:
        return {"num_examples": self.num_examples, "sample_rate": self.sample_rate, "seed": self.seed}

    @classmethod
    def from_state_dict(cls, state: dict) -> "PoissonPlan":
        return cls(state["num_examples"], state["sample_rate"], state["seed"])
