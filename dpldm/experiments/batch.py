"""`dpldm experiment batch`: large-batch scaling at fixed privacy (the paper's open question 2; De et
al. 2022, Sander et al. 2023: larger batches at equal noise per example).

For every expected batch B (--batches, default 125 ... 4000 = N, q = B/N up to 1) and target
epsilon (--epsilons, default 10 1), DP fine-tuning with the recipe (configs/demo.toml) in two modes:
  examples  a fixed number of examples processed, E = the recipe's expected batch x steps
            (1000 x 100): steps T = E/B (800 ... 25)
  steps     a fixed number of steps, the recipe's T = 100
sigma is calibrated per point by the trainer's accountant for (q, T, epsilon, delta). A point
(epsilon, B, T) in both modes (B = E/T: the recipe itself) runs once. Each point fine-tunes in a
fresh child process (dpldm/experiments/batch_point.py) that reports its own peak resident memory
and the wall time of the fine-tuning; the released model is judged as in utility.py (samples per
class -> FID/KID and a downstream CNN's accuracy on the real test digits). Rows: accuracy, FID,
sigma, the noise per coordinate of the averaged update sigma*C/B, epsilon spent, wall time and peak
memory; a figure of accuracy, sigma*C/B and peak memory against B. Nothing is tuned here: the lr
and the other recipe values are the recipe's (chosen on the public proxy at B = 1000).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from dpldm.errors import UserError
from dpldm.experiments import common

NAME = "batch"
BATCHES = (125, 250, 500, 1000, 2000, 4000)
EPSILONS = (10.0, 1.0)
MODES = ("examples", "steps")
MODE_TEXT = {"examples": "fixed examples processed (B x T = E)", "steps": "fixed steps"}
QUICK_BATCHES, QUICK_EPSILONS = (8, 16, 32), (10.0,)
QUICK_REFERENCE = ["privacy.expected_batch_size=32", "privacy.steps=1"]  # --quick: E = 32, T = 1
FLAT_MEMORY = 0.10  # acceptance: peak memory within 10% across the sweep
NO_WALL = (" privacy.fixed_shape = false: a step's duration follows its realised Poisson batch (a private count), "
           "so no wall time is reported.")
EQUAL_NOISE = 0.10  # sigma*C/B within 10% of the largest batch's counts as equal noise per coordinate


@dataclass(frozen=True)
class Point:
    epsilon: float
    batch: int
    steps: int
    rep: int

    @property
    def key(self) -> str:
        return f"eps={self.epsilon:g}@B={self.batch}@T={self.steps}@rep={self.rep}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batches", type=int, nargs="+", default=None, metavar="B",
                   help=f"expected batch sizes (default {' '.join(map(str, BATCHES))}; "
                        f"{' '.join(map(str, QUICK_BATCHES))} with --quick)")
    p.add_argument("--epsilons", type=float, nargs="+", default=None,
                   help=f"target epsilons (default {' '.join(f'{e:g}' for e in EPSILONS)}; "
                        f"{' '.join(f'{e:g}' for e in QUICK_EPSILONS)} with --quick)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                   help="examples: B x steps fixed to the recipe's; steps: the recipe's steps (default both)")
    p.add_argument("--repeats", type=int, default=1, help="fresh private runs per point (error bars when > 1)")
    p.add_argument("--samples-per-class", type=int, default=None, help="samples per class judged (default 200; 3 "
                                                                       "with --quick)")
    p.add_argument("--fid-samples", type=int, default=200, help="real and synthetic images for FID/KID")
    p.add_argument("--no-fid", action="store_true", help="skip FID/KID (always off with --quick)")


# -- the plan ------------------------------------------------------------------------------------------

def steps_for(mode: str, batch: int, examples: int, fixed_steps: int) -> int:
    """Steps of a point: E/B (mode examples; must be an integer) or the recipe's (mode steps)."""
    if mode == "steps":
        return fixed_steps
    if examples % batch:
        raise UserError(f"--batches: {batch} does not divide the {examples} examples processed in mode 'examples' "
                        f"(the recipe's expected batch x steps): steps = E/B must be an integer")
    return examples // batch


def make_plan(batches: list[int], modes: list[str], num_examples: int, examples: int,
              fixed_steps: int) -> dict[str, list[tuple[int, int]]]:
    """mode -> [(B, T), ...] in batch order; B > N (q > 1) refused."""
    for b in batches:
        if b > num_examples:
            raise UserError(f"--batches: {b} exceeds the N={num_examples} private examples (q = B/N must be <= 1)")
    return {m: [(b, steps_for(m, b, examples, fixed_steps)) for b in sorted(batches)] for m in modes}


