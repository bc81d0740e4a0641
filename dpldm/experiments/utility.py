"""Privacy-utility results on the embedded task (glyphs -> MNIST digits), `make results` (issue 16).

Variants; every private one runs --repeats times (default 3) at each epsilon (default 1, 5, 10):
  dp-attention          DP fine-tuning of every attention module + the class embedder (DP-LDM, ours)
  dp-attention-decoder  the paper's attention-range ablation: the middle + decoder-side SpatialTransformers
  dp-attention-last     ... only the last two decoder-side SpatialTransformers
  dp-full               DP fine-tuning of the whole UNet (the paper's comparison)
  dp-classifier         a CNN trained directly on the private digits with DP-SGD at the same epsilon:
                        shown BESIDE every generative row (and the margin ours - direct)
and once, without privacy:
  public                the glyph-pretrained model, no fine-tuning (its '0'-'9' glyph classes)
  nonprivate-attention  attention fine-tuning without clipping or noise (the ceiling)

The ablation's module numbers are computed from the model (`UNet.attention_modules()`, forward order,
1-based), printed and stored per run. Repetition r is a fresh private run in its own folder
(<out>/<variant>@eps=<e>@rep=<r>; noise, Poisson sampling and diffusion draws from the OS) whose
samples and downstream CNN are seeded with r; FID/KID always use the same real subset (seed 0).
Generative variants are judged as in the demo: samples per class -> FID/KID against the real
training digits and a CNN trained on the samples (selected on a synthetic split), reported once on
the real test digits. Every individual run is kept in <out>/results.json (a run already there is
not computed again, so an interrupted invocation resumes; an unfinished fine-tuning continues from
its checkpoint); the table (mean +- sample std over repetitions) is printed and written to
<out>/results.md. A results.json made with other settings (recipe, --set, protocol) is refused.

    python -m dpldm.experiments.utility                                  # the full protocol (hours on 2 CPU cores)
    python -m dpldm.experiments.utility --variants dp-attention dp-classifier --epsilons 10 --repeats 1
    python -m dpldm.experiments.utility --quick --out /tmp/results-quick # smoke run of the whole protocol (seconds)
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]

from dpldm.config import ConfigError, RunConfig, load_config
from dpldm.errors import InputError, UserError
from dpldm.utils.io import atomic_write_text
from dpldm.experiments.results_data import (DEFAULT_VARIANTS, DIRECT, GENERATIVE_PRIVATE, LEGACY_NOTE, ONCE,
                                            PRIVATE, VARIANTS,
                                            aggregate, check_run, markdown_table, migrate_legacy, run_key)
from dpldm.experiments.common import progress
from dpldm.experiments.store import ResultStore

PROG = "utility"
# --quick: a smoke run of the whole protocol (tests): a stratified subset of the private source
# (QUICK_PER_CLASS per class and split), 1 DP step of expected batch 16 (RDP), 4 DDIM steps, 3 samples per
# class, a 1-epoch downstream CNN, no FID
QUICK_SETS = ["privacy.steps=1", "privacy.expected_batch_size=16", "privacy.physical_batch_size=16",
              'privacy.backend="torch"', 'privacy.accountant="rdp"', "diffusion.sample_steps=4",
              "train.warmup_steps=0", "train.checkpoint_every=1"]
EPSILONS, REPEATS = (1.0, 5.0, 10.0), 3
QUICK_EPSILONS, QUICK_REPEATS = (1.0, 2.0), 2  # still two of each: pairing and spread are exercised
QUICK_PER_CLASS = 20
QUICK_NPZ = f"quick_private_{QUICK_PER_CLASS}.npz"
QUICK_SAMPLES_PER_CLASS = 3
QUICK_DIRECT = {"steps": 1, "expected_batch_size": 16, "accountant": "rdp"}  # DPClassifierConfig overrides


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (no usage block)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.toml"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--epsilons", type=float, nargs="+", default=None,
                   help=f"target epsilons (default {' '.join(f'{e:g}' for e in EPSILONS)}; "
                        f"{' '.join(f'{e:g}' for e in QUICK_EPSILONS)} with --quick)")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    p.add_argument("--repeat-once", action="store_true",
                   help="run the non-private variants --repeats times too (default: once)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"fresh private runs per (variant, epsilon) (default {REPEATS}; {QUICK_REPEATS} with --quick)")
    p.add_argument("--samples-per-class", type=int, default=None, help=f"default 200 ({QUICK_SAMPLES_PER_CLASS} with --quick)")
    p.add_argument("--fid-samples", type=int, default=200)
    p.add_argument("--no-fid", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run of the whole protocol (tiny runs, no FID)")
    p.add_argument("--out", default=str(ROOT / "runs" / "results"))
    p.add_argument("--threads", type=int, default=2, help="torch threads (run two invocations with 1 each on 2 cores)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Bad flags, before anything is read or written."""
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    for e in args.epsilons:
        if not (math.isfinite(e) and e > 0):
            raise UserError(f"--epsilons: every epsilon must be a finite number > 0, got {e}")
    names = [f"{e:g}" for e in args.epsilons]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"--epsilons: {', '.join(dup)} given twice")
    if not 1 <= args.threads <= 4096:
        raise UserError(f"--threads must lie in [1, 4096], got {args.threads}")
    if args.samples_per_class is not None and args.samples_per_class < 2:
        raise UserError(f"--samples-per-class must be >= 2 (the downstream CNN holds some out for validation), "
                        f"got {args.samples_per_class}")
    if not args.no_fid and not args.quick and args.fid_samples < 2:
        raise UserError(f"--fid-samples must be >= 2, got {args.fid_samples} (or pass --no-fid)")
    out = Path(args.out)
    for anc in [out.absolute(), *out.absolute().parents]:
        if anc.exists() and not anc.is_dir():
            raise UserError(f"--out {args.out}: cannot use it as the output folder, {anc} is a file")


