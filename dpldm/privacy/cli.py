"""`dpldm privacy`: calibrate sigma for a target (epsilon, delta), or report the epsilon a given
sigma spends, with Opacus' accountants (Poisson-subsampled Gaussian mechanism).

    dpldm privacy --epsilon 10 --delta 1e-5 --sample-rate 0.04 --steps 750 [--accountant prv|rdp] --json
    dpldm privacy --noise-multiplier 1.1 --delta 1e-5 --sample-rate 0.04 --steps 750 --json

Bounded (see dpldm.privacy.accountant): a PRV evaluation whose grid would exceed --max-grid-points
(default 2**24, about 3 GiB) and a calibration running past --time-limit seconds (default 300)
stop with a one-line error. Accounting that runs longer than 2 s reports progress on stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import warnings

PROGRESS_AFTER_S = 2.0  # progress lines on stderr once accounting has run this long
LONG_GRID_POINTS = 2 ** 21  # a PRV evaluation this large takes more than ~1.5 s: say so before it starts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dpldm.privacy.accountant import DEFAULT_TIME_LIMIT_S, PRV_MAX_POINTS

    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--epsilon", type=float, help="target epsilon: calibrate the noise multiplier for it")
    target.add_argument("--noise-multiplier", type=float, help="given sigma: report the epsilon it spends")
    parser.add_argument("--delta", type=float, required=True, help="target delta (< 1/N)")
    parser.add_argument("--sample-rate", type=float, required=True, help="Poisson sampling rate q = expected batch / N")
    parser.add_argument("--steps", type=int, required=True, help="number of logical (noisy) steps")
    parser.add_argument("--accountant", choices=("prv", "rdp"), default="prv", help="Opacus accountant (default prv)")
    parser.add_argument("--num-examples", type=int, default=None, help="N, to check delta < 1/N")
    parser.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT_S,
                        help=f"seconds the sigma calibration may run (default {DEFAULT_TIME_LIMIT_S:g})")
    parser.add_argument("--max-grid-points", type=int, default=PRV_MAX_POINTS,
                        help=f"largest PRV discretisation grid (default {PRV_MAX_POINTS} = 2**24, ~3 GiB)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


class _Progress:
    """Prints accounting progress to stderr once it has run PROGRESS_AFTER_S seconds."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.t0 = quiet, time.perf_counter()

    def __call__(self, line: str, force: bool = False) -> None:
        if not self.quiet and (force or time.perf_counter() - self.t0 >= PROGRESS_AFTER_S):
            print(f"dpldm privacy: {line}", file=sys.stderr, flush=True)


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def run(args: argparse.Namespace) -> int:
    from dpldm.errors import UserError
    from dpldm.privacy.accountant import (PRV_MAX_POINTS, PrivacyParameterError, _OPTIMAL_ORDER, calibrate_noise, check_delta,
                                          check_noise_multiplier, check_sample_rate, check_steps, compute_epsilon,
                                          prv_grid_points)

    if not (math.isfinite(args.time_limit) and args.time_limit > 0):
        raise UserError(f"--time-limit must be a finite number of seconds > 0, got {args.time_limit}")
    if args.max_grid_points < 2:
        raise UserError(f"--max-grid-points must be >= 2, got {args.max_grid_points}")
    if args.max_grid_points != PRV_MAX_POINTS:  # a raised limit must fit in memory (~180 bytes per point)
        avail = _available_memory()
        if avail is not None and args.max_grid_points * 180 > avail:
            raise UserError(f"--max-grid-points {args.max_grid_points}: a PRV grid that large needs up to "
                            f"{args.max_grid_points * 180 / 2**30:.3g} GiB, more than the {avail / 2**30:.3g} GiB "
                            "available here")
    if args.num_examples is not None and args.num_examples < 1:
        raise PrivacyParameterError(f"--num-examples must be >= 1, got {args.num_examples}")
    check_delta(args.delta, args.num_examples)
    check_sample_rate(args.sample_rate)
    check_steps(args.steps)
    progress = _Progress(args.quiet)
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", message=_OPTIMAL_ORDER, category=UserWarning)
        if args.epsilon is not None:
            sigma = calibrate_noise(args.epsilon, args.delta, args.sample_rate, args.steps, args.accountant,
                                    time_limit=args.time_limit, max_points=args.max_grid_points, progress=progress)
        else:
            sigma = check_noise_multiplier(args.noise_multiplier)
        if args.accountant == "prv":
            try:
                points = prv_grid_points([(sigma, args.sample_rate, args.steps)], args.delta)
            except (ZeroDivisionError, OverflowError) as e:
                raise PrivacyParameterError(
                    f"PRV accountant cannot size its grid for sigma={sigma:g}, q={args.sample_rate:g}, {args.steps} "
                    f"steps, delta={args.delta:g} (numerical {type(e).__name__}); use a larger noise multiplier "
                    "or --accountant rdp") from None
            if LONG_GRID_POINTS < points <= args.max_grid_points:
                progress(f"PRV accounting on a grid of {points:.3g} points (about {points * 0.7e-6:.0f} s, "
                         f"{points * 180 / 2**30:.2g} GiB)...", force=True)
        eps = compute_epsilon(sigma, args.sample_rate, args.steps, args.delta, args.accountant,
                              max_points=args.max_grid_points)
    for w in caught:  # anything but Opacus' optimal-order note goes out as it came
        if not re.search(_OPTIMAL_ORDER, str(w.message)):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if any(re.search(_OPTIMAL_ORDER, str(w.message)) for w in caught):  # only the RDP accountant leaves it
        edge = "largest" if any("largest" in str(w.message) for w in caught) else "smallest"
        print(f"dpldm privacy: note: the RDP optimal order is the {edge} alpha of Opacus' default range: "
              "epsilon is a valid upper bound but may be loose (the PRV accountant is tighter)", file=sys.stderr)
    out = {"noise_multiplier": sigma, "epsilon": eps, "delta": args.delta, "sample_rate": args.sample_rate,
           "steps": args.steps, "accountant": args.accountant}
    if args.json:
        print(json.dumps(out))
        return 0
    if args.epsilon is not None:
        print(f"noise multiplier sigma = {sigma:.4f} for target epsilon = {args.epsilon:g}")
    print(f"epsilon spent = {eps:.4f} at delta = {args.delta:g} after {args.steps} steps at sample rate "
          f"q = {args.sample_rate:g} with sigma = {sigma:.4f} ({args.accountant.upper()} accountant, Poisson sampling)")
    if args.num_examples:
        print(f"expected batch size q*N = {args.sample_rate * args.num_examples:g} of N = {args.num_examples}")
    return 0
