"""Choose a DP recipe's settings on a PUBLIC proxy task: no private data is read (issue 16, docs/tuning.md).

Each candidate (the recipe, default configs/demo.toml, plus --set overrides, plus one point of the
--grid) is DP fine-tuned by THE trainer on the proxy's stand-in private set (scikit-learn's
handwritten digits, upsampled; dpldm.eval.proxy) at the target epsilon, with N, q and steps chosen
so that sigma and q*N equal the recipe's; its samples are scored by a judge trained only on public
digits (class fidelity) and by a CNN trained on the samples and tested on the proxy's held-out
split (downstream accuracy). The candidate with the highest score (configs/proxy/digits.toml:
score; ties: the first in grid order) is chosen. Candidates that differ only in sampling settings
(guidance, eta, sampler, sample steps) share one fine-tuned model.

    python -m dpldm.experiments.tune_public --grid diffusion.guidance_scale=1,2 --grid diffusion.timesteps_per_example=1,4
    python -m dpldm.experiments.tune_public --quick --grid diffusion.guidance_scale=1,2        # smoke run (tests)

Prints a table; writes <out>/report.json (atomically), a sample grid per candidate, the stand-in
set (<out>/proxy_private_N.npz, public) and the proxy's fine-tuned models (<out>/finetune/). An --out
whose stand-in set differs from this run's (another --seed or proxy config) is refused. A fine-tuning
stopped by SIGINT/SIGTERM or a STOP file keeps its checkpoint: the tool says so in one line and exits
130 without a report; the same command continues it.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import itertools
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]

from dpldm.config import ConfigError, RunConfig, load_config, parse_override
from dpldm.errors import InputError, UserError

PROG = "tune_public"
# set by the tool for every proxy run: a candidate may not change them
CONTROLLED = ("data.private", "privacy.epsilon", "privacy.sample_rate", "privacy.steps", "privacy.noise_multiplier",
              "privacy.enabled", "train.deterministic", "train.not_private", "train.seed", "train.out_dir",
              "train.wandb", "train.threads", "train.sample_every", "train.checkpoint_every")
# read only when sampling: candidates that differ only here share one fine-tuned model
SAMPLING_KEYS = ("diffusion.guidance_scale", "diffusion.eta", "diffusion.sample_steps", "diffusion.sampler")
BASELINE = "public model, no fine-tuning (reference)"
TABLE_HEADER = "| candidate | class fidelity (judge): mean | worst class | downstream acc. (proxy test) | score |"


class Stopped(Exception):
    """A proxy fine-tuning stopped before its last step (SIGINT, SIGTERM, a STOP file): checkpointed."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (no usage block)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(ROOT / "configs" / "demo.toml"), help="the recipe being tuned (read only)")
    p.add_argument("--proxy", default=str(ROOT / "configs" / "proxy" / "digits.toml"), help="the proxy task's settings")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="fixed recipe override")
    p.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                   help="a recipe key and its candidate values (repeat: the cartesian product is swept)")
    p.add_argument("--epsilon", type=float, default=None, help="target epsilon (default: the recipe's)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run ([quick] of the proxy config)")
    p.add_argument("--out", default=str(ROOT / "runs" / "tune_public"))
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--seed", type=int, default=None,
                   help="the proxy's seed (DP noise, sampling, CNN) in place of the proxy config's: a second "
                        "seed tells a real difference from one run's spread")
    p.add_argument("--baseline", action="store_true",
                   help="also score the public init model without fine-tuning (a reference row, never chosen)")
    return p.parse_args(argv)


# -- candidates ---------------------------------------------------------------------------------