def points_of(plan: dict[str, list[tuple[int, int]]], epsilons: list[float], repeats: int) -> list[Point]:
    """Distinct points, repetition by repetition (an interrupted sweep leaves whole repetitions);
    a (B, T) in both modes once."""
    out: list[Point] = []
    for rep in range(repeats):
        for eps in epsilons:
            for b, t in sorted({bt for pts in plan.values() for bt in pts}):
                out.append(Point(eps, b, t, rep))
    return out


def noise_per_coordinate(sigma: float, max_grad_norm: float, expected_batch: float) -> float:
    """Std of the Gaussian noise per coordinate of the averaged update: sigma * C / (qN)."""
    return sigma * max_grad_norm / expected_batch


# -- the recipe -----------------------------------------------------------------------------------------

def check_recipe(cfg) -> None:
    pc = cfg.privacy
    if not pc.enabled:
        raise UserError("privacy.enabled = false: the batch sweep runs private fine-tunings only")
    if pc.sample_rate is not None:
        raise UserError(f"privacy.sample_rate = {pc.sample_rate:g} (recipe or --set): the sweep sets q = B/N per point; "
                        "leave it unset")
    if pc.noise_multiplier is not None:
        raise UserError(f"privacy.noise_multiplier = {pc.noise_multiplier:g} (recipe or --set): the sweep calibrates sigma per point "
                        "for its (q, steps, epsilon); leave it unset")


def count_private(cfg, quick_source: str | None) -> int:
    """N, the private training examples (with --quick: the stratified subset cut from the source)."""
    from dpldm.train.private_data import is_shard_folder

    if quick_source is None and is_shard_folder(cfg.data.private):
        from dpldm.data.manifest import open_shard_folder

        return int(open_shard_folder(Path(cfg.data.private)).num_examples)
    from dpldm.data.sources import load_source
    from dpldm.experiments.utility import QUICK_PER_CLASS

    _, y, _ = load_source(quick_source or cfg.data.private, "train")
    if quick_source is None:
        return int(len(y))
    return int(sum(min(QUICK_PER_CLASS, int((y == c).sum())) for c in set(y.tolist())))


def settings_of(cfg, args: argparse.Namespace, quick_source: str | None) -> dict:
    """What a point's numbers depend on besides (epsilon, B, T, repetition): the recipe less what
    the sweep sets per point, and the evaluation protocol. Threads and --out are excluded."""
    import dataclasses

    from dpldm.experiments.utility import QUICK_PER_CLASS, downstream_config, fid_off, samples_per_class

    d = cfg.to_dict()
    for section, key in (("privacy", "epsilon"), ("privacy", "expected_batch_size"), ("privacy", "steps"),
                         ("train", "out_dir"), ("train", "threads"), ("train", "wandb")):
        d.get(section, {}).pop(key, None)
    if quick_source is not None:
        d["data"]["private"] = f"{quick_source} (--quick subset, {QUICK_PER_CLASS} per class)"
    cnn = dataclasses.asdict(downstream_config(args, seed=0))
    cnn.pop("seed")
    return json.loads(json.dumps({"recipe": d, "quick": bool(args.quick), "samples_per_class": samples_per_class(args),
                                  "fid": None if fid_off(args) else {"samples": args.fid_samples, "subset_seed": 0},
                                  "downstream_cnn": cnn}))


# -- one point, in a child process ----------------------------------------------------------------------

def point_sets(sets: list[str], p: Point) -> list[str]:
    return [*sets, f"privacy.expected_batch_size={p.batch}", f"privacy.steps={p.steps}", f"privacy.epsilon={p.epsilon!r}"]


def run_child(spec: dict, folder: Path, key: str) -> dict:
    """`python -m dpldm.experiments.batch_point` on a spec file; its result (RESULT.json)."""
    spec_path, result_path = folder / f"{key}.spec.json", folder / f"{key}.result.json"
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(common.ROOT), os.environ.get("PYTHONPATH")]))}
    rc = subprocess.run([sys.executable, "-m", "dpldm.experiments.batch_point", str(spec_path), str(result_path)],
                        env=env).returncode
    if rc != 0 or not result_path.is_file():
        raise UserError(f"batch point {key}: its process exited with status {rc} (its error above); finished points "
                        "stay in results.json: rerun the same command to resume")
    result = json.loads(result_path.read_text())
    spec_path.unlink(missing_ok=True)
    result_path.unlink(missing_ok=True)
    return result