# -- the ablation's module numbers ------------------------------------------------------------

def ranges_text(numbers: list[int]) -> str:
    """[3, 4, 5, 7] -> '3-5,7' (the `train.finetune` range syntax)."""
    parts: list[str] = []
    for k in sorted(numbers):
        if parts and k == int(parts[-1].split("-")[-1]) + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{k}"
        else:
            parts.append(str(k))
    return ",".join(parts)


def ablation_specs(unet) -> dict[str, str]:
    """`train.finetune` spec of every generative private variant, from the model: 1-based numbers of
    `unet.attention_modules()` (forward order: input blocks, middle block, output blocks)."""
    mods = unet.attention_modules()
    middle = {id(m) for m in unet.middle_block.modules()}
    decoder = {id(m) for m in unet.output_blocks.modules()}
    decoder_side = [k + 1 for k, m in enumerate(mods) if id(m) in middle or id(m) in decoder]
    last = [k + 1 for k, m in enumerate(mods) if id(m) in decoder][-2:]
    if not last:
        raise UserError(f"the UNet has no attention modules in its decoder (output blocks; {len(mods)} attention "
                        "modules in all): the attention-range ablation needs some (unet.attention_levels)")
    return {"dp-attention": "attention:all", "dp-attention-decoder": "attention:" + ranges_text(decoder_side),
            "dp-attention-last": "attention:" + ranges_text(last), "dp-full": "all"}


# -- results.json --------------------------------------------------------------------------------

def settings_of(base: RunConfig, args: argparse.Namespace, quick_source: str | None = None) -> tuple[dict, str]:
    """Everything a run's numbers depend on besides its (variant, epsilon, repetition): the recipe
    (minus what the tool sets per run) and the protocol; with --quick also the private source the
    subset is cut from (`quick_source`: the recipe's data.private then names the subset's file).
    Threads and the output folder are excluded."""
    from dpldm.eval.dp_classifier import config_dict

    d = base.to_dict()
    for section, key in (("privacy", "epsilon"), ("train", "finetune"), ("train", "out_dir"), ("train", "threads"),
                         ("train", "wandb")):
        d.get(section, {}).pop(key, None)
    cnn = dataclasses.asdict(downstream_config(args, seed=0))
    cnn.pop("seed")
    settings = json.loads(json.dumps({
        "recipe": d, "quick": bool(args.quick), "samples_per_class": samples_per_class(args),
        "fid": None if fid_off(args) else {"samples": args.fid_samples, "subset_seed": 0},
        "downstream_cnn": cnn, "direct_classifier": config_dict(direct_config(args)),
        **({"quick_source": quick_source} if args.quick else {})}))
    return settings, hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# -- the protocol's parts --------------------------------------------------------------------------

def samples_per_class(args) -> int:
    return args.samples_per_class if args.samples_per_class is not None else (
        QUICK_SAMPLES_PER_CLASS if args.quick else 200)