def split_values(text: str) -> list[str]:
    """'1,2' -> ['1', '2']; commas inside [...] or "..." do not split."""
    out, depth, quote, cur = [], 0, False, ""
    for ch in text:
        if ch == '"':
            quote = not quote
        elif not quote and ch == "[":
            depth += 1
        elif not quote and ch == "]":
            depth -= 1
        if ch == "," and depth == 0 and not quote:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def key_of(text: str, flag: str) -> str:
    """section.key of an override (after checking its form); refuses keys the tool sets."""
    try:
        section, key, _ = parse_override(text)
    except ConfigError:
        raise UserError(f"{flag} {text!r}: expected section.key=value") from None
    name = f"{section}.{key}"
    if name in CONTROLLED:
        raise UserError(f"{flag} {text!r}: {name} is set by the proxy for every candidate and cannot be changed here "
                        f"(set by the tool: {', '.join(CONTROLLED)})")
    return name


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """[(section.key, ['section.key=v1', 'section.key=v2', ...]), ...] in flag order."""
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        if "=" not in item:
            raise UserError(f"--grid {item!r}: expected section.key=v1,v2,...")
        path, raw = item.split("=", 1)
        values = [v.strip() for v in split_values(raw)]
        if not raw.strip() or any(not v for v in values):
            raise UserError(f"--grid {item!r}: an empty value (expected section.key=v1,v2,...)")
        name = key_of(f"{path}={values[0]}", "--grid")
        if name in [k for k, _ in grid]:
            raise UserError(f"--grid {item!r}: {name} is swept twice; give all its values in one --grid")
        if len(set(values)) != len(values):
            raise UserError(f"--grid {item!r}: a value is repeated")
        grid.append((name, [f"{path.strip()}={v}" for v in values]))
    return grid


@dataclass
class Candidate:
    name: str  # "guidance_scale=2, timesteps_per_example=4" (the grid point; "recipe" without a grid)
    overrides: list[str]  # the grid point's section.key=value
    cfg: RunConfig | None = None  # the proxy run's config
    result: dict[str, Any] = field(default_factory=dict)


def build_candidates(recipe: str, sets: list[str], grid: list[tuple[str, list[str]]]) -> list[Candidate]:
    """Every grid point's config is loaded (and so validated) before any work starts."""
    cands = []
    for point in itertools.product(*[values for _, values in grid]) if grid else [()]:
        overrides = list(point)
        load_config(recipe, sets + overrides)  # ConfigError on a bad value, before anything runs
        name = ", ".join(o.split(".", 1)[1] for o in overrides) or "recipe"
        cands.append(Candidate(name, overrides))
    return cands


def proxy_overrides(npz: Path, epsilon: float, steps: int, run_dir: Path, seed: int, threads: int) -> list[str]:
    """What the tool sets on every candidate (CONTROLLED): the stand-in private set, the target epsilon,
    seeded (public data) runs reported as not private, one checkpoint at the end."""
    return [f"data.private={json.dumps(str(npz))}", f"privacy.epsilon={epsilon!r}", f"privacy.steps={steps}",
            "train.deterministic=true", "train.not_private=true", f"train.seed={seed}",
            f"train.out_dir={json.dumps(str(run_dir))}", "train.wandb=false", f"train.threads={threads}",
            "train.sample_every=0", f"train.checkpoint_every={steps}"]


def training_key(cfg: RunConfig, data_sha: str) -> str:
    """Hash of everything the fine-tuning reads: the config minus the sampling settings and the run
    folder, plus the stand-in set's content."""
    d = cfg.to_dict()
    for k in SAMPLING_KEYS:
        section, key = k.split(".")
        d[section].pop(key)
    d["train"].pop("out_dir")
    return hashlib.sha256((json.dumps(d, sort_keys=True) + data_sha).encode()).hexdigest()[:16]


# -- the sweep ----------------------------------------------------------------------------------

