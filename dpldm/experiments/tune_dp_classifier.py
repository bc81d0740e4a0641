"""Choose the direct DP-SGD classifier's settings on the PUBLIC proxy: no private data is read (issue 16).

The direct DP-SGD classifier (dpldm.eval.dp_classifier) is the baseline the released samples must
beat. Its settings (clip norm C, Adam's lr, steps x expected batch) are chosen here, on public data
only (docs/tuning.md, "The direct DP-SGD classifier"): each candidate is trained with DP-SGD on the
proxy's stand-in private set (scikit-learn's handwritten digits, upsampled to 32x32 and grown to
N = 4000 jittered copies like the demo's 4000 private digits; dpldm.eval.proxy) at the target
(epsilon, delta), sigma calibrated for the candidate's OWN q = B/N and steps (the direct
classifier spends the whole budget itself), and tested on the proxy's held-out half (898 public
digits). The runs are seeded (public data: `deterministic`, `not_private`). Per epsilon the
candidate with the highest mean accuracy over the seeds is chosen (ties: the first in grid order);
"overall" is the highest mean over the epsilons (one setting for every epsilon).

    python -m dpldm.experiments.tune_dp_classifier --epsilons 1 10 --clip 0.1 1 --lr 1e-3 3e-3 --schedule 200x500 100x1000
    python -m dpldm.experiments.tune_dp_classifier --quick        # smoke run (tests): N = 200, 3 steps

Prints a table; writes <out>/report.json atomically after every candidate (a later invocation
with the same --out reuses finished candidates).
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]

from dpldm.errors import InputError, UserError

PROG = "tune_dp_classifier"
TABLE_HEADER = "| epsilon | C | lr | steps x batch | sigma | q | accuracy (proxy test): mean | min | max |"
QUICK = {"n": 200, "schedule": ["3x50"], "clip": [0.1, 1.0], "lr": [1e-3], "epsilons": [1.0], "seeds": [0]}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (no usage block)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--epsilons", type=float, nargs="+", default=None, help="target epsilons (default: 1 10)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--clip", type=float, nargs="+", default=None, help="clip norms C (default: 0.1 1)")
    p.add_argument("--lr", type=float, nargs="+", default=None, help="Adam learning rates (default: 1e-3 3e-3)")
    p.add_argument("--schedule", nargs="+", default=None, metavar="STEPSxBATCH",
                   help="steps x expected batch size (default: 200x500 100x1000)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of init, sampling and noise (default: 0)")
    p.add_argument("--n", type=int, default=None,
                   help="N of the stand-in private set (default: proxy.reference_num_examples, 4000)")
    p.add_argument("--proxy", default=str(ROOT / "configs" / "proxy" / "digits.toml"), help="the proxy task's settings")
    p.add_argument("--out", default=str(ROOT / "runs" / "tune_dp_classifier"))
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--quick", action="store_true", help="smoke run: N = 200, 3 steps of 50, eps 1, C 0.1 and 1")
    a = p.parse_args(argv)
    defaults = QUICK if a.quick else {"n": None, "schedule": ["200x500", "100x1000"], "clip": [0.1, 1.0],
                                      "lr": [1e-3, 3e-3], "epsilons": [1.0, 10.0], "seeds": [0]}
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def parse_schedule(text: str) -> tuple[int, int]:
    """'200x500' -> (steps 200, expected batch 500)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise UserError(f"--schedule {text!r}: expected STEPSxBATCH with two integers >= 1, e.g. 200x500")
    return int(parts[0]), int(parts[1])