def fid_off(args) -> bool:
    return bool(args.no_fid or args.quick)


def direct_config(args):
    """The direct DP classifier's settings: DPClassifierConfig's defaults (chosen on the public proxy)."""
    from dpldm.eval.dp_classifier import DPClassifierConfig

    return DPClassifierConfig(**(QUICK_DIRECT if args.quick else {}))


def downstream_config(args, seed: int):
    """The downstream CNN's recipe (dpldm.eval.classifier's defaults), seeded per repetition."""
    from dpldm.eval.classifier import ClassifierConfig

    return dataclasses.replace(ClassifierConfig(), seed=seed, **({"epochs": 1} if args.quick else {}))


def quick_private_source(source: str, path: Path) -> Path:
    """--quick: a stratified subset (QUICK_PER_CLASS per class of each split) of the private source as
    an .npz with train_/test_ arrays, so the smoke run's fine-tunings encode few images; it records
    the source it was cut from (`source`), and a subset of another source is refused, never reused."""
    from dpldm.data.sources import load_source

    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                held = str(z["source"]) if "source" in z.files else None
        except Exception as e:  # noqa: BLE001 - a folder, not an .npz: not the tool's file
            raise UserError(f"{path}: not a --quick subset this tool wrote ({type(e).__name__}); use another --out "
                            "(nothing was changed)") from None
        if held != source:
            cut = f"cut from data.private={held!r}" if held is not None else "that does not record its data.private"
            raise UserError(f"{path}: a --quick subset {cut}, not from {source!r}; use another --out (nothing was "
                            "changed)")
        return path
    arrays = {"source": np.array(source)}
    for split in ("train", "test"):
        x, y, _ = load_source(source, split)
        idx = np.concatenate([np.flatnonzero(y == c)[:QUICK_PER_CLASS] for c in np.unique(y)])  # (n,)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x[idx], y[idx]
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def evaluate_generative(ldm, cfg: RunConfig, args, cache: Path, seed: int) -> dict:
    from dpldm.data.sources import load_source
    from dpldm.demo import sample_per_class
    from dpldm.eval.evaluate import evaluate_synthetic

    images, labels = sample_per_class(ldm, cfg.data.num_classes, samples_per_class(args), seed=seed, progress=False)
    train_x, _, _ = load_source(cfg.data.private, "train")
    test_x, test_y, _ = load_source(cfg.data.private, "test")
    return evaluate_synthetic(images, labels, real_train=train_x, real_test=(test_x, test_y), n_fid=args.fid_samples,
                              cache_dir=cache, compute_fid=not fid_off(args), num_classes=cfg.data.num_classes,
                              classifier_config=downstream_config(args, seed), seed=0, log=None)


def run_dp_finetune(cfg: RunConfig, out: Path, finetune_spec: str, verbose: bool) -> tuple:
    from dpldm.models.ldm import load_ldm
    from dpldm.train.dp_finetune import FinetuneOptions, train

    cfg.train.finetune = finetune_spec
    cfg.train.out_dir = str(out)
    cfg.train.wandb = False
    res = train(cfg, FinetuneOptions(out=out, init=cfg.train.init_checkpoint or None, resume="auto",
                                     verbose=verbose, command="python -m dpldm.experiments.utility"))  # continue an interrupted run
    return load_ldm(res["model"]), res["privacy"]