def finetune(cfg: RunConfig, run_dir: Path, verbose: bool):
    """THE trainer on the stand-in set (or its finished model from an earlier invocation)."""
    from dpldm.models.ldm import load_ldm
    from dpldm.train.dp_finetune import FinetuneOptions, train

    if (run_dir / "model" / "meta.json").is_file():
        print(f"[tune] reusing the proxy model in {run_dir / 'model'}", flush=True)
        ldm = load_ldm(run_dir / "model")
        return ldm, ldm.meta["privacy"]
    res = train(cfg, FinetuneOptions(out=run_dir, init=cfg.train.init_checkpoint or None, resume="auto",
                                      verbose=verbose, command=PROG))
    if res["model"] is None:  # stopped before the last step: no model released, the checkpoint is kept
        raise Stopped(f"the proxy fine-tuning in {run_dir} stopped at step {res['steps_done']} of "
                      f"{cfg.privacy.steps} ({res.get('stop_reason')}); its checkpoint is kept: run the same command "
                      "again to continue (no report was written)")
    return load_ldm(res["model"]), res["privacy"]


def score_candidate(ldm, cand: Candidate, judge, splits, proxy, out: Path) -> dict[str, Any]:
    from dpldm.demo import sample_per_class, save_class_grid
    from dpldm.eval.classifier import ClassifierConfig, downstream_accuracy
    from dpldm.eval.proxy import NUM_CLASSES, class_fidelity, combined_score, predict

    ldm.cfg = cand.cfg  # the candidate's sampling settings (guidance, eta, steps, sampler)
    t0 = time.time()
    images, labels = sample_per_class(ldm, NUM_CLASSES, proxy.samples_per_class, seed=proxy.seed, progress=False)
    grid = save_class_grid(images, labels, NUM_CLASSES, out / "samples" / f"{slug(cand.name)}.png")
    per_class, fidelity = class_fidelity(predict(judge, images), labels)
    ds = downstream_accuracy(images, labels, splits.heldout_x, splits.heldout_y, num_classes=NUM_CLASSES,
                             config=ClassifierConfig(epochs=proxy.classifier_epochs, seed=proxy.seed))
    score = round(combined_score(fidelity, ds["accuracy"], proxy.score), 6)
    return {"fidelity_per_class": [round(p, 6) for p in per_class], "fidelity": round(fidelity, 6),
            "downstream_accuracy": round(ds["accuracy"], 6), "n_test": ds["n_test_real"],
            "downstream_selected_epoch": ds["selected_epoch"], "score": score, "samples_grid": str(grid),
            "n_samples": int(len(images)), "seconds_scoring": round(time.time() - t0, 1)}


def choose(scores: list[float]) -> int:
    """The index of the highest score (the scores are rounded to the 6 decimals printed); the first of
    equal scores, in grid order."""
    best = max(scores)
    return scores.index(best)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "=.-" else "_" for c in name.replace(", ", "__"))


def table(cands: list[Candidate], chosen: int, baseline: Candidate | None = None) -> str:
    """The markdown table: one row per candidate (the chosen one marked), then the baseline (never chosen)."""
    lines = [TABLE_HEADER, "| --- | ---: | ---: | ---: | ---: |"]
    for i, c in enumerate(cands + ([baseline] if baseline else [])):
        r = c.result
        worst = min(range(len(r["fidelity_per_class"])), key=lambda k: r["fidelity_per_class"][k])
        mark = " **(chosen)**" if i == chosen else ""
        lines.append(f"| {c.name}{mark} | {100 * r['fidelity']:.1f}% | {100 * r['fidelity_per_class'][worst]:.1f}% "
                     f"('{worst}') | {100 * r['downstream_accuracy']:.1f}% | {r['score']:.6f} |")
    return "\n".join(lines)


def standin_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    return hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()