def row_of(p: Point, result: dict, num_examples: int, fixed_shape_on: bool) -> dict:
    """The point's row for results.json (plain values)."""
    ft, priv = result["finetune"], result["finetune"]["privacy"]
    q = priv["sample_rate"]
    if not math.isclose(q, p.batch / num_examples, rel_tol=1e-9):
        raise RuntimeError(f"point {p.key}: the run used q={q}, not B/N={p.batch / num_examples}")
    fs = priv.get("fixed_shape") or {}
    row = {"epsilon_target": p.epsilon, "batch": p.batch, "steps": p.steps, "rep": p.rep, "seed": p.rep,
           "num_examples": num_examples, "sample_rate": q, "examples_processed": p.batch * p.steps,
           "noise_multiplier": priv["noise_multiplier"], "max_grad_norm": priv["max_grad_norm"],
           "noise_per_coordinate": noise_per_coordinate(priv["noise_multiplier"], priv["max_grad_norm"],
                                                        priv["expected_batch_size"]),
           "epsilon": priv["epsilon"], "delta_total": priv.get("delta_total"), "accountant": priv["accountant"],
           "trainable_parameters": priv.get("trainable_parameters"), "slots_per_step": fs.get("max_batch"),
           "wall_s": ft["wall_s"] if fixed_shape_on else None, "peak_rss_mb": ft["peak_rss_mb"],
           "resumed": ft["resumed"]}
    return {**row, **{k: v for k, v in result["eval"].items() if k not in row}}


# -- the report ---------------------------------------------------------------------------------------

def mode_rows(runs: dict, plan: dict, mode: str, eps: float, repeats: int) -> list[tuple[int, int, list[dict]]]:
    """(B, T, the finished repetitions' rows) of one (mode, epsilon) line, in batch order."""
    return [(b, t, [runs[k] for k in (Point(eps, b, t, r).key for r in range(repeats)) if k in runs])
            for b, t in plan[mode]]


