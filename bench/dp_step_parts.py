"""What both paths of bench/dp_step.py share (the CPU path there, the CUDA path in
bench/dp_step_cuda.py): the models, the per-example loss, the step of every variant, FLOP
counting, memory probes and the docs/benchmarks.md section writer. No command line."""
from __future__ import annotations

import inspect
import os
import resource
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"demo": "configs/demo.toml", "celeba64": "configs/paper/celeba64_from_imagenet64.toml"}
DOC = ROOT / "docs" / "benchmarks.md"
GPU_SECTION = "## DP step on GPU"  # written by bench/dp_step_cuda.py


# ----------------------------------------------------------------------------------------------
# model, data, FLOPs
# ----------------------------------------------------------------------------------------------
def _build(batch: int, config: str, device="cpu"):
    import torch

    from dpldm.config import load_config
    from dpldm.diffusion.schedule import DiffusionSchedule
    from dpldm.models.selection import apply_finetune
    from dpldm.models.unet import UNet

    cfg = load_config(ROOT / config)
    torch.manual_seed(0)
    unet = UNet(cfg.unet)
    with torch.no_grad():  # a pretrained-like model: no zero-initialised outputs, so gradients flow
        for p in unet.parameters():
            if p.dim() > 1 and float(p.abs().max()) == 0:
                p.normal_(0, 0.02)
    trainable = apply_finetune(unet, cfg.train.finetune)
    unet.to(device)
    schedule = DiffusionSchedule.from_config(cfg.diffusion)  # its tables follow t's device
    f = cfg.autoencoder.downsample_factor
    h = cfg.data.image_size // f
    g = torch.Generator().manual_seed(1)
    data = {
        "z0": torch.randn(batch, cfg.unet.in_channels, h, h, generator=g),
        "y": torch.randint(0, cfg.data.num_classes, (batch,), generator=g),
        "t": torch.randint(0, cfg.diffusion.timesteps, (batch,), generator=g),
        "noise": torch.randn(batch, cfg.unet.in_channels, h, h, generator=g),
    }
    data = {k: v.to(device) for k, v in data.items()}
    return cfg, unet, schedule, data, trainable


def _loss_fn(schedule, data, precision: str = "fp32"):
    import torch

    from dpldm.diffusion.loss import per_example_loss

    dev = data["z0"].device.type

    def loss_fn(model, idx):  # idx: indices into the fixed batch -> (B,) fp32
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = per_example_loss(model, data["z0"][idx], data["y"][idx], schedule, K=1, t=data["t"][idx],
                                   noise=data["noise"][idx])
        return out.float()
    return loss_fn