def stored_standin_sha256(npz: Path) -> str | None:
    """The sha256 of the stand-in set an earlier run left in its --out (None: not a readable set)."""
    try:
        with np.load(npz, allow_pickle=False) as z:
            return standin_sha256(z["images"], z["labels"])
    except Exception:  # noqa: BLE001 - a folder, not an .npz, no such arrays: not the tool's file
        return None


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def run(args: argparse.Namespace) -> int:
    from dpldm.eval.proxy import (NUM_CLASSES, class_fidelity, load_proxy, load_proxy_config, match_noise,
                                  predict, standin_private_set, train_judge)
    from dpldm.utils.io import atomic_write_text

    if not 1 <= args.threads <= 4096:
        raise UserError(f"--threads must lie in [1, 4096], got {args.threads}")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise UserError(f"--seed must lie in [0, 2**63), got {args.seed}")
    if args.epsilon is not None and not (np.isfinite(args.epsilon) and args.epsilon > 0):
        raise UserError(f"--epsilon must be a finite number > 0, got {args.epsilon}")
    out = Path(args.out)
    for anc in [out.absolute(), *out.absolute().parents]:
        if anc.exists() and not anc.is_dir():
            raise UserError(f"--out {args.out}: cannot use it as the output folder, {anc} is a file")
    proxy, quick_sets = load_proxy_config(args.proxy, quick=args.quick)
    if args.seed is not None:
        proxy = dataclasses.replace(proxy, seed=args.seed)
    for s in args.set:
        key_of(s, "--set")
    sets = quick_sets + list(args.set)
    grid = parse_grid(args.grid)
    cands = build_candidates(args.recipe, sets, grid)
    recipe_cfg = load_config(args.recipe, sets)
    epsilon = args.epsilon if args.epsilon is not None else recipe_cfg.privacy.epsilon
    if epsilon is None:
        raise UserError(f"{args.recipe}: no privacy.epsilon; pass --epsilon")
    if recipe_cfg.data.num_classes != NUM_CLASSES:
        raise UserError(f"{args.recipe}: data.num_classes = {recipe_cfg.data.num_classes}, the digit proxy has "
                        f"{NUM_CLASSES} classes")
    torch.set_num_threads(args.threads)
    t_start = time.time()

    # the stand-in private set, sized so that sigma and q*N match the recipe's (or [quick]'s N)
    pc = recipe_cfg.privacy
    if proxy.match_sigma:
        if pc.sample_rate is not None:
            raise UserError(f"{args.recipe}: privacy.sample_rate is set; the proxy matches an expected batch "
                            "(privacy.expected_batch_size), so leave sample_rate unset")
        match = match_noise(epsilon, pc.delta, pc.expected_batch_size, pc.steps, proxy, pc.accountant)
        n, steps = match.num_examples, match.steps
        print(f"[tune] proxy noise matched to the recipe: sigma {match.sigma_reference:.4f} (recipe: q = "
              f"{pc.expected_batch_size}/{proxy.reference_num_examples}, {pc.steps} steps, eps {epsilon:g}); proxy "
              f"q = {match.sample_rate:.4f}, N = {n}, {steps} steps, q*N = {pc.expected_batch_size}", flush=True)
    else:
        match, n, steps = None, proxy.num_examples, proxy.steps or pc.steps
        print(f"[tune] proxy N = {n}, {steps} steps (sigma not matched: [quick] or match_sigma = false)", flush=True)
    splits = load_proxy(proxy)
    if pc.expected_batch_size > n:
        raise UserError(f"privacy.expected_batch_size={pc.expected_batch_size} exceeds the proxy's N={n} "
                        "(proxy.num_examples)")
    images, labels = standin_private_set(splits, n, proxy)
    npz = out / f"proxy_private_{n}.npz"
    data_sha = standin_sha256(images, labels)
    if npz.exists():  # the proxy runs read it by name: never train on another run's set under this one's hash
        held = stored_standin_sha256(npz)
        if held != data_sha:
            what = ("another stand-in set than this run's (made with another --seed or proxy config)" if held
                    else "no readable stand-in set")
            raise UserError(f"{npz} holds {what}; use another --out (nothing was changed)")
    out.mkdir(parents=True, exist_ok=True)
    if not npz.is_file():
        tmp = out / f".{npz.name}.tmp.npz"
        np.savez(tmp, images=images, labels=labels)
        os.replace(tmp, npz)

    # the public judge: trained on the held-out half only; its accuracy read on the stand-in half
    t0 = time.time()
    judge = train_judge(splits.heldout_x, splits.heldout_y, proxy)
    judge_per_class, judge_acc = class_fidelity(predict(judge, splits.standin_x), splits.standin_y)
    print(f"[tune] public judge: trained on {len(splits.heldout_y)} held-out digits, reads "
          f"{100 * judge_acc:.1f}% of the {len(splits.standin_y)} stand-in digits correctly (class mean; "
          f"{time.time() - t0:.0f} s)", flush=True)

    # fine-tune once per training setting, score every candidate
    models: dict[str, tuple[Any, dict]] = {}
    for cand in cands:
        run_probe = out / "finetune" / "x"
        base = proxy_overrides(npz, epsilon, steps, run_probe, proxy.seed, args.threads)
        cfg = load_config(args.recipe, sets + cand.overrides + base)
        key = training_key(cfg, data_sha)
        run_dir = out / "finetune" / f"ft-{key}"
        cand.cfg = load_config(args.recipe, sets + cand.overrides +
                               proxy_overrides(npz, epsilon, steps, run_dir, proxy.seed, args.threads))
        if cand.cfg.data.private != str(npz):  # never a private source
            raise RuntimeError(f"the proxy run would read {cand.cfg.data.private!r}")
        print(f"[tune] candidate {cand.name}: fine-tuning key {key}", flush=True)
        if key not in models:
            models[key] = finetune(cand.cfg, run_dir, verbose=not args.quick)
        ldm, privacy = models[key]
        cand.result = {"finetune_key": key, "sigma": privacy["noise_multiplier"], "q": privacy["sample_rate"],
                       "num_examples": privacy["num_examples"], "steps": privacy["steps"],
                       **score_candidate(ldm, cand, judge, splits, proxy, out)}
        r = cand.result
        print(f"[tune] candidate {cand.name}: class fidelity {100 * r['fidelity']:.1f}%, downstream "
              f"{100 * r['downstream_accuracy']:.1f}%, score {r['score']:.6f}", flush=True)

    baseline = None
    if args.baseline:  # the public model as it is: what the DP fine-tuning must improve on
        from dpldm.models.ldm import load_ldm, public_model_path

        baseline = Candidate(BASELINE, [], cfg=load_config(args.recipe, sets + proxy_overrides(
            npz, epsilon, steps, out / "finetune" / "baseline", proxy.seed, args.threads)))
        init = baseline.cfg.train.init_checkpoint or public_model_path()
        baseline.result = {"init": str(init), **score_candidate(load_ldm(init), baseline, judge, splits, proxy, out)}

    scores = [c.result["score"] for c in cands]
    chosen = choose(scores)
    print("\n" + table(cands, chosen, baseline))
    print(f"\nchosen: {cands[chosen].name} (score {scores[chosen]:.6f}; score = {proxy.score})")
    report = {
        "command": " ".join(["python -m dpldm.experiments.tune_public", *args.argv]),
        "date": datetime.date.today().isoformat(), "machine": machine(), "quick": args.quick,
        "recipe": str(args.recipe), "set": sets, "grid": [[k, v] for k, v in grid], "epsilon": epsilon,
        "proxy": asdict(proxy), "noise_match": asdict(match) if match else None,
        "proxy_num_examples": n, "proxy_steps": steps, "stand_in_sha256": data_sha,
        "judge": {"trained_on": f"{len(splits.heldout_y)} held-out sklearn digits (public)",
                  "accuracy_on_stand_in": round(judge_acc, 6), "per_class": [round(p, 6) for p in judge_per_class]},
        "candidates": [{"name": c.name, "overrides": c.overrides, **c.result} for c in cands],
        "baseline": {"name": baseline.name, **baseline.result} if baseline else None,
        "chosen": {"index": chosen, "name": cands[chosen].name, "overrides": cands[chosen].overrides,
                   "score": scores[chosen]},
        "seconds": round(time.time() - t_start, 1),
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    print(f"[tune] wrote {out / 'report.json'}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except (InputError, ConfigError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"{PROG}: stopped: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (no report was written)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
