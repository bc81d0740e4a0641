"""Multi-rank checks, run under a launcher (torchrun / deepspeed) with W ranks:

    python -m torch.distributed.run --nproc_per_node W tests/dist_scripts/dp_checks.py OUT

For ZeRO stages 0 and 3 it builds the tiny UNet (attention:all trainable), takes ONE noise-free
DP step with SGD(lr=1) on the global Poisson sample of step 0, and saves the trainable
parameters (rank 0). Under ZeRO-3 it records every parameter's partitioned size, whether the
frozen ones are released after the step, and the whole state dict gathered from the partitions.
Then it measures the aggregated noise of one logical step (noisy minus noise-free update, the
same model state) the correct way (noise on rank 0 only) and the wrong way (noise on every rank),
and finally builds the autoencoder under ZeRO-3 and encodes a fixed batch. The pytest side
compares all of it with single-process references.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny  # noqa: E402

from dpldm.models.autoencoder import Autoencoder  # noqa: E402
from dpldm.models.selection import apply_finetune  # noqa: E402
from dpldm.models.unet import UNet  # noqa: E402
from dpldm.parallel import init_distributed  # noqa: E402
from dpldm.parallel.step import run_logical_step  # noqa: E402
from dpldm.parallel.zero import build_model, is_zero_param, load_ds_config  # noqa: E402
from dpldm.privacy.dp_step import World  # noqa: E402
from dpldm.train.dp_loss import ChunkBatch  # noqa: E402
from tiny import dp_step, shared_ledger  # noqa: E402
from dpldm.privacy.noise import GaussianNoise  # noqa: E402


def main(out: Path) -> None:
    t0 = time.time()
    torch.set_num_threads(1)
    ctx = init_distributed("gloo")
    W, r = ctx.world_size, ctx.rank
    c = tiny.cfg()
    ds = tiny.dataset(c)
    state = tiny.init_state(c) if ctx.is_main else None
    res: dict = {"world_size": W, "stages": {}}

    def load(idx):
        x, y = ds.get_batch(idx)
        return ChunkBatch(x, y, idx, 0)

    dummy = ChunkBatch(torch.zeros((1, *ds.x.shape[1:])), torch.zeros(1, dtype=torch.int64),
                       torch.zeros(1, dtype=torch.int64), 0)

    for stage in (0, 3):
        sm = build_model(lambda: UNet(c.unet), ctx, load_ds_config(stage, tiny.PHYSICAL),
                         select_trainable=lambda m: apply_finetune(m, c.train.finetune), state=state)
        trainable = sm.trainable()
        ledger = shared_ledger(ctx, c.privacy, tiny.N, seed=tiny.SAMPLING_SEED)
        opt = torch.optim.SGD(list(trainable.values()), lr=1.0)
        dp = dp_step(sm.module, c, ledger, tiny.ZeroNoise(), opt, ctx.world(), ctx.device)
        counts = run_logical_step(dp, load, lockstep=sm.lockstep, dummy_batch=dummy, after_pass=sm.after_backward)
        digest = sm.sync_check()
        info = {"counts": ctx.all_gather_object(counts), "digest": digest, "noise_draws": ctx.all_gather_object(dp.noise.draws),
                "ledger_steps": ledger.steps_done, "replicated_modules": len(sm.replicated)}
        if ctx.is_main:
            torch.save({n: p.detach().clone() for n, p in trainable.items()}, out / f"params_zero{stage}_w{W}.pt")
        if stage == 3:
            parts = sm.partition_info()
            info["partitions"] = [vars(p) for p in parts]
            info["trainable_are_zero_params"] = any(is_zero_param(p) for p in trainable.values())
            info["frozen_released_after_step"] = all(
                p.data.numel() == 0 for p in sm.module.parameters() if is_zero_param(p))
            info["frozen_bytes"] = sm.frozen_bytes()
            full = sm.full_state_dict()
            if ctx.is_main:
                torch.save(full, out / f"full_state_zero3_w{W}.pt")
            info["frozen_released_after_gather"] = all(
                p.data.numel() == 0 for p in sm.module.parameters() if is_zero_param(p))

            # -- aggregated noise: the same model state, same logical step, noisy minus noise-free
            def update(noise, world):
                led = shared_ledger(ctx, c.privacy, tiny.N, seed=tiny.SAMPLING_SEED)
                d = dp_step(sm.module, c, led, noise, None, world, ctx.device)
                run_logical_step(d, load, lockstep=sm.lockstep, dummy_batch=dummy, after_pass=sm.after_backward)
                return torch.cat([d.update[n].reshape(-1).double() for n in trainable]), led

            base, _ = update(tiny.ZeroNoise(), ctx.world())
            noisy, led = update(GaussianNoise(), ctx.world())
            every_rank = World(rank=r, world_size=W, all_reduce_sum=ctx.all_reduce_sum, is_noise_rank=lambda: True)
            wrong, _ = update(GaussianNoise(), every_rank)
            agg = noisy - base
            agg_same = ctx.assert_replicas_equal({"agg": agg.float()}, "aggregated noise")
            expected_std = led.noise_multiplier * led.max_grad_norm / led.expected_batch_size
            info["noise"] = {"coords": int(agg.numel()), "std": float(agg.std()), "mean": float(agg.mean()),
                             "expected_std": expected_std, "std_every_rank": float((wrong - base).std()),
                             "digest": agg_same}
        res["stages"][str(stage)] = info

    # -- ZeRO-3 lock-step: a step whose global sample has ONE example (rank 1's share is empty, so
    # it must still run the same forward/backward, as a discarded dummy pass, or rank 0 deadlocks)
    c1 = tiny.cfg(["privacy.expected_batch_size=1"])
    s1 = tiny.first_step_with(1, 1)
    sm = build_model(lambda: UNet(c.unet), ctx, load_ds_config(3, tiny.PHYSICAL),
                     select_trainable=lambda m: apply_finetune(m, c.train.finetune), state=state)
    ledger = shared_ledger(ctx, c1.privacy, tiny.N, seed=tiny.SAMPLING_SEED)
    for _ in range(s1):
        ledger.step()
    trainable = sm.trainable()
    dp = dp_step(sm.module, c, ledger, tiny.ZeroNoise(), torch.optim.SGD(list(trainable.values()), lr=1.0),
                 ctx.world(), ctx.device)

    def load_s1(idx):
        x, y = ds.get_batch(idx)
        return ChunkBatch(x, y, idx, s1)

    counts = run_logical_step(dp, load_s1, lockstep=sm.lockstep, dummy_batch=dummy, after_pass=sm.after_backward)
    res["lockstep"] = {"step": s1, "counts": ctx.all_gather_object(counts), "digest": sm.sync_check()}
    if ctx.is_main:
        torch.save({n: p.detach().clone() for n, p in trainable.items()}, out / f"params_lockstep_w{W}.pt")

    # -- the autoencoder under ZeRO-3: partitioned, gathered per module in its forward
    ae_state = tiny.ae_state(c) if ctx.is_main else None
    ae = build_model(lambda: Autoencoder(c.autoencoder), ctx, load_ds_config(3, tiny.PHYSICAL),
                     select_trainable=lambda m: m.requires_grad_(False), state=ae_state)
    x = torch.randn((3, c.data.channels, c.data.image_size, c.data.image_size), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        z = ae.module.encode(x).mode()
    res["autoencoder"] = {"partitions": [vars(p) for p in ae.partition_info()],
                          "released": all(p.data.numel() == 0 for p in ae.module.parameters())}
    if ctx.is_main:
        torch.save({"x": x, "z": z}, out / f"ae_w{W}.pt")
    res["seconds"] = time.time() - t0
    if ctx.is_main:
        (out / f"results_w{W}.json").write_text(json.dumps(res, indent=1))
    ctx.barrier()
    ctx.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
