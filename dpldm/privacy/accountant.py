"""Privacy accounting with Opacus' accountants (PRV default, RDP), and the privacy ledger.

Nothing here is hand-rolled: epsilon comes from `opacus.accountants` and sigma from
`opacus.accountants.utils.get_noise_multiplier`. Both assume the Poisson-subsampled Gaussian
mechanism: each step includes every example independently with probability q (PoissonPlan),
clips per-example gradients to C and adds N(0, sigma^2 C^2) once. Shuffled fixed-size batches
are a different mechanism; the ledger only accepts a PoissonPlan.

`PrivacyLedger` is the single source of truth for (sigma, C, q, N, delta), the sampling plan
and the accountant history. Its `state_dict()` is plain JSON and goes into every checkpoint's
meta.json; `PrivacyLedger.from_state_dict` on resume restores the exact history, so a resumed
run neither re-spends nor forgets privacy, and continues the same Poisson plan.

Bounds (so no accounting runs away in memory or time):
- The PRV accountant discretises the privacy loss on a grid whose size Opacus derives from
  (sigma, q, steps, delta): tiny sigma or very many steps need billions of points (26 GiB for
  sigma=0.01, q=0.01, 100 steps). `BoundedPRVAccountant` is Opacus' PRVAccountant with a check
  in its `_get_domain` (the grid is sized there, before anything is allocated): past
  `PRV_MAX_POINTS` (2**24 points: about 3 GiB peak and 12 s per evaluation on 2 CPU cores) it
  raises `PrivacyParameterError`; the same numbers otherwise, at no extra cost. The ledger and the
  one-shot functions use it. `prv_grid_points` predicts the size without Opacus' PRV. The RDP
  accountant's cost does not depend on sigma or steps and has no such limit.
- `calibrate_noise` runs Opacus' own search (the same sigma sequence as
  `opacus.accountants.utils.get_noise_multiplier`, so the same result) with a wall-clock limit
  (`DEFAULT_TIME_LIMIT_S`), an iteration cap, the grid check before every evaluation, and an
  optional `progress` callback (one line per evaluation).
- Opacus' "Optimal order is the largest/smallest alpha" RDP warning is silenced inside PRV
  computations, where it comes only from sizing the grid and says nothing about the result. RDP
  accounting keeps it (there it is about the result: the bound may be loose).
"""
from __future__ import annotations

from dpldm.errors import InputError

import contextlib
import math
import time
import warnings
from typing import Any, Callable, Iterator, Sequence

from opacus.accountants import PRVAccountant, create_accountant

from dpldm.privacy.sampler import PoissonPlan

ACCOUNTANTS = ("prv", "rdp")
LEDGER_VERSION = 1
PRV_MAX_POINTS = 2 ** 24  # grid points of one PRV evaluation (~180 bytes and ~0.7 us per point measured)
PRV_EPS_ERROR = 0.01  # Opacus' default eps_error of PRVAccountant.get_epsilon
DEFAULT_TIME_LIMIT_S = 300.0  # calibrate_noise gives up past this (checked between evaluations)
MAX_SEARCH_ITERATIONS = 200  # Opacus' bisection never needs more than ~60; guards against a non-converging search
MAX_SIGMA = 1e6  # as opacus.accountants.utils.MAX_SIGMA
_OPTIMAL_ORDER = r"Optimal order is the (largest|smallest) alpha"


class PrivacyParameterError(InputError, ValueError):
    """A privacy parameter (epsilon, delta, q, C, sigma, steps, accountant) is out of range."""


# -- validation ----------------------------------------------------------------------------------

def check_epsilon(epsilon: float) -> float:
    if not _is_number(epsilon) or not (epsilon > 0) or math.isinf(epsilon):
        raise PrivacyParameterError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    return float(epsilon)


def check_delta(delta: float, num_examples: int | None = None) -> float:
    if not _is_number(delta) or not (0 < delta < 1):
        raise PrivacyParameterError(f"delta must lie in (0, 1), got {delta!r}")
    if num_examples is not None and delta >= 1.0 / num_examples:
        raise PrivacyParameterError(
            f"delta={delta:g} must be < 1/N = {1.0 / num_examples:g} for N={num_examples} private examples "
            "(a delta >= 1/N allows releasing one example outright)")
    return float(delta)


def check_sample_rate(q: float) -> float:
    if not _is_number(q) or not (0 < q <= 1):
        raise PrivacyParameterError(f"sample rate q must lie in (0, 1], got {q!r}")
    return float(q)


