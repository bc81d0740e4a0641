"""`dpldm experiment epsilon`: downstream accuracy and FID against epsilon, ours (DP fine-tuning of
the attention modules) beside the direct DP-SGD classifier trained on the private data at the same
(epsilon, delta), with repetitions; epsilon = inf is the non-private pair (attention fine-tuning
without clipping or noise, and the same CNN trained on the real private digits).

Every cell is one run of the utility protocol (dpldm/experiments/utility.py: one fresh private run,
its samples judged by FID/KID and by a CNN trained on them, read once on the real test split); the
recipe is --config (configs/demo.toml: every value chosen on public data, docs/tuning.md).

    dpldm experiment epsilon                      # eps 1 2 5 10 inf x 3 (hours on 2 CPU cores; resumes)
    dpldm experiment epsilon --epsilons 1 10 --repeats 1
    dpldm experiment epsilon --quick --out /tmp/eps   # smoke run (the tests)
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from dpldm.errors import UserError
from dpldm.experiments import common, figures, utility
from dpldm.experiments.results_data import aggregate, markdown_table

NAME = "epsilon"
EPSILONS = (1.0, 2.0, 5.0, 10.0, math.inf)
QUICK_EPSILONS = (1.0, math.inf)
OURS, DIRECT = "dp-attention", "dp-classifier"
NONPRIVATE = {OURS: "nonprivate-attention", DIRECT: "nonprivate-classifier"}  # the eps = inf cells


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epsilons", type=float, nargs="+", default=None,
                   help="target epsilons, 'inf' for the non-private pair (default 1 2 5 10 inf; --quick: 1 inf)")
    p.add_argument("--repeats", type=int, default=None, help="fresh runs per cell (default 3; --quick: 2)")
    add_evaluation_arguments(p)


def add_evaluation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples-per-class", type=int, default=None, help="samples judged per class (default 200)")
    p.add_argument("--fid-samples", type=int, default=200, help="FID/KID on this many samples vs real (default 200)")
    p.add_argument("--no-fid", action="store_true", help="skip FID/KID (accuracy only)")


def protocol_args(args: argparse.Namespace, epsilons: list[float], variants: list[str], repeats: int) -> argparse.Namespace:
    """The utility protocol's flags for this experiment's cells."""
    return argparse.Namespace(config=args.config, set=list(args.set), epsilons=epsilons, variants=variants,
                              repeats=repeats, repeat_once=True, samples_per_class=args.samples_per_class,
                              fid_samples=args.fid_samples, no_fid=args.no_fid, quick=args.quick, out=args.out,
                              threads=args.threads, command_line=getattr(args, "command_line", None))


def x_position(eps: float, finite: list[float]) -> float:
    """Where a cell sits on the log x axis: inf to the right of the largest finite epsilon."""
    return eps if math.isfinite(eps) else 2.5 * max(finite or [1.0])


def figure(rows, epsilons: list[float], path: Path) -> Path:
    finite = [e for e in epsilons if math.isfinite(e)]

    def series(variant: str, label: str, field: str, scale: float, style: dict) -> figures.Series:
        xs, ys, es = [], [], []
        for e in epsilons:
            v, key = (NONPRIVATE[variant], None) if not math.isfinite(e) else (variant, e)
            r = next((r for r in rows if r.variant == v and r.epsilon_target == key), None)
            s = getattr(r, field) if r is not None else None
            xs.append(x_position(e, finite))
            ys.append(None if s is None or s.mean is None else scale * s.mean)
            es.append(None if s is None or s.std is None else scale * s.std)
        return figures.Series(label, xs, ys, es, style)

    ticks = [(x_position(e, finite), common.eps_text(e)) for e in epsilons]
    panels = [("downstream accuracy on real test digits (%)",
               [series(OURS, "DP-LDM samples -> CNN (ours)", "accuracy", 100, {"color": "C0"}),
                series(DIRECT, "direct DP-SGD CNN on the private data", "accuracy", 100,
                       {"color": "C1", "linestyle": "--", "marker": "s"})]),
              ("FID of the samples (lower is better)", [series(OURS, "DP-LDM samples", "fid", 1, {"color": "C0"})])]
    return figures.line_panels(path, panels, xlabel="privacy budget ε (δ = recipe's; ∞ = non-private)",
                               title="Privacy-utility: ours vs the direct DP classifier (error bars: std over "
                                     "repetitions)", xscale="log", xticks=ticks)


def run(args: argparse.Namespace) -> int:
    common.check_common(args)
    epsilons = list(args.epsilons or (QUICK_EPSILONS if args.quick else EPSILONS))
    common.check_positive(epsilons, "--epsilons", allow_inf=True)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)
    if repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {repeats}")
    finite = [e for e in epsilons if math.isfinite(e)]
    variants = [OURS, DIRECT] + (list(NONPRIVATE.values()) if math.inf in epsilons else [])
    data, _ = utility.run(protocol_args(args, finite, variants, repeats), experiment=NAME)
    rows = aggregate(data["runs"])
    out = Path(args.out)
    png = figure(rows, epsilons, out / "epsilon_curve.png")
    body = ("Each row: mean ± sample std over repetitions (fresh private runs); the direct DP-SGD classifier at "
            "the same ε beside ours; ε = ∞: attention fine-tuning without privacy and the CNN on the real "
            "private digits.\n\n" + markdown_table(rows))
    report = common.write_report(out, "Epsilon curve: DP-LDM vs the direct DP-SGD classifier", data, body, [png])
    print(markdown_table(rows))
    print(f"[{NAME}] wrote {report}, {png} and {out / 'results.json'}", flush=True)
    return 0