def check_args(args: argparse.Namespace) -> list[tuple[int, int]]:
    """Refuse bad arguments before anything is read or written; returns the parsed schedules."""
    if not 1 <= args.threads <= 4096:
        raise UserError(f"--threads must lie in [1, 4096], got {args.threads}")
    for flag, values in (("--epsilons", args.epsilons), ("--clip", args.clip), ("--lr", args.lr)):
        for v in values:
            if not (math.isfinite(v) and v > 0):
                raise UserError(f"{flag} must be finite numbers > 0, got {v}")
        if len(set(values)) != len(values):
            raise UserError(f"{flag}: a value is repeated")
    if any(not 0 <= s < 2**63 for s in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds must be distinct integers in [0, 2**63), got {args.seeds}")
    schedules = [parse_schedule(s) for s in args.schedule]
    if len(set(schedules)) != len(schedules):
        raise UserError("--schedule: a value is repeated")
    if args.n is not None and not 1 <= args.n <= 10**6:
        raise UserError(f"--n must lie in [1, 1000000], got {args.n}")
    out = Path(args.out)
    for anc in [out.absolute(), *out.absolute().parents]:
        if anc.exists() and not anc.is_dir():
            raise UserError(f"--out {args.out}: cannot use it as the output folder, {anc} is a file")
    return schedules


def candidate_key(eps: float, c: float, lr: float, steps: int, batch: int, n: int) -> str:
    return f"eps={eps:g} C={c:g} lr={lr:g} {steps}x{batch} N={n}"


def run(args: argparse.Namespace) -> int:
    from dpldm.eval.dp_classifier import DPClassifierConfig, config_dict, train_dp_classifier
    from dpldm.eval.proxy import load_proxy, load_proxy_config, standin_private_set
    from dpldm.privacy.accountant import check_delta
    from dpldm.utils.io import atomic_write_text

    schedules = check_args(args)
    proxy, _ = load_proxy_config(args.proxy)
    n = args.n or proxy.reference_num_examples
    try:
        check_delta(args.delta, n)
    except InputError as e:
        raise UserError(f"--delta: {e}") from None
    too_big = [b for _, b in schedules if b > n]
    if too_big:
        raise UserError(f"--schedule: expected batch {too_big[0]} exceeds the stand-in set's N={n}")
    grid = [(eps, c, lr, steps, batch) for eps, (steps, batch), c, lr
            in itertools.product(args.epsilons, schedules, args.clip, args.lr)]
    for _eps, c, lr, steps, batch in grid:  # every candidate's config is checked before any work
        DPClassifierConfig(steps=steps, expected_batch_size=batch, max_grad_norm=c, lr=lr,
                           deterministic=True, not_private=True)

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "report.json"
    old = json.loads(report_path.read_text()) if report_path.is_file() else {}
    splits = load_proxy(proxy)
    x, y = standin_private_set(splits, n, proxy)  # uint8 (n, 32, 32), (n,): public
    proxy_info = {"n": n, "standin_digits": int(len(splits.standin_x)), "test_digits": int(len(splits.heldout_x)),
                  "digit_size": proxy.digit_size, "split_seed": proxy.split_seed, "jitter_seed": proxy.seed,
                  "delta": args.delta}
    same_setup = old.get("proxy") == proxy_info
    reused = {k: v for k, v in old.get("candidates", {}).items()} if same_setup else {}
    rows: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {
        "command": " ".join(["python", "-m", "dpldm.experiments.tune_dp_classifier"] + list(args.argv)),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
        "proxy": proxy_info, "seeds": list(args.seeds), "candidates": rows}
    t_all = time.time()
    for eps, c, lr, steps, batch in grid:
        key = candidate_key(eps, c, lr, steps, batch, n)
        prev = reused.get(key, {})
        accs = dict(prev.get("by_seed", {}))
        conf = DPClassifierConfig(steps=steps, expected_batch_size=batch, max_grad_norm=c, lr=lr,
                                  deterministic=True, not_private=True)
        info = {k: prev[k] for k in ("sigma", "q", "epsilon_accounted") if k in prev}
        for seed in args.seeds:
            if str(seed) in accs:
                print(f"[{PROG}] {key}, seed {seed}: {100 * accs[str(seed)]:.1f}% (reused)", flush=True)
                continue
            t0 = time.time()
            res = train_dp_classifier(x, y, splits.heldout_x, splits.heldout_y, epsilon=eps, delta=args.delta,
                                      config=conf, seed=seed)
            accs[str(seed)] = round(res["accuracy"], 6)
            info = {"sigma": res["noise_multiplier"], "q": res["sample_rate"],
                    "epsilon_accounted": round(res["epsilon_accounted"], 4)}
            print(f"[{PROG}] {key}, seed {seed}: {100 * res['accuracy']:.1f}% (sigma {res['noise_multiplier']:.4f}, "
                  f"{time.time() - t0:.0f} s)", flush=True)
        vals = [accs[str(s)] for s in args.seeds]
        rows[key] = {"epsilon": eps, "config": config_dict(conf), **info, "by_seed": accs,
                     "mean": round(float(np.mean(vals)), 6)}
        report["seconds"] = round(time.time() - t_all, 1)
        atomic_write_text(report_path, json.dumps(report, indent=2) + "\n")

    chosen: dict[str, str] = {}
    for eps in args.epsilons:
        keys = [k for k, r in rows.items() if r["epsilon"] == eps]
        chosen[f"{eps:g}"] = max(keys, key=lambda k: (rows[k]["mean"], -keys.index(k)))
    settings = list(dict.fromkeys(k.split(" ", 1)[1] for k in rows))  # "C=.. lr=.. SxB N=.." in grid order
    overall = {s: round(float(np.mean([rows[f"eps={e:g} {s}"]["mean"] for e in args.epsilons])), 6)
               for s in settings}
    best = max(settings, key=lambda s: (overall[s], -settings.index(s)))
    report.update({"chosen_per_epsilon": chosen, "mean_over_epsilons": overall, "chosen_overall": best})
    atomic_write_text(report_path, json.dumps(report, indent=2) + "\n")

    lines = [TABLE_HEADER, "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, r in rows.items():
        cfg, vals = r["config"], list(r["by_seed"].values())
        mark = " **(chosen)**" if chosen[f"{r['epsilon']:g}"] == key else ""
        lines.append(f"| {r['epsilon']:g} | {cfg['max_grad_norm']:g} | {cfg['lr']:g} | {cfg['steps']}x"
                     f"{cfg['expected_batch_size']} | {r.get('sigma', float('nan')):.4f} | {r.get('q', float('nan')):.4f}"
                     f" | {100 * r['mean']:.1f}%{mark} | {100 * min(vals):.1f}% | {100 * max(vals):.1f}% |")
    print("\n".join(lines))
    for eps, key in chosen.items():
        print(f"chosen at eps {eps}: {key.split(' ', 1)[1]} (mean {100 * rows[key]['mean']:.2f}%)")
    print(f"chosen overall: {best} (mean over epsilons {100 * overall[best]:.2f}%)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
