"""Choose the downstream CNN's settings (and the sampler's eta) on the PUBLIC proxy: no private data is read.

The downstream classifier (dpldm.eval.classifier) is how the product's utility is measured: a CNN
trained on synthetic samples, selected on a synthetic validation split, tested once on real data.
Its settings (epochs, augmentation, widths) decide the reported number, so they are chosen here on
public data only (docs/tuning.md): samples of a PROXY model (a model DP fine-tuned by
dpldm/experiments/tune_public.py on the stand-in set of scikit-learn digits) train each candidate CNN, which is
tested on the proxy's held-out half (898 public digits). Every candidate sees the same sample sets
and the same seeds; the chosen one has the highest mean accuracy over (sample set x seed). Each
sample set is also read by the public judge (class fidelity), so an eta comparison comes out of
the same run.

    python -m dpldm.experiments.tune_classifier --model runs/tune_public/finetune/<ft-...>/model --etas 0 1
    python -m dpldm.experiments.tune_classifier --quick          # smoke run on the shipped public model (tests)

Prints a table; writes <out>/report.json atomically and caches the sample sets (<out>/samples_eta*.npz).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]

from dpldm.errors import InputError

PROG = "tune_classifier"
NUM_CLASSES = 10
# the candidates: ClassifierConfig overrides (the first is today's default); kept few on purpose (CPU budget)
CANDIDATES: dict[str, dict] = {
    "8 epochs (before)": {"epochs": 8, "augment": False},
    "8 epochs + augment": {"epochs": 8, "augment": True},
    "20 epochs + augment": {"epochs": 20, "patience": 5, "augment": True},
    "20 epochs + augment, wide": {"epochs": 20, "patience": 5, "augment": True, "channels": (32, 64),
                                  "hidden": 256},
}
QUICK_CANDIDATES = {"1 epoch": {"epochs": 1, "augment": False}, "1 epoch + augment": {"epochs": 1, "augment": True}}
TABLE_HEADER = "| downstream CNN | " + " | ".join(["mean acc. (proxy test)", "min", "max", "runs"]) + " |"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv):
    p = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="a proxy model folder (default: the shipped public model)")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.toml"), help="its [diffusion] sampling settings")
    p.add_argument("--proxy-config", default=str(ROOT / "configs" / "proxy" / "digits.toml"))
    p.add_argument("--etas", type=float, nargs="+", default=[0.0])
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default=str(ROOT / "runs" / "tune_classifier"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: 3 samples per class, 4 DDIM steps, 1 epoch")
    a = p.parse_args(argv)
    if a.per_class < 2:
        p.error(f"--per-class must be >= 2 (train + validation per class), got {a.per_class}")
    if any(not 0.0 <= e <= 1.0 for e in a.etas):
        p.error(f"--etas must lie in [0, 1], got {a.etas}")
    return a


def sample_set(ldm, cfg, eta: float, per_class: int, seed: int, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (10*per_class, 32, 32) samples and labels of the model at this eta (cached by name)."""
    from dpldm.demo import sample_per_class
    from dpldm.utils.io import atomic_path

    path = cache / f"samples_eta{eta:g}_n{per_class}_seed{seed}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["x"], z["y"]
    ldm.cfg.diffusion = cfg.diffusion
    ldm.cfg.diffusion.eta = eta
    x, y = sample_per_class(ldm, NUM_CLASSES, per_class, seed=seed, progress=False)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, x=x, y=y)
    return x, y


def run(args) -> int:
    from dpldm.config import load_config
    from dpldm.eval.classifier import ClassifierConfig, downstream_accuracy
    from dpldm.eval.proxy import class_fidelity, load_proxy, load_proxy_config, predict, train_judge
    from dpldm.models.ldm import load_ldm, load_public_model
    from dpldm.utils.io import atomic_write_text

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    proxy, quick_set = load_proxy_config(args.proxy_config, quick=args.quick)
    cfg = load_config(args.config, quick_set if args.quick else [])
    per_class = 3 if args.quick else args.per_class
    candidates = QUICK_CANDIDATES if args.quick else CANDIDATES
    splits = load_proxy(proxy)
    ldm = load_ldm(args.model) if args.model else load_public_model()
    judge = train_judge(splits.heldout_x, splits.heldout_y, proxy)
    sets, rows = {}, {name: [] for name in candidates}
    t0 = time.time()
    for eta in args.etas:
        x, y = sample_set(ldm, cfg, eta, per_class, proxy.seed, out)
        per, fid = class_fidelity(predict(judge, x), y)
        sets[f"eta={eta:g}"] = {"fidelity": round(fid, 6), "fidelity_per_class": [round(p, 4) for p in per],
                                "downstream": {}}
        for name, over in candidates.items():
            for seed in args.seeds:
                conf = ClassifierConfig(**{**over, "seed": seed})
                acc = downstream_accuracy(x, y, splits.heldout_x, splits.heldout_y, num_classes=NUM_CLASSES,
                                          config=conf)["accuracy"]
                rows[name].append(acc)
                sets[f"eta={eta:g}"]["downstream"].setdefault(name, []).append(round(acc, 6))
                print(f"[{PROG}] eta {eta:g}, {name}, seed {seed}: {100 * acc:.1f}%", flush=True)
    means = {name: float(np.mean(v)) for name, v in rows.items()}
    chosen = max(means, key=lambda n: (round(means[n], 6), -list(candidates).index(n)))
    lines = [TABLE_HEADER, "| --- | ---: | ---: | ---: | ---: |"]
    for name, v in rows.items():
        mark = " **(chosen)**" if name == chosen else ""
        lines.append(f"| {name}{mark} | {100 * np.mean(v):.1f}% | {100 * min(v):.1f}% | {100 * max(v):.1f}% | "
                     f"{len(v)} |")
    eta_lines = ["| eta | class fidelity (judge) | downstream acc. with the chosen CNN (mean) | score |",
                 "| --- | ---: | ---: | ---: |"]
    for key, s in sets.items():
        ds = float(np.mean(s["downstream"][chosen]))
        s["score"] = round(0.5 * (s["fidelity"] + ds), 6)
        eta_lines.append(f"| {key} | {100 * s['fidelity']:.1f}% | {100 * ds:.1f}% | {s['score']:.6f} |")
    print("\n".join(lines + [""] + eta_lines))
    print(f"chosen: {chosen} (mean {100 * means[chosen]:.2f}%)")
    report = {"command": " ".join(["python", "-m", "dpldm.experiments.tune_classifier"] + list(args.argv)),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
              "model": args.model or "the shipped public model", "per_class": per_class, "seeds": args.seeds,
              "candidates": {n: {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in c.items()},
                                 "accuracies": [round(a, 6) for a in rows[n]], "mean": round(means[n], 6)}
                             for n, c in candidates.items()},
              "sample_sets": sets, "chosen": chosen, "seconds": round(time.time() - t0, 1)}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