def check_max_grad_norm(c: float) -> float:
    if not _is_number(c) or not (c > 0) or math.isinf(c):
        raise PrivacyParameterError(f"max_grad_norm (clip norm C) must be a finite number > 0, got {c!r}")
    return float(c)


def check_noise_multiplier(sigma: float) -> float:
    if not _is_number(sigma) or not (sigma > 0) or math.isinf(sigma):
        raise PrivacyParameterError(f"noise multiplier sigma must be a finite number > 0, got {sigma!r}")
    if sigma > MAX_SIGMA:  # Opacus' accountants overflow far above it; epsilon is ~0 well before
        raise PrivacyParameterError(f"noise multiplier sigma must be <= {MAX_SIGMA:g} (the range of Opacus' "
                                    f"accountants and of its noise calibration), got {sigma!r}")
    return float(sigma)


def check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PrivacyParameterError(f"steps must be an integer >= 1, got {steps!r}")
    return steps


def check_accountant(name: str) -> str:
    if name not in ACCOUNTANTS:
        raise PrivacyParameterError(f"accountant must be one of {ACCOUNTANTS}, got {name!r}")
    return name


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


# -- bounds ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def quiet_optimal_order() -> Iterator[None]:
    """Silence Opacus' "Optimal order is the largest/smallest alpha" UserWarning (and nothing else)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_OPTIMAL_ORDER, category=UserWarning)
        yield


def prv_grid_points(history: Sequence[tuple[float, float, int]], delta: float,
                    eps_error: float = PRV_EPS_ERROR) -> float:
    """Points of the grid Opacus' PRVAccountant.get_epsilon(delta) will allocate for `history`
    [(sigma, q, steps), ...] (its `_get_domain`: 2L / mesh), computed from RDP bounds only (cheap).
    A float: it can exceed any integer size worth allocating."""
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

    delta_error = delta / 1000  # PRVAccountant.get_epsilon's default
    total = sum(int(n) for _, _, n in history)
    with quiet_optimal_order():
        L = compute_safe_domain_size([PoissonSubsampledGaussianPRV(q, s) for s, q, _ in history],
                                     [int(n) for _, _, n in history], eps_error, delta_error)
    mesh = eps_error / math.sqrt(total * math.log(12 / delta_error) / 2)
    return 2 * L / mesh + 2


def _too_large(points: float, limit: int, what: str) -> PrivacyParameterError:
    return PrivacyParameterError(
        f"PRV accountant: {what} needs a grid of {points:.3g} points (limit {int(limit)}, about "
        f"{points * 180 / 2**30:.3g} GiB): too little noise or too many steps for the PRV accountant; "
        "use the RDP accountant (--accountant rdp), more noise or fewer steps")


def check_prv_size(history: Sequence[tuple[float, float, int]], delta: float, max_points: int | None = None,
                   what: str | None = None) -> float:
    """Raise PrivacyParameterError when the PRV grid for `history` would exceed `max_points`."""
    limit = PRV_MAX_POINTS if max_points is None else max_points
    points = prv_grid_points(history, delta)
    if points > limit:
        raise _too_large(points, limit, what or _describe(history, delta))
    return points


def _describe(history: Sequence[tuple[float, float, int]], delta: float) -> str:
    if len(history) == 1:
        s, q, n = history[0]
        return f"sigma={s:g}, q={q:g}, {n} steps, delta={delta:g}"
    return f"{len(history)} segments (last sigma={history[-1][0]:g}, q={history[-1][1]:g}), delta={delta:g}"


class BoundedPRVAccountant(PRVAccountant):
    """Opacus' PRVAccountant that refuses a discretisation grid larger than `max_points` (default
    PRV_MAX_POINTS) where Opacus sizes it, before it allocates; `what` names the case in the error."""

    def __init__(self, max_points: int | None = None, what: str | None = None) -> None:
        super().__init__()
        self.max_points, self.what = max_points, what

    def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error):
        domain = super()._get_domain(prvs=prvs, num_self_compositions=num_self_compositions, eps_error=eps_error,
                                     delta_error=delta_error)
        limit = PRV_MAX_POINTS if self.max_points is None else self.max_points
        if domain.size > limit:
            raise _too_large(domain.size, limit, self.what or _describe(self.history, delta_error * 1000))
        return domain

    def get_epsilon(self, delta: float, **kwargs) -> float:
        """Opacus' epsilon, without its optimal-order warning (grid sizing), with its numerical
        failures as one clear PrivacyParameterError."""
        try:
            with quiet_optimal_order():
                return float(super().get_epsilon(delta, **kwargs))
        except (ValueError, RuntimeError, FloatingPointError, OverflowError, MemoryError) as e:
            raise PrivacyParameterError(
                f"PRV accountant cannot evaluate {_describe(self.history, delta)} (Opacus: {e}); "
                "use the RDP accountant (--accountant rdp)") from None


def new_accountant(name: str, max_points: int | None = None, what: str | None = None):
    """Opacus' accountant `name`; "prv" is the bounded one."""
    if check_accountant(name) == "prv":
        return BoundedPRVAccountant(max_points, what)
    return create_accountant(mechanism=name)


