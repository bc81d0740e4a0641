"""`dpldm privacy`: calibrate sigma for a target (epsilon, delta), or report the epsilon a given
sigma spends, with Opacus' accountants (Poisson-subsampled Gaussian mechanism).

    dpldm privacy --epsilon 10 --delta 1e-5 --sample-rate 0.04 --steps 750 [--accountant prv|rdp] --json
    dpldm privacy --noise-multiplier 1.1 --delta 1e-5 --sample-rate 0.04 --steps 750 --json
"""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--epsilon", type=float, help="target epsilon: calibrate the noise multiplier for it")
    target.add_argument("--noise-multiplier", type=float, help="given sigma: report the epsilon it spends")
    parser.add_argument("--delta", type=float, required=True, help="target delta (< 1/N)")
    parser.add_argument("--sample-rate", type=float, required=True, help="Poisson sampling rate q = expected batch / N")
    parser.add_argument("--steps", type=int, required=True, help="number of logical (noisy) steps")
    parser.add_argument("--accountant", choices=("prv", "rdp"), default="prv", help="Opacus accountant (default prv)")
    parser.add_argument("--num-examples", type=int, default=None, help="N, to check delta < 1/N")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    import warnings

    from dpldm.errors import UserError
    from dpldm.privacy.accountant import (PrivacyParameterError, calibrate_noise, check_delta, check_sample_rate,
                                          compute_epsilon)

    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")  # opacus RDP, harmless
    try:
        if args.num_examples is not None and args.num_examples < 1:
            raise PrivacyParameterError(f"--num-examples must be >= 1, got {args.num_examples}")
        check_delta(args.delta, args.num_examples)
        check_sample_rate(args.sample_rate)
        if args.epsilon is not None:
            sigma = calibrate_noise(args.epsilon, args.delta, args.sample_rate, args.steps, args.accountant)
        else:
            sigma = args.noise_multiplier
        eps = compute_epsilon(sigma, args.sample_rate, args.steps, args.delta, args.accountant)
    except PrivacyParameterError as e:
        raise UserError(str(e)) from None
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