def table(runs: dict, plan: dict, eps: float, repeats: int, num_examples: int) -> str:
    head = ("| mode | B | q | steps | B x steps | sigma | sigma*C/B | epsilon spent | accuracy (%) | FID | "
            "fine-tune wall (min) | peak RSS (MiB) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for mode in plan:
        for b, t, rows in mode_rows(runs, plan, mode, eps, repeats):
            st = {f: common.stat(r.get(f) for r in rows) for f in
                  ("noise_multiplier", "noise_per_coordinate", "epsilon", "accuracy", "fid", "wall_s", "peak_rss_mb")}
            mark = " †" if any(r.get("resumed") for r in rows) else ""
            npc = st["noise_per_coordinate"]
            lines.append(f"| {mode} | {b} | {b / num_examples:.4g} | {t} | {b * t} | "
                         f"{st['noise_multiplier'].text(digits=4)} | "
                         f"{'—' if npc.mean is None else f'{npc.mean:.3g}'} | {st['epsilon'].text(digits=3)} | "
                         f"{st['accuracy'].text(100.0, 1)} | {st['fid'].text(digits=1)} | "
                         f"{st['wall_s'].text(1 / 60, 1)}{mark} | {st['peak_rss_mb'].text(digits=0)}{mark} |")
    return "\n".join(lines)


def memory_summary(runs: dict, keys: list[str]) -> str:
    peaks = [runs[k]["peak_rss_mb"] for k in keys if k in runs and not runs[k].get("resumed")]
    if len(peaks) < 2:
        return "Peak memory: fewer than two uninterrupted points so far."
    lo, hi = min(peaks), max(peaks)
    spread = hi / lo - 1
    verdict = "within" if spread <= FLAT_MEMORY else "NOT within"
    return (f"Peak resident memory of the fine-tuning process ranges {lo:.0f}-{hi:.0f} MiB over {len(peaks)} "
            f"point(s): max/min - 1 = {100 * spread:.1f}%, {verdict} the {100 * FLAT_MEMORY:.0f}% acceptance "
            "(chunked accumulation: privacy.physical_batch_size examples per pass whatever B).")


def verdict(line: list[tuple]) -> str:
    """The cheapest smaller batch whose sigma*C/B is within EQUAL_NOISE of the largest batch's, and
    how its accuracy compares (judged against the repetitions' spread only when there is one)."""
    bref, tref, nref, aref = line[-1]
    near = [x for x in line[:-1] if abs(x[2].mean / nref.mean - 1) <= EQUAL_NOISE]
    if not near:
        return (f"no smaller batch has sigma*C/B within {100 * EQUAL_NOISE:.0f}% of B={bref}'s, so these points do not "
                "test the equivalence")
    b, t, n, a = min(near, key=lambda x: x[0] * x[1])
    diff = 100 * (a.mean - aref.mean)
    if a.std is None or aref.std is None:
        judged = "one repetition: no spread to judge it by"
    else:
        spread = 100 * math.hypot(a.std, aref.std)
        judged = f"{'within' if abs(diff) <= spread else 'outside'} the combined spread {spread:.1f}"
    return (f"the cheapest batch at equal noise per coordinate, B={b} ({b * t / (bref * tref):.2g}x the examples "
            f"processed), predicts B={bref}'s accuracy to {diff:+.1f} points ({judged})")


def prediction_lines(runs: dict, plan: dict, epsilons: list[float], repeats: int) -> list[str]:
    """Per (epsilon, mode): each smaller batch against the largest one, in noise per coordinate, in
    accuracy and in examples processed; then the verdict. Claims only what the numbers show."""
    out: list[str] = []
    for eps in epsilons:
        for mode in plan:
            line = [(b, t, common.stat(r.get("noise_per_coordinate") for r in rows),
                     common.stat(r.get("accuracy") for r in rows)) for b, t, rows in mode_rows(runs, plan, mode, eps, repeats)]
            line = [x for x in line if x[2].mean is not None and x[3].mean is not None]
            if len(line) < 2:
                continue
            bref, tref, nref, aref = line[-1]
            parts = [f"B={b}: sigma*C/B {n.mean / nref.mean:.2f}x, accuracy {100 * (a.mean - aref.mean):+.1f} points, "
                     f"{b * t / (bref * tref):.2g}x the examples" for b, t, n, a in line[:-1]]
            out.append(f"- epsilon {eps:g}, {MODE_TEXT[mode]}, against B={bref}: " + "; ".join(parts) +
                       f". Verdict: {verdict(line)}.")
    return out


def report_epsilons(args: argparse.Namespace, runs: dict) -> list[float]:
    """This invocation's epsilons, then any other in results.json (one invocation per epsilon may
    fill one folder, e.g. one per core: the last report shows them all)."""
    held = sorted({float(r["epsilon_target"]) for r in runs.values() if "epsilon_target" in r}, reverse=True)
    return list(args.epsilons) + [e for e in held if e not in args.epsilons]


def report(store, plan: dict, args: argparse.Namespace, figure: Path) -> Path:
    runs = store.runs
    fixed_shape = bool(store.settings["recipe"]["privacy"].get("fixed_shape", True))
    body = [f"Expected batch sweep at fixed privacy: N = {args.num_examples} private examples, E = "
            f"{args.examples} examples processed in mode 'examples', T = {args.fixed_steps} steps in mode 'steps'; "
            "sigma calibrated per point by the accountant for (q = B/N, steps, epsilon, delta). The lr, C, warm-up, "
            "EMA and every other recipe value are the recipe's, chosen on the public proxy at B = 1000 "
            "(docs/tuning.md): nothing was tuned on the private data, nor per batch.", ""]
    epsilons = report_epsilons(args, runs)
    for eps in epsilons:
        body += [f"## epsilon {eps:g}", "", table(runs, plan, eps, args.repeats, args.num_examples), ""]
    body += ["Mean ± sample std over repetitions. Wall time: the whole fine-tuning call (set-up, data "
             "encoding, sigma calibration, the steps; fixed-shape steps pad each step to a public number of slots, "
             "so small batches pay relatively more padding); † = resumed from a checkpoint (time and memory cover "
             "the rest only, excluded from the memory check)." + NO_WALL * (not fixed_shape), "", memory_summary(runs, [p.key for p in points_of(plan, epsilons, args.repeats)]), "",
             "Equal noise per example (does a cheap small-batch run predict the large-batch one?):", "",
             *(prediction_lines(runs, plan, epsilons, args.repeats) or ["- not enough finished points."]), ""]
    return common.write_report(Path(args.out), "Large-batch scaling at fixed privacy", store.data, "\n".join(body),
                               [figure])


def figure(store, plan: dict, args: argparse.Namespace) -> Path:
    from dpldm.experiments.figures import Series, line_panels

    npcs = [r["noise_per_coordinate"] for r in store.runs.values() if r.get("noise_per_coordinate")]
    scale = 10.0 ** math.floor(math.log10(min(npcs))) if npcs else 1.0
    panels: dict[str, list] = {"acc": [], "npc": [], "mem": []}
    for eps in report_epsilons(args, store.runs):
        for mode in plan:
            rows = mode_rows(store.runs, plan, mode, eps, args.repeats)
            xs = [b for b, _, _ in rows]
            label = f"ε={eps:g}, {mode}"
            for name, field, k in (("acc", "accuracy", 100.0), ("npc", "noise_per_coordinate", 1 / scale),
                                   ("mem", "peak_rss_mb", 1.0)):
                st = [common.stat(r.get(field) for r in rs) for _, _, rs in rows]
                panels[name].append(Series(label, xs, [None if s.mean is None else k * s.mean for s in st],
                                           [None if s.std is None else k * s.std for s in st]))
    batches = sorted({b for pts in plan.values() for b, _ in pts})
    return line_panels(Path(args.out) / "batch.png",
                       [("downstream accuracy (%)", panels["acc"]), (f"noise per coordinate σC/B (×{scale:.0e})",
                                                                    panels["npc"]),
                        ("peak RSS of the fine-tuning (MiB)", panels["mem"])],
                       xlabel="expected batch B (log scale)", title="Large-batch scaling at fixed privacy",
                       xscale="log", xticks=[(b, str(b)) for b in batches])


# -- main ---------------------------------------------------------------------------------------------

def check_args(args: argparse.Namespace) -> None:
    if args.batches is None:
        args.batches = list(QUICK_BATCHES if args.quick else BATCHES)
    if args.epsilons is None:
        args.epsilons = list(QUICK_EPSILONS if args.quick else EPSILONS)
    common.check_positive(args.batches, "--batches", integer=True)
    common.check_positive(args.epsilons, "--epsilons")
    if len(set(args.modes)) != len(args.modes):
        raise UserError(f"--modes: {' '.join(args.modes)} names a mode twice")
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    if args.samples_per_class is not None and args.samples_per_class < 2:
        raise UserError(f"--samples-per-class must be >= 2, got {args.samples_per_class}")
    if not args.no_fid and not args.quick and args.fid_samples < 2:
        raise UserError(f"--fid-samples must be >= 2, got {args.fid_samples} (or pass --no-fid)")


def run(args: argparse.Namespace) -> int:
    from dpldm.config import load_config
    from dpldm.experiments.store import ResultStore
    from dpldm.experiments.utility import QUICK_NPZ, QUICK_SETS, quick_private_source, samples_per_class

    common.check_common(args)
    check_args(args)
    out = Path(args.out)
    sets = (QUICK_SETS + QUICK_REFERENCE if args.quick else []) + list(args.set) + [f"train.threads={args.threads}"]
    base = load_config(args.config, sets)  # a bad recipe or --set: refused before anything is written
    check_recipe(base)
    source = base.data.private if args.quick else None
    args.num_examples = count_private(base, source)
    args.examples = base.privacy.expected_batch_size * base.privacy.steps
    args.fixed_steps = base.privacy.steps
    plan = make_plan(args.batches, args.modes, args.num_examples, args.examples, args.fixed_steps)
    pts = points_of(plan, args.epsilons, args.repeats)
    store = ResultStore(out, NAME, settings_of(base, args, source)).open()
    if args.quick:
        sets.append(f"data.private={json.dumps(str(quick_private_source(source, out.absolute() / QUICK_NPZ)))}")
    evaluation = {"quick": bool(args.quick), "samples_per_class": samples_per_class(args),
                  "fid_samples": args.fid_samples, "no_fid": bool(args.no_fid)}
    print(f"[batch] N={args.num_examples}; {len(pts)} point(s), {sum(p.key in store.runs for p in pts)} already in "
          f"{store.path}", flush=True)
    for p in common.progress(pts, "batch"):
        if p.key in store.runs:
            continue
        spec = {"config": str(Path(args.config).absolute()), "sets": point_sets(sets, p),
                "run_dir": str(out.absolute() / p.key), "finetune": base.train.finetune, "threads": args.threads,
                "seed": p.rep, "cache": str(out.absolute() / "cache"), "measured": str(out.absolute() / f"{p.key}.finetune.json"), "eval": evaluation, "verbose": not args.quick}
        row = row_of(p, run_child(spec, out, p.key), args.num_examples, base.privacy.fixed_shape)
        store.record(p.key, row)
        print(f"[batch] {p.key}: sigma {row['noise_multiplier']:.4g}, sigma*C/B {row['noise_per_coordinate']:.3g}, "
              f"accuracy {row.get('accuracy', float('nan')):.4f}, peak {row['peak_rss_mb']:.0f} MiB", flush=True)
    path = report(store, plan, args, figure(store, plan, args))
    print(f"[batch] wrote {path}, {out / 'batch.png'} and {store.path}", flush=True)
    return 0
