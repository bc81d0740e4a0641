"""The neighbouring-dataset property of THE trainer, on the demo UNet (the shipped public model)
with the trainer's real loss, for several N, physical batch sizes and sample rates:

    D  = N private digits,  D' = D + one more digit (appended: every other example keeps its index)
    S(D) = the step-0 clipped sum + noise that the trainer builds (seeded noise: the same draw for
           D and D', so S(D') - S(D) is the difference of the clipped sums)
    ||S(D') - S(D)|| <= C, and it equals the new example's own clipped gradient when it was sampled,
    0 when it was not.

Used in-process by tests/test_dp_neighbouring.py (W = 1) and under torchrun with 2 ranks:

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_scripts/neighbours.py OUT

which writes OUT/neighbours_w2.json (rank 0)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.toml"
# (N, physical batch P, sample rate q): chunkings that shift when an example is added, q = 1 and q < 1
CASES = [(12, 5, 1.0), (12, 64, 0.5), (61, 7, 1.0), (61, 16, 0.5)]
SEED = 3  # train.seed: sampling, diffusion draws and noise (seeded test run: not private)


def write_private(folder: Path, n: int) -> Path:
    """The first n of a fixed random order of the mnist5k train split (labels of every class)."""
    from dpldm.data.sources import load_source

    images, labels, _ = load_source("mnist5k", "train")
    order = np.random.default_rng(0).permutation(len(labels))[:n]
    path = folder / f"digits_{n}.npz"
    np.savez(path, images=images[order], labels=labels[order])
    return path


def demo_cfg(npz: Path, P: int, q: float, out: Path, extra: list[str] | None = None):
    from dpldm.config import load_config

    return load_config(DEMO, [f"data.private={json.dumps(str(npz))}", f"privacy.physical_batch_size={P}",
                              f"privacy.sample_rate={q}", "privacy.noise_multiplier=1.0", "privacy.epsilon=1e9",
                              "privacy.accountant=\"rdp\"", "privacy.steps=1", "privacy.backend=\"torch\"",
                              "train.deterministic=true", "train.not_private=true", f"train.seed={SEED}",
                              "train.wandb=false", "train.threads=1", f"train.out_dir={json.dumps(str(out))}",
                              *(extra or [])])


def step_sum(cfg, ctx, loss_override=None) -> tuple[dict[str, torch.Tensor], torch.Tensor, object]:
    """The trainer's step-0 noisy clipped SUM (the update times q*N), the global sample, the trainer."""
    from dpldm.train.dp_finetune import FinetuneOptions, Trainer

    trainer = Trainer(cfg, FinetuneOptions(out=Path(cfg.train.out_dir)), ctx)
    trainer.setup()
    if loss_override is not None:
        trainer.dp.loss_fn = loss_override(trainer)
    sample = trainer.ledger.plan.indices(0)
    trainer.step()
    qn = trainer.ledger.expected_batch_size
    sums = {n: (t * qn).detach().cpu().clone() for n, t in trainer.dp.update.items()}  # fp64
    trainer._release_lock()
    return sums, sample, trainer


def own_clipped_gradient(trainer, index: int) -> torch.Tensor:
    """Independent reference: example `index` alone through a plain UNet (public EMA weights) with the
    trainer's loss, one autograd gradient of the trainable parameters, clipped to C (flattened fp64)."""
    from dpldm.models.ldm import load_public_model
    from dpldm.models.selection import apply_finetune
    from dpldm.train.dp_loss import ChunkBatch

    ldm = load_public_model()
    ldm.copy_ema_to_unet()
    unet = ldm.unet.train()
    apply_finetune(unet, trainer.cfg.train.finetune)
    params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    idx = torch.tensor([index])
    z0, y = trainer.data.dataset.get_batch(idx)
    loss = trainer.dp.loss_fn(unet, ChunkBatch(z0, y, idx, 0)).sum()
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    g = flat({n: (torch.zeros_like(p) if gi is None else gi).double() for (n, p), gi in zip(params.items(), grads)})
    C = trainer.cfg.privacy.max_grad_norm
    return g * min(1.0, C / (float(g.norm()) + 1e-6))


def flat(sums: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([sums[n].flatten() for n in sorted(sums)])


def chunk_position_loss(trainer):
    """NEGATIVE CONTROL (the old `dpldm finetune` rule): draws keyed on the row position inside each
    chunk, not on the example. Adding one example shifts the others' randomness."""
    from dpldm.diffusion.loss import per_example_loss

    base = trainer.dp.loss_fn
    state = {"chunk": 0}

    def loss(unet, batch):
        g = torch.Generator().manual_seed(SEED * 1000 + batch.step * 100 + state["chunk"])
        state["chunk"] += 1
        z0 = batch.z0 * base.scale
        return per_example_loss(unet, z0, batch.y, base.schedule, base.K, generator=g, cond_drop_prob=0.0)

    return loss


def run_cases(root: Path, ctx, cases=CASES, control: bool = False) -> list[dict]:
    rows = []
    for N, P, q in cases:
        small = ctx.on_main(lambda: write_private(root, N))  # rank 0 writes, every rank then reads
        big = ctx.on_main(lambda: write_private(root, N + 1))
        override = chunk_position_loss if control else None
        tag = f"{N}_{P}_{q}_{'ctl' if control else 'real'}"
        s0, sample0, _ = step_sum(demo_cfg(small, P, q, root / f"a_{tag}"), ctx, override)
        s1, sample1, trainer = step_sum(demo_cfg(big, P, q, root / f"b_{tag}"), ctx, override)
        diff = flat(s1) - flat(s0)
        sampled = bool((sample1 == N).any())
        row = {"N": N, "P": P, "q": q, "C": trainer.cfg.privacy.max_grad_norm, "diff_norm": float(diff.norm()),
               "new_example_sampled": sampled,
               "samples_agree": sample1[sample1 < N].tolist() == sample0.tolist()}
        if sampled and not control and ctx.is_main:
            ref = own_clipped_gradient(trainer, N)
            row["own_norm"] = float(ref.norm())
            row["diff_minus_own"] = float((diff - ref).norm())
        rows.append(row)
    return rows


def main(out: Path) -> None:
    from dpldm.parallel import init_distributed

    torch.set_num_threads(1)
    ctx = init_distributed("gloo")
    rows = run_cases(out, ctx)
    if ctx.is_main:
        (out / f"neighbours_w{ctx.world_size}.json").write_text(json.dumps(rows, indent=1))
    ctx.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
