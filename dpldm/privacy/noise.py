"""Gaussian noise for DP-SGD: one draw per logical step, from a dedicated generator.

Never the global torch RNG (which model code, dropout or data augmentation also consume and a
user may seed publicly). Modes:
  "os"     (default) a fresh torch.Generator seeded from the OS (`secrets`) for every draw;
  "secure" the CSPRNG `dpldm.kernels.secure_noise.SecureGaussian` when installed; until then
           the "os" generator with a warning (torch's generators are not cryptographically
           secure: an attacker seeing enough raw outputs could in principle recover the state);
  "seeded" a generator seeded from (seed, step): reproducible, identical however the step is
           chunked, so a resumed run continues exactly. ANYONE WHO KNOWS THE SEED CAN SUBTRACT
           THE NOISE: use it for tests and deterministic reruns, keep the seed private.
The noise is drawn in fp32 (fp64 when the accumulators are fp64, as in tests). `draws` counts
draws, so tests can check there is exactly one per logical step.
"""
from __future__ import annotations

import secrets
import warnings

import torch

NOISE_MODES = ("os", "secure", "seeded")
_NOISE_MIX = 0xD1B54A32D192ED03  # decorrelates (seed, step) pairs; distinct from the sampler's mix


def _load_secure():
    try:
        from dpldm.kernels.secure_noise import SecureGaussian  # added by the kernels issue
    except ImportError:
        return None
    return SecureGaussian


class GaussianNoise:
    def __init__(self, *, secure: bool = False, seed: int | None = None) -> None:
        if secure and seed is not None:
            raise ValueError("secure noise takes its seed from the OS; do not pass a seed")
        self.mode = "secure" if secure else ("seeded" if seed is not None else "os")
        self.seed = None if seed is None else int(seed)
        self.draws = 0
        self._secure = None
        if secure:
            cls = _load_secure()
            if cls is None:
                warnings.warn("dpldm.kernels.secure_noise is not available: secure noise falls back to a torch "
                              "generator seeded from the OS for every step (not a CSPRNG)", stacklevel=2)
            else:
                self._secure = cls(seed=None)

    def _generator(self, step: int, device: torch.device) -> torch.Generator:
        g = torch.Generator(device=device)
        if self.mode == "seeded":
            g.manual_seed((self.seed * 1_000_003 + (step + 1) * _NOISE_MIX) % (2**63 - 1))
        else:
            g.manual_seed(secrets.randbits(63))
        return g

    def draw(self, like: list[torch.Tensor], std: float, step: int,
             dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """One draw: N(0, std^2) per coordinate for every tensor in `like` (same shapes and devices;
        `dtype`, default fp64 for fp64 tensors else fp32). Counts as one draw however many tensors
        it covers."""
        if not (std >= 0):
            raise ValueError(f"noise std must be >= 0, got {std}")
        def dtype_of(t: torch.Tensor) -> torch.dtype:
            return torch.float64 if t.dtype == torch.float64 else torch.float32

        wanted = dtype
        out = []
        gens: dict[torch.device, torch.Generator] = {}
        for t in like:
            dtype = dtype_of(t) if wanted is None else wanted
            if self._secure is not None:
                z = self._secure.normal(tuple(t.shape), std, dtype)
                out.append(torch.as_tensor(z).to(device=t.device, dtype=dtype))
                continue
            dev = t.device
            if dev not in gens:
                gens[dev] = self._generator(step, dev)
            out.append(torch.normal(0.0, std, size=tuple(t.shape), generator=gens[dev], dtype=dtype, device=dev))
        self.draws += 1
        return out

    def state_dict(self) -> dict:
        """Only the mode: the seed of "seeded" noise is not stored (it would let anyone holding a
        checkpoint remove the noise); a deterministic rerun passes it again from its config."""
        return {"mode": self.mode}
