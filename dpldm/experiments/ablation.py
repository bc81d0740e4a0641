"""`dpldm experiment ablation`: which attention modules to fine-tune (the paper's ranges 1-16,
5-16, 9-16 mapped onto our model) and the full UNet, at epsilon 1, 5 and 10, with repetitions.

The ranges are computed from the model (`utility.ablation_specs`: 1-based forward order of
`UNet.attention_modules()`): all of them (`dp-attention`), from the middle block on
(`dp-attention-decoder`), the last two decoder-side modules (`dp-attention-last`), and every UNet
parameter (`dp-full`); the trainable-parameter count sits beside each. Every cell is one run of the
utility protocol (dpldm/experiments/utility.py) with the recipe --config.

    dpldm experiment ablation                  # 4 variants x eps 1 5 10 x 3 (hours on 2 CPU cores; resumes)
    dpldm experiment ablation --quick --out /tmp/abl
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dpldm.errors import UserError
from dpldm.experiments import common, figures, utility
from dpldm.experiments.epsilon import add_evaluation_arguments, protocol_args
from dpldm.experiments.results_data import GENERATIVE_PRIVATE, aggregate, markdown_table

NAME = "ablation"
EPSILONS = (1.0, 5.0, 10.0)
QUICK_EPSILONS = (1.0,)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epsilons", type=float, nargs="+", default=None, help="target epsilons (default 1 5 10)")
    p.add_argument("--variants", nargs="+", default=list(GENERATIVE_PRIVATE), choices=GENERATIVE_PRIVATE)
    p.add_argument("--repeats", type=int, default=None, help="fresh runs per cell (default 3; --quick: 1)")
    add_evaluation_arguments(p)


def figure(rows, epsilons: list[float], variants: list[str], specs: dict, path: Path) -> Path:
    groups = []
    for v in variants:
        r = next((r for r in rows if r.variant == v), None)
        params = f"{r.trainable_parameters:,}" if r is not None and r.trainable_parameters else "?"
        groups.append(f"{v.removeprefix('dp-')}\n{specs.get(v, '')}\n{params} params")
    bars = []
    for k, e in enumerate(epsilons):
        ys, es = [], []
        for v in variants:
            r = next((r for r in rows if r.variant == v and r.epsilon_target == e), None)
            ys.append(None if r is None or r.accuracy.mean is None else 100 * r.accuracy.mean)
            es.append(None if r is None or r.accuracy.std is None else 100 * r.accuracy.std)
        bars.append(figures.Series(f"ε = {e:g}", list(range(len(variants))), ys, es, {"color": f"C{k}"}))
    return figures.grouped_bars(path, groups, bars, ylabel="downstream accuracy on real test digits (%)",
                                xlabel="fine-tuned modules (trainable parameters)",
                                title="Attention-range ablation (error bars: std over repetitions)")


def run(args: argparse.Namespace) -> int:
    common.check_common(args)
    epsilons = list(args.epsilons or (QUICK_EPSILONS if args.quick else EPSILONS))
    common.check_positive(epsilons, "--epsilons")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {repeats}")
    data, specs = utility.run(protocol_args(args, epsilons, list(args.variants), repeats), experiment=NAME)
    rows = aggregate(data["runs"])
    out = Path(args.out)
    png = figure(rows, epsilons, list(args.variants), specs, out / "ablation.png")
    body = ("Modules by 1-based forward order of the UNet's attention modules (+ the class embedder); mean ± "
            "sample std over repetitions.\n\n" + markdown_table(rows))
    report = common.write_report(out, "Attention-range ablation", data, body, [png])
    print(markdown_table(rows))
    print(f"[{NAME}] wrote {report}, {png} and {out / 'results.json'}", flush=True)
    return 0