def _epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str,
             max_points: int | None, what: str | None = None) -> float:
    acc = new_accountant(accountant, max_points, what)
    acc.history = list(history)
    try:
        return float(acc.get_epsilon(delta=delta))
    except (ZeroDivisionError, OverflowError) as e:  # sigma so small that sigma**2 underflows, ...
        shown = ", ".join(f"sigma={s:g}, q={q:g}, {n} steps" for s, q, n in history)
        raise PrivacyParameterError(f"{accountant.upper()} accountant cannot evaluate {shown}, delta={delta:g} "
                                    f"(numerical {type(e).__name__}: {e}); use a larger noise multiplier") from None


# -- one-shot functions ----------------------------------------------------------------------------

def compute_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                    accountant: str = "prv", *, max_points: int | None = None) -> float:
    """Epsilon spent after `steps` Poisson-subsampled Gaussian steps (Opacus' accountant).
    PRV: PrivacyParameterError when its grid would exceed `max_points` (default PRV_MAX_POINTS)."""
    sigma, q = check_noise_multiplier(noise_multiplier), check_sample_rate(sample_rate)
    steps, delta = check_steps(steps), check_delta(delta)
    return _epsilon([(sigma, q, steps)], delta, check_accountant(accountant), max_points)


def calibrate_noise(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv",
                    *, epsilon_tolerance: float = 0.01, time_limit: float | None = None,
                    max_points: int | None = None, progress: Callable[[str], None] | None = None) -> float:
    """The noise multiplier sigma for which `steps` steps at rate q spend at most (epsilon, delta).

    The search of Opacus' `get_noise_multiplier` (double sigma from 20 until epsilon <= target,
    then bisect until within `epsilon_tolerance` below target: the same evaluations, the same
    result), bounded: PrivacyParameterError past `time_limit` seconds (default
    DEFAULT_TIME_LIMIT_S, checked before each evaluation), past MAX_SEARCH_ITERATIONS, or when a
    PRV evaluation would exceed `max_points`. `progress(line)` gets one line per evaluation."""
    epsilon, delta = check_epsilon(epsilon), check_delta(delta)
    q, steps, accountant = check_sample_rate(sample_rate), check_steps(steps), check_accountant(accountant)
    limit = DEFAULT_TIME_LIMIT_S if time_limit is None else float(time_limit)
    target = f"epsilon={epsilon:g} at delta={delta:g}, q={q:g}, steps={steps}"
    t0 = time.perf_counter()
    evals = 0

    def eps_at(sigma: float, phase: str) -> float:
        nonlocal evals
        elapsed = time.perf_counter() - t0
        if elapsed > limit:
            raise PrivacyParameterError(f"calibrating sigma for {target}: gave up after {elapsed:.0f} s "
                                        f"(time limit {limit:g} s) at sigma={sigma:.6g}, {phase}")
        if evals >= MAX_SEARCH_ITERATIONS:
            raise PrivacyParameterError(f"calibrating sigma for {target}: no convergence after {evals} "
                                        f"evaluations (sigma={sigma:.6g}, {phase})")
        evals += 1
        eps = _epsilon([(sigma, q, steps)], delta, accountant, max_points,
                       what=f"calibrating sigma for {target} reached sigma={sigma:.4g}, which")
        if progress is not None:
            progress(f"calibrating sigma ({accountant.upper()}): evaluation {evals}, sigma={sigma:.6g} -> "
                     f"epsilon={eps:.6g} (target {epsilon:g}, {phase}, {time.perf_counter() - t0:.1f} s)")
        return eps

    sigma_low, sigma_high, eps_high = 0.0, 10.0, math.inf
    while eps_high > epsilon:
        sigma_high = 2 * sigma_high
        eps_high = eps_at(sigma_high, "doubling")
        if sigma_high > MAX_SIGMA:
            raise PrivacyParameterError(f"cannot reach {target}: the privacy budget is too low "
                                        f"(epsilon={eps_high:.4g} even at sigma={sigma_high:g})")
    while epsilon - eps_high > epsilon_tolerance:
        sigma = (sigma_low + sigma_high) / 2
        eps = eps_at(sigma, f"bisecting [{sigma_low:.6g}, {sigma_high:.6g}]")
        if eps < epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high