def run_nonprivate_finetune(cfg: RunConfig, out: Path) -> tuple:
    """Attention fine-tuning with plain AdamW on uniformly drawn batches of the same expected
    size and the same number of steps as the DP runs: no clipping, no noise (the ceiling)."""
    from dpldm.data.latents import ae_state_hash
    from dpldm.diffusion.ema import EMA
    from dpldm.models.ldm import load_public_model
    from dpldm.models.selection import apply_finetune, count_parameters
    from dpldm.parallel.dist import single_process_context
    from dpldm.train.dp_loss import ChunkBatch, DiffusionDPLoss
    from dpldm.train.private_data import open_private_data

    ldm = load_public_model()
    ldm.cfg = cfg
    ldm.copy_ema_to_unet()
    apply_finetune(ldm.unet, cfg.train.finetune)
    data = open_private_data(cfg, single_process_context(), ae=ldm.ae, ae_sha256=ae_state_hash(ldm.ae.state_dict()))
    params = [p for p in ldm.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr)
    ema = EMA(ldm.unet, cfg.train.ema_decay)
    loss_fn = DiffusionDPLoss(ldm.schedule, scale_factor=ldm.scale_factor,
                              timesteps_per_example=cfg.diffusion.timesteps_per_example,
                              cond_drop_prob=cfg.diffusion.cond_drop_prob, seed=cfg.train.seed, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(cfg.train.seed)
    B, pb = cfg.privacy.expected_batch_size, cfg.privacy.physical_batch_size
    for step in range(cfg.privacy.steps):
        idx = torch.randint(0, len(data), (B,), generator=g)  # (B,)
        opt.zero_grad(set_to_none=True)
        for s in range(0, B, pb):
            z0, y = data.dataset.get_batch(idx[s:s + pb])
            loss = loss_fn(ldm.unet, ChunkBatch(z0, y, idx[s:s + pb], step)).sum() / B
            loss.backward()
        opt.step()
        ema.update(ldm.unet)
    ldm.unet.load_state_dict(ema.module.state_dict())
    ldm.ema = EMA(ldm.unet, cfg.train.ema_decay)
    total, trainable = count_parameters(ldm.unet)
    return ldm, {"epsilon": float("inf"), "trainable_parameters": trainable, "steps": cfg.privacy.steps}


def run_dp_classifier(cfg: RunConfig, epsilon: float, seed: int, dc) -> dict:
    """The direct DP-SGD classifier (dpldm.eval.dp_classifier) on the private train split at the same
    (epsilon, delta), read once on the test split; `seed` initialises the CNN (noise and Poisson plan
    from the OS)."""
    from dpldm.data.sources import load_source
    from dpldm.eval.dp_classifier import train_dp_classifier

    x, y, _ = load_source(cfg.data.private, "train")
    xt, yt, _ = load_source(cfg.data.private, "test")
    res = train_dp_classifier(x, y, xt, yt, epsilon=epsilon, delta=cfg.privacy.delta, config=dc, seed=seed,
                              num_classes=cfg.data.num_classes)
    return {**res, "fid": None}


def run_real_classifier(cfg: RunConfig, args, seed: int) -> dict:
    """The downstream CNN trained on the real private train split without privacy (the direct
    classifier's epsilon = inf ceiling), read once on the test split."""
    from dpldm.data.sources import load_source
    from dpldm.eval.classifier import downstream_accuracy

    x, y, _ = load_source(cfg.data.private, "train")
    xt, yt, _ = load_source(cfg.data.private, "test")
    res = downstream_accuracy(x, y, xt, yt, num_classes=cfg.data.num_classes, config=downstream_config(args, seed))
    return {"accuracy": res["accuracy"], "mean_per_class_accuracy": res["mean_per_class_accuracy"],
            "epsilon": float("inf"), "trainable_parameters": None, "fid": None}


def run_one(variant: str, eps: float | None, rep: int, cfg: RunConfig, specs: dict, args, out: Path) -> dict:
    """One run of the protocol; its row for results.json (plain values only)."""
    key = run_key(variant, eps, rep)
    meta: dict[str, Any] = {"variant": variant, "epsilon_target": eps, "rep": rep, "seed": rep}
    if variant == "public":
        from dpldm.models.ldm import load_public_model

        ldm = load_public_model()
        ldm.cfg.diffusion = cfg.diffusion
        row = {"epsilon": 0.0, "trainable_parameters": 0, **evaluate_generative(ldm, cfg, args, out / "cache", rep)}
    elif variant == "nonprivate-attention":
        meta["finetune"] = cfg.train.finetune
        ldm, info = run_nonprivate_finetune(cfg, out / key)
        row = {**info, **evaluate_generative(ldm, cfg, args, out / "cache", rep)}
    elif variant == "nonprivate-classifier":
        row = run_real_classifier(cfg, args, rep)
    elif variant == DIRECT:
        row = run_dp_classifier(cfg, eps, rep, direct_config(args))
    else:
        meta["finetune"] = specs[variant]
        meta["run_dir"] = str(out / key)
        ldm, info = run_dp_finetune(cfg, out / key, specs[variant], verbose=not args.quick)
        row = {**info, **evaluate_generative(ldm, cfg, args, out / "cache", rep)}
    return {**{k: v for k, v in row.items() if isinstance(v, (int, float, str, type(None)))}, **meta}


def plan(args) -> list[tuple[str, float | None, int]]:
    """(variant, epsilon, repetition): the once-only variants, then repetition 0 of every private
    (variant, epsilon), then repetition 1, ... (an interrupted invocation leaves whole repetitions)."""
    once_reps = range(args.repeats) if getattr(args, "repeat_once", False) else range(1)
    jobs: list[tuple[str, float | None, int]] = [(v, None, r) for r in once_reps for v in ONCE if v in args.variants]
    for rep in range(args.repeats):
        for eps in args.epsilons:
            jobs += [(v, eps, rep) for v in PRIVATE if v in args.variants]
    return jobs


# -- the table ---------------------------------------------------------------------------------------

# -- main ------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace, experiment: str = "utility") -> tuple[dict, dict]:
    """The protocol for args.variants x args.epsilons x args.repeats into args.out (resumable);
    returns (the results store's data, the ablation specs)."""
    from dpldm.models.unet import UNet

    check_args(args)
    out = Path(args.out)
    sets = (QUICK_SETS if args.quick else []) + list(args.set) + [f"train.threads={args.threads}"]
    base = load_config(args.config, sets)  # ConfigError on a bad recipe or --set, before anything is written
    unet = UNet(base.unet)
    specs = ablation_specs(unet)
    source = base.data.private
    if args.quick:  # the smoke run's private set: a subset of the recipe's (written below)
        sets.append(f"data.private={json.dumps(str(out / QUICK_NPZ))}")
        base = load_config(args.config, sets)
    settings, sha = settings_of(base, args, quick_source=source if args.quick else None)
    # refuses a foreign, unreadable or other-settings results.json before anything is computed
    store = ResultStore(out, experiment, settings, check_run=check_run, migrate=migrate_legacy,
                        extra={"ablation_specs": specs}).check()
    torch.set_num_threads(args.threads)
    if args.quick:  # refuses a subset cut from another source before anything is written
        out.mkdir(parents=True, exist_ok=True)
        quick_private_source(source, out / QUICK_NPZ)
    store.open(getattr(args, "command_line", None))
    n_modules = len(unet.attention_modules())
    print(f"[{experiment}] settings {sha}; {args.repeats} repetition(s) at epsilon "
          f"{', '.join(f'{e:g}' for e in args.epsilons)}; trained modules (of {n_modules} attention modules, "
          "1-based forward order; + class embedder):", flush=True)
    for v in GENERATIVE_PRIVATE:
        if v in args.variants:
            print(f"[{experiment}]   {v}: {specs[v]}", flush=True)
    legacy = sorted(k for k, r in store.runs.items() if "migrated_from" in r)
    if legacy:
        print(f"[{experiment}] warning: {len(legacy)} run(s) {LEGACY_NOTE} ({', '.join(legacy)}); they are reused "
              "and marked † in the table; use another --out to recompute them", flush=True)
    jobs = plan(args)
    for variant, eps, rep in progress(jobs, experiment):
        key = run_key(variant, eps, rep)
        if key in store.runs:
            print(f"[{experiment}] {key}: cached", flush=True)
            continue
        cfg = load_config(args.config, sets + ([f"privacy.epsilon={eps!r}"] if eps is not None else []))
        print(f"[{experiment}] {key} ...", flush=True)
        t0 = time.time()
        row = run_one(variant, eps, rep, cfg, specs, args, out)
        row["seconds"] = round(time.time() - t0, 1)  # the whole run (benchmark file; docs/results.md, Protocol)
        store.record(key, row)
        fid = row.get("fid")
        print(f"[{experiment}] {key}: accuracy {row.get('accuracy'):.4f}, FID {'—' if fid is None else f'{fid:.2f}'}, "
              f"{row['seconds']} s", flush=True)
    return store.data, specs


def run_table(args: argparse.Namespace) -> int:
    """`python -m dpldm.experiments.utility`: the protocol, then its table (results.md)."""
    data, _ = run(args)
    table = markdown_table(aggregate(data["runs"]))
    atomic_write_text(Path(args.out) / "results.md", table + "\n")
    print(table)
    print(f"[utility] wrote {Path(args.out) / 'results.md'} (table) and {Path(args.out) / 'results.json'} (every run)",
          flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.command_line = ["python", "-m", "dpldm.experiments.utility", *(sys.argv[1:] if argv is None else argv)]
    if args.epsilons is None:
        args.epsilons = list(QUICK_EPSILONS if args.quick else EPSILONS)
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else REPEATS
    try:
        return run_table(args)
    except (InputError, ConfigError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