def flops_per_example(config: str) -> float:
    """FLOPs of one example's forward + backward (frozen weights get no weight gradient), counted
    by FlopCounterMode on a meta-device model."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dpldm.config import load_config
    from dpldm.models.selection import apply_finetune
    from dpldm.models.unet import UNet

    cfg = load_config(ROOT / config)
    with torch.device("meta"):
        unet = UNet(cfg.unet)
    apply_finetune(unet, cfg.train.finetune)
    h = cfg.data.image_size // cfg.autoencoder.downsample_factor
    B = 2
    with torch.device("meta"):
        z = torch.randn(B, cfg.unet.in_channels, h, h)
        t = torch.zeros(B, dtype=torch.long)
        y = torch.zeros(B, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        unet(z, t, y).pow(2).mean().backward()
    return counter.get_total_flops() / B


# ----------------------------------------------------------------------------------------------
# variants: each returns step() on its own copy of the model
# ----------------------------------------------------------------------------------------------
def make_step(variant: str, unet, loss_fn, batch: int, device, extra: dict):
    import torch

    params = [p for p in unet.parameters() if p.requires_grad]
    C, sigma = 1.0, 1.0
    idx_all = torch.arange(batch, device=device)
    if variant == "nonprivate":
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            loss_fn(unet, idx_all).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    if variant.startswith("dpldm"):
        from dpldm.privacy import DPStep, GaussianNoise, PoissonPlan, PrivacyLedger

        backend = variant.split("_", 1)[1] if variant.count("_") and variant not in (
            "dpldm_measured", "dpldm_nogroup") else "auto"
        # q = 1 over N = batch: the Poisson sample is the whole fixed batch (a fixed-size timing)
        ledger = PrivacyLedger(noise_multiplier=sigma, max_grad_norm=C, plan=PoissonPlan(batch, 1.0, 0), delta=1e-5)
        opt = torch.optim.AdamW(params, lr=1e-4)
        kw = dict(noise=GaussianNoise(seed=0), optimizer=opt, norm_method="auto", backend=backend)
        selector = None
        if variant == "dpldm_measured":
            from dpldm.kernels.selection import KernelSelector

            selector = KernelSelector(batch, repeats=3)
            if "selector" in inspect.signature(DPStep).parameters:
                kw["selector"] = selector
        dp = DPStep(unet, loss_fn, ledger, **kw)
        if selector is not None and dp.engine.selector is None:
            dp.engine.selector = selector  # DPStep without the selector= keyword: set it on its engine
        if variant == "dpldm_nogroup":  # q/k/v each with their own kernels (engine.group_shared_inputs off)
            dp.engine.group_shared_inputs = False
        extra["engine"], extra["selector"] = dp.engine, selector
        eng = dp.engine
        orig = eng._clip_and_sum
        extra["clip_time"] = [0.0]

        def timed(*a, **k):  # norms + clipped sums (after the backward)
            _sync(device)
            t0 = time.perf_counter() if device.type == "cuda" else time.process_time()
            out = orig(*a, **k)
            _sync(device)
            extra["clip_time"][0] += (time.perf_counter() if device.type == "cuda" else time.process_time()) - t0
            return out
        eng._clip_and_sum = timed

        def step():
            idx = dp.begin_step()
            dp.accumulate(idx.to(device))
            dp.step()
        return step
    if variant == "opacus_hooks":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        gsm = GradSampleModule(unet, loss_reduction="sum")  # hooks mode: per-example grads materialised
        opt = DPOptimizer(torch.optim.AdamW(params, lr=1e-4), noise_multiplier=sigma, max_grad_norm=C,
                          expected_batch_size=batch, loss_reduction="sum")
        gsm.null_class = unet.null_class

        def step():
            loss_fn(gsm, idx_all).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    if variant == "opacus_ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        gsm = GradSampleModuleFastGradientClipping(unet, max_grad_norm=C, use_ghost_clipping=True,
                                                   loss_reduction="sum")
        opt = DPOptimizerFastGradientClipping(torch.optim.AdamW(params, lr=1e-4), noise_multiplier=sigma,
                                              max_grad_norm=C, expected_batch_size=batch, loss_reduction="sum")
        gsm.null_class = unet.null_class

        def step():
            DPTensorFastGradientClipping(gsm, opt, loss_fn(gsm, idx_all), "sum").backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    raise SystemExit(f"unknown variant {variant!r}")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _engine_report(extra: dict, out: dict) -> None:
    if "engine" in extra:
        eng = extra["engine"]
        counts: dict[str, int] = {}
        groups = set()
        for ops in eng.kernels_used.values():
            for op, name in ops.items():
                if op == "group":
                    groups.add(name)
                else:
                    counts[f"{op}:{name}"] = counts.get(f"{op}:{name}", 0) + 1
        out["kernels_used"] = counts  # per layer and op ("linear_sqnorm:cpp/fused": layers)
        out["shared_input_groups"] = sorted(len(g.split("+")) for g in groups)  # sizes of the q/k/v-like groups
        out["norm_methods"] = dict(eng.methods)
    if extra.get("selector") is not None:
        out["selection"] = extra["selector"].summary()


# ----------------------------------------------------------------------------------------------
# CPU: one variant per subprocess (peak RSS is that process's own)
# ----------------------------------------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _replace_section(title: str, lines: list[str]) -> None:
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\n"
    start = text.find("\n" + title + "\n")
    if start >= 0:  # replace only our section, up to the next "## " heading
        nxt = text.find("\n## ", start + len(title) + 1)
        text = text[:start + 1] + "\n".join(lines) + ("" if nxt < 0 else "\n" + text[nxt + 1:])
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    from dpldm.utils.io import atomic_write_text

    atomic_write_text(DOC, text)
