"""Privacy-utility results on the embedded task (glyphs -> MNIST digits), `make results`.

For each epsilon (default 1 and 10), side by side:
  dp-attention          DP fine-tuning of the attention modules + class embedder (DP-LDM, ours)
  dp-full               DP fine-tuning of the whole UNet (the paper's comparison)
  dp-classifier         a CNN trained directly on the private digits with DP-SGD (same epsilon):
                        what a user who only needs a classifier would do
and once, without privacy:
  public                the glyph-pretrained model, no fine-tuning (its '0'-'9' glyph classes)
  nonprivate-attention  attention fine-tuning without clipping or noise (the ceiling)

Generative variants are judged as in the demo: samples per class -> FID/KID against the real
training digits and a CNN trained on the samples (selected on a synthetic split), reported once
on the 1000 real test digits. All DP variants use the same Poisson sampling, engine and
accountant. Writes runs/results/results.json and prints the markdown table of docs/results.md.

    python bench/utility.py                      # full (about 1 h on 2 CPU cores)
    python bench/utility.py --epsilons 10 --variants dp-attention public --fid-samples 200
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpldm.config import RunConfig, load_config  # noqa: E402
from dpldm.demo import sample_per_class  # noqa: E402
from dpldm.utils.io import atomic_write_text  # noqa: E402

GENERATIVE = ("public", "dp-attention", "dp-full", "nonprivate-attention")
VARIANTS = GENERATIVE + ("dp-classifier",)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.toml"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 10.0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--samples-per-class", type=int, default=200)
    p.add_argument("--fid-samples", type=int, default=200)
    p.add_argument("--no-fid", action="store_true")
    p.add_argument("--out", default=str(ROOT / "runs" / "results"))
    p.add_argument("--threads", type=int, default=2, help="torch threads (run two invocations with 1 each on 2 cores)")
    return p.parse_args()


def evaluate_generative(ldm, cfg: RunConfig, args, cache: Path) -> dict:
    from dpldm.data.sources import load_source
    from dpldm.eval.evaluate import evaluate_synthetic

    images, labels = sample_per_class(ldm, cfg.data.num_classes, args.samples_per_class, seed=cfg.train.seed,
                                      progress=False)
    train_x, _, _ = load_source(cfg.data.private, "train")
    test_x, test_y, _ = load_source(cfg.data.private, "test")
    return evaluate_synthetic(images, labels, real_train=train_x, real_test=(test_x, test_y), n_fid=args.fid_samples,
                              cache_dir=cache, compute_fid=not args.no_fid, num_classes=cfg.data.num_classes, log=None)


def run_dp_finetune(cfg: RunConfig, out: Path, finetune_spec: str) -> tuple:
    from dpldm.models.ldm import load_ldm
    from dpldm.train.dp_finetune import FinetuneOptions, train

    cfg.train.finetune = finetune_spec
    cfg.train.out_dir = str(out)
    cfg.train.wandb = False
    res = train(cfg, FinetuneOptions(out=out, init=cfg.train.init_checkpoint or None,
                                     resume="auto"))  # continue an interrupted run, else start one
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
        idx = torch.randint(0, len(data), (B,), generator=g)
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


def run_dp_classifier(cfg: RunConfig, epsilon: float) -> dict:
    """SmallCNN trained directly on the private digits with our DP-SGD (Poisson, clip, noise)."""
    from dpldm.data.loaders import InMemoryDataset
    from dpldm.data.sources import load_source
    from dpldm.eval.classifier import SmallCNN
    from dpldm.privacy import DPStep, GaussianNoise, PrivacyLedger

    x, y, _ = load_source(cfg.data.private, "train")
    xt, yt, _ = load_source(cfg.data.private, "test")
    to_x = lambda a: torch.from_numpy(a).float().div(127.5).sub(1.0).unsqueeze(1)  # (N, 1, H, W)  # noqa: E731
    data = InMemoryDataset(to_x(x), torch.from_numpy(y), kind="images", num_classes=cfg.data.num_classes)
    torch.manual_seed(cfg.train.seed)
    model = SmallCNN(1, (cfg.data.image_size, cfg.data.image_size), cfg.data.num_classes, dropout=0.0)
    steps, batch = 200, 500
    ledger = PrivacyLedger.create(num_examples=len(data), sample_rate=batch / len(data), max_grad_norm=1.0,
                                  delta=cfg.privacy.delta, steps=steps, epsilon=epsilon)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    dp = DPStep(model, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), ledger,
                noise=GaussianNoise(), optimizer=opt)
    for _ in range(steps):
        idx = dp.begin_step()
        for s in range(0, idx.numel(), 250):
            dp.accumulate(data.get_batch(idx[s:s + 250]))
        dp.step()
    model.eval()
    with torch.no_grad():
        acc = (model(to_x(xt)).argmax(1).numpy() == yt).mean()  # reported once, nothing selected on it
    return {"accuracy": float(acc), "epsilon": ledger.epsilon_spent(), "steps": steps,
            "trainable_parameters": sum(p.numel() for p in model.parameters()), "fid": None}


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    jobs = []
    if "public" in args.variants:
        jobs.append(("public", None))
    if "nonprivate-attention" in args.variants:
        jobs.append(("nonprivate-attention", None))
    for eps in args.epsilons:
        for v in ("dp-attention", "dp-full", "dp-classifier"):
            if v in args.variants:
                jobs.append((v, eps))
    for variant, eps in jobs:
        key = variant if eps is None else f"{variant}@eps={eps:g}"
        if key in results:
            print(f"[results] {key}: cached")
            continue
        cfg = load_config(args.config, list(args.set) + ([f"privacy.epsilon={eps}"] if eps is not None else []))
        t0 = time.time()
        print(f"[results] {key} ...", flush=True)
        if variant == "public":
            from dpldm.models.ldm import load_public_model

            ldm = load_public_model()
            ldm.cfg.diffusion = cfg.diffusion
            row = {"epsilon": 0.0, "trainable_parameters": 0, **evaluate_generative(ldm, cfg, args, out / "cache")}
        elif variant == "nonprivate-attention":
            ldm, info = run_nonprivate_finetune(cfg, out / key)
            row = {**info, **evaluate_generative(ldm, cfg, args, out / "cache")}
        elif variant in ("dp-attention", "dp-full"):
            spec = "attention:all" if variant == "dp-attention" else "all"
            ldm, info = run_dp_finetune(cfg, out / key, spec)
            row = {**info, **evaluate_generative(ldm, cfg, args, out / "cache")}
        else:
            row = run_dp_classifier(cfg, eps)
        row["seconds"] = round(time.time() - t0, 1)
        results[key] = {k: v for k, v in row.items() if isinstance(v, (int, float, str, type(None)))}
        atomic_write_text(results_path, json.dumps(results, indent=2) + "\n")
        print(f"[results] {key}: accuracy {row.get('accuracy')}, FID {row.get('fid')}, {row['seconds']} s", flush=True)
    print(markdown_table(results))
    return 0


def markdown_table(results: dict) -> str:
    lines = ["| variant | epsilon (spent) | trainable params | downstream acc. (real test) | FID (n) | KID | time (s) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, r in results.items():
        eps = r.get("epsilon")
        eps_s = "∞ (non-private)" if eps == float("inf") else ("0 (no private data)" if eps == 0 else f"{eps:.2f}")
        fid = "—" if r.get("fid") is None else f"{r['fid']:.1f} ({r.get('fid_n_samples')})"
        kid = "—" if r.get("kid") is None else f"{r['kid']:.4f}"
        acc = "—" if r.get("accuracy") is None else f"{100 * r['accuracy']:.1f}%"
        lines.append(f"| {key} | {eps_s} | {r.get('trainable_parameters', 0):,} | {acc} | {fid} | {kid} | "
                     f"{r.get('seconds')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