# -- the ledger ------------------------------------------------------------------------------------

class PrivacyLedger:
    """(sigma, C, q, N, delta), the Poisson plan, the accountant and the steps done.

    `step()` is called exactly once per logical (noisy) step, by `DPStep.add_noise()`."""

    def __init__(self, *, noise_multiplier: float, max_grad_norm: float, plan: PoissonPlan, delta: float,
                 accountant: str = "prv") -> None:
        if not isinstance(plan, PoissonPlan):
            raise PrivacyParameterError(
                f"the ledger needs a PoissonPlan (Opacus' accountants assume Poisson subsampling); got "
                f"{type(plan).__name__}. Shuffled fixed-size batches are not covered by this accounting.")
        self.noise_multiplier = check_noise_multiplier(noise_multiplier)
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        self.plan = plan
        check_sample_rate(plan.sample_rate)
        self.delta = check_delta(delta, plan.num_examples)
        self.accountant_name = check_accountant(accountant)
        self.accountant = new_accountant(self.accountant_name)
        self.steps_done = 0
        # step index -> executions beyond one (a resume from an older checkpoint re-runs steps already spent;
        # dpldm.privacy.journal): step s executed r times is accounted at sigma / sqrt(r)
        self.extra_executions: dict[int, int] = {}

    # public constants of the mechanism
    @property
    def sample_rate(self) -> float:
        return self.plan.sample_rate

    @property
    def num_examples(self) -> int:
        return self.plan.num_examples

    @property
    def expected_batch_size(self) -> float:
        """q*N: the denominator of every update (public), never the realised batch size."""
        return self.plan.expected_batch_size

    @property
    def noise_std(self) -> float:
        """Std of the noise added to the clipped SUM per coordinate: sigma * C."""
        return self.noise_multiplier * self.max_grad_norm

    @classmethod
    def create(cls, *, num_examples: int, sample_rate: float, max_grad_norm: float, delta: float,
               steps: int | None = None, epsilon: float | None = None, noise_multiplier: float | None = None,
               accountant: str = "prv", seed: int | None = None) -> "PrivacyLedger":
        """A fresh ledger; sigma is calibrated for (epsilon, delta, q, steps) unless given."""
        plan = PoissonPlan(num_examples, check_sample_rate(sample_rate), seed)
        check_delta(delta, num_examples)
        if noise_multiplier is None:
            if epsilon is None or steps is None:
                raise PrivacyParameterError("give either noise_multiplier, or a target epsilon and the number of steps")
            noise_multiplier = calibrate_noise(epsilon, delta, sample_rate, steps, accountant)
        return cls(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, plan=plan, delta=delta,
                   accountant=accountant)

    @classmethod
    def from_config(cls, privacy_cfg, num_examples: int, seed: int | None = None) -> "PrivacyLedger":
        """From a `dpldm.config.PrivacyConfig`: q = privacy.sample_rate when set, else
        expected_batch_size / N."""
        q = getattr(privacy_cfg, "sample_rate", None)
        if q is None:
            if privacy_cfg.expected_batch_size > num_examples:
                raise PrivacyParameterError(f"privacy.expected_batch_size={privacy_cfg.expected_batch_size} exceeds "
                                            f"the N={num_examples} private examples")
            q = privacy_cfg.expected_batch_size / num_examples
        return cls.create(num_examples=num_examples, sample_rate=q,
                          max_grad_norm=privacy_cfg.max_grad_norm, delta=privacy_cfg.delta,
                          steps=privacy_cfg.steps, epsilon=privacy_cfg.epsilon,
                          noise_multiplier=privacy_cfg.noise_multiplier, accountant=privacy_cfg.accountant, seed=seed)

    def step(self) -> None:
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self.steps_done += 1

    def epsilon_spent(self, delta: float | None = None, *, max_points: int | None = None) -> float:
        """Epsilon spent so far at `delta` (default: the ledger's delta); 0.0 before any step.
        PRV: PrivacyParameterError when its grid would exceed `max_points` (see check_prv_size)."""
        if self.steps_done == 0 and not self.extra_executions:
            return 0.0
        delta = check_delta(self.delta if delta is None else delta)
        if self.extra_executions:  # every executed step, re-runs included (dpldm.privacy.journal)
            return _epsilon(self.execution_history(), delta, self.accountant_name, max_points)
        if self.accountant_name == "prv":
            self.accountant.max_points = max_points
        return float(self.accountant.get_epsilon(delta=delta))

    def executed_steps(self) -> int:
        """Noisy steps executed so far, re-runs included (= steps_done without re-runs)."""
        return self.steps_done + sum(self.extra_executions.values())

    def execution_history(self) -> list[tuple[float, float, int]]:
        """Opacus accountant history [(sigma_eff, q, steps)] over every step index executed at least
        once: index s executed r_s times is one subsampled Gaussian at sigma / sqrt(r_s)."""
        runs = {s: 1 for s in range(1, self.steps_done + 1)}
        for s, n in self.extra_executions.items():
            runs[s] = runs.get(s, 0) + n
        by_count: dict[int, int] = {}
        for r in runs.values():
            by_count[r] = by_count.get(r, 0) + 1
        return [(self.noise_multiplier / math.sqrt(r), self.sample_rate, n) for r, n in sorted(by_count.items())]

    def epsilon_after(self, total_steps: int, delta: float | None = None) -> float:
        """Epsilon the run will have spent after `total_steps` steps at the ledger's sigma and q."""
        return compute_epsilon(self.noise_multiplier, self.sample_rate, total_steps,
                               self.delta if delta is None else delta, self.accountant_name)

    def describe(self) -> dict[str, Any]:
        """Public, derived quantities for printing (no seed)."""
        return {"noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm,
                "sample_rate": self.sample_rate, "num_examples": self.num_examples,
                "expected_batch_size": self.expected_batch_size, "noise_std_on_sum": self.noise_std,
                "delta": self.delta, "accountant": self.accountant_name, "steps_done": self.steps_done}

    # -- checkpointing: plain JSON --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": LEDGER_VERSION,
            "sampling": "poisson",
            "accountant": self.accountant_name,
            "history": [[float(s), float(q), int(n)] for s, q, n in self.accountant.history],
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "delta": self.delta,
            "steps_done": self.steps_done,
            "plan": self.plan.state_dict(),  # holds the sampling seed: private, like the data
            "extra_executions": {str(s): int(n) for s, n in sorted(self.extra_executions.items())},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace this ledger's state with a saved one (validated)."""
        if not isinstance(state, dict) or state.get("version") != LEDGER_VERSION:
            raise PrivacyParameterError(f"not a privacy ledger state (version {LEDGER_VERSION}): {state!r:.200}")
        if state.get("sampling") != "poisson":
            raise PrivacyParameterError(f"ledger sampling {state.get('sampling')!r} is not 'poisson'")
        history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
        steps_done = int(state["steps_done"])
        if sum(n for _, _, n in history) != steps_done:
            raise PrivacyParameterError(f"ledger is inconsistent: history counts {sum(n for *_, n in history)} "
                                        f"steps but steps_done={steps_done}")
        fresh = PrivacyLedger(noise_multiplier=state["noise_multiplier"], max_grad_norm=state["max_grad_norm"],
                              plan=PoissonPlan.from_state_dict(state["plan"]), delta=state["delta"],
                              accountant=state["accountant"])
        fresh.accountant.load_state_dict({"history": history, "mechanism": fresh.accountant_name})
        fresh.steps_done = steps_done
        extra = state.get("extra_executions", {})
        if not isinstance(extra, dict) or not all(str(k).isdigit() and int(k) >= 1 and isinstance(v, int) and v >= 1
                                                  for k, v in extra.items()):
            raise PrivacyParameterError(f"ledger extra_executions must map step >= 1 to a count >= 1: {extra!r:.200}")
        fresh.extra_executions = {int(k): int(v) for k, v in extra.items()}
        self.__dict__.update(fresh.__dict__)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "PrivacyLedger":
        ledger = cls.__new__(cls)
        ledger.load_state_dict(state)
        return ledger
