"""The private training set of DP fine-tuning, as ONE kind of object for every launch: an indexed
dataset of UNSCALED latents (posterior means of the frozen encoder) and labels, read by global
index for Poisson-sampled chunks, plus a fingerprint of its content (resume refuses other data).

    latent shard folder (`dpldm data encode`)   every rank opens it and reads its chunks by index
                                                (wids); the latents must come from the init
                                                model's autoencoder (checked by hash)
    source name / image folder / .npz           rank 0 encodes the train split ONCE with the frozen
                                                encoder (on the run's device) and broadcasts it;
                                                for sets that fit in memory -- encode large sets
                                                beforehand with `dpldm data encode`
    synthetic N (smoke runs)                    random latents: not private data

Encoding per example with a frozen encoder costs no privacy (the encoder is public and fixed).

Checked at open time, before any private step (`check_latent_folder`, `check_labels`): the
latents' shape against the model (unet.in_channels x data.image_size / f), every label against
the private classes [0, data.num_classes) (the manifest's histogram first, then the labels
themselves, read with each shard's sha256 verified), and a source's images against
data.channels / data.image_size. A mismatch is one line naming the folder (and the shard and
sample for a label); the trainer has written nothing yet.
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpldm.config import RunConfig
from dpldm.errors import UserError


@dataclass
class PrivateData:
    dataset: Any  # dpldm.data.loaders.IndexedDataset: get_batch(idx) -> (latents (B, Z, h, w), labels (B,))
    description: str
    fingerprint: str  # sha256 of the content (private: kept in step checkpoints only)

    def __len__(self) -> int:
        return len(self.dataset)


def latent_shape(cfg: RunConfig) -> tuple[int, int, int]:
    f = cfg.autoencoder.downsample_factor
    return (cfg.autoencoder.latent_channels, cfg.data.image_size // f, cfg.data.image_size // f)


def is_shard_folder(spec: str) -> bool:
    p = Path(spec)
    return p.is_dir() and (p / "manifest.json").is_file()


@torch.no_grad()
def encode_images(ae, x: torch.Tensor, device: torch.device, batch: int = 256) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] (CPU) -> unscaled posterior means (N, Z, h, w) on the CPU."""
    ae.eval()
    out = [ae.encode(x[i:i + batch].to(device)).mean.float().cpu() for i in range(0, x.shape[0], batch)]
    return torch.cat(out) if out else x.new_zeros((0,))


def check_latent_folder(cfg: RunConfig, folder) -> None:
    """A latent ShardFolder against the model being fine-tuned: the shape of one example and the
    labels the manifest's class histogram records (cheap; `check_labels` then reads the labels)."""
    want = latent_shape(cfg)
    got = tuple(folder.spec.shape)
    if got != want:
        f = cfg.autoencoder.downsample_factor
        made = (folder.manifest.get("image_folder") or {}).get("image_shape")
        raise UserError(
            f"{folder.path}: latents are {got} (C, h, w) but the model takes {want} (unet.in_channels="
            f"{cfg.unet.in_channels}, data.image_size={cfg.data.image_size} / the autoencoder's f={f})"
            + (f"; they were encoded from {tuple(made)} images" if made else "")
            + ": encode images of the model's size, or fine-tune a model of this size")
    hist = folder.manifest.get("class_histogram")
    try:
        present = [c for c, n in enumerate(hist) if int(n) > 0]
    except (TypeError, ValueError):
        present = []  # no usable histogram: `check_labels` reads the labels themselves
    if present and present[-1] >= cfg.data.num_classes:
        raise UserError(f"{folder.path}: the manifest counts {int(hist[present[-1]])} example(s) of label {present[-1]}, "
                        f"outside the private classes 0..{cfg.data.num_classes - 1} (data.num_classes="
                        f"{cfg.data.num_classes}; unet.num_classes={cfg.unet.num_classes})")


def check_labels(cfg: RunConfig, folder, labels) -> None:
    """Every label (N,) of the folder in [0, data.num_classes); names the shard and sample otherwise."""
    import numpy as np

    from dpldm.data.codec import sample_key

    bad = np.flatnonzero((labels < 0) | (labels >= cfg.data.num_classes))
    if bad.size:
        i = int(bad[0])
        k, _ = folder.locate(i)
        raise UserError(f"{folder.shard_path(k)} [sample {sample_key(i)!r}]: label {int(labels[i])} outside the private "
                        f"classes 0..{cfg.data.num_classes - 1} (data.num_classes={cfg.data.num_classes}; "
                        f"{bad.size} such example(s) in {folder.path})")


def _from_shards(cfg: RunConfig, path: Path, ae_sha256: str, ctx) -> PrivateData:
    from dpldm.data.loaders import open_private_dataset
    from dpldm.data.manifest import open_shard_folder

    folder = open_shard_folder(path)
    if folder.kind != "latents":
        raise UserError(f"{path}: holds {folder.kind}, not latents; run `dpldm data encode --shards {path} "
                        f"--autoencoder <the init model folder> --out DIR` first and pass DIR")
    ds = open_private_dataset(path, expected_ae_hash=ae_sha256)
    check_latent_folder(cfg, ds.folder)
    # rank 0 reads every label with each shard's sha256 (the pass the first step would make anyway)
    ctx.on_main(lambda: check_labels(cfg, ds.folder, ds.read_labels()), share=False)
    h = hashlib.sha256(f"latent-shards|{folder.num_examples}|".encode())
    for s in folder.shards:
        h.update(f"{s.nsamples}:{s.sha256}|".encode())
    return PrivateData(ds, f"latent shards {path} ({len(ds)} examples)", h.hexdigest())


def _encode_source(cfg: RunConfig, spec: str, ae, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, str, str]:
    from dpldm.data.sources import load_source, source_fingerprint

    images, labels, meta = load_source(spec, "train")
    x = torch.from_numpy(images).float().div(127.5).sub(1.0)  # (N, H, W[, C]) in [-1, 1]
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W)
    want = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    if tuple(x.shape[1:]) != want:
        raise UserError(f"private source {spec!r} has images {tuple(x.shape[1:])}, the model expects {want}")
    if len(labels) and int(labels.max()) >= cfg.unet.num_classes:
        raise UserError(f"private source {spec!r} has label {int(labels.max())} >= the model's "
                        f"{cfg.unet.num_classes} classes")
    if len(labels) and int(labels.max()) >= cfg.data.num_classes:
        raise UserError(f"private source {spec!r} has label {int(labels.max())} outside the private classes "
                        f"0..{cfg.data.num_classes - 1} (data.num_classes={cfg.data.num_classes})")
    for w in meta.get("warnings", ()):
        print(f"warning: private source {spec!r}: {w}", file=sys.stderr, flush=True)
    z = encode_images(ae, x, device)  # (N, Z, h, w)
    desc = f"source {spec!r} train split ({len(labels)} examples, encoded once by the frozen autoencoder)"
    return z, torch.from_numpy(labels).long(), source_fingerprint(images, labels), desc


def open_private_data(cfg: RunConfig, ctx, *, ae, ae_sha256: str, synthetic: int = 0) -> PrivateData:
    """The private set for this run (collective on several ranks: rank 0 encodes, all receive).
    `ae`: the init model's autoencoder (rank 0; None elsewhere)."""
    from dpldm.data.loaders import InMemoryDataset

    spec = cfg.data.private
    if synthetic:
        g = torch.Generator().manual_seed(12345)
        x = torch.randn((synthetic, *latent_shape(cfg)), generator=g)
        y = torch.randint(0, cfg.data.num_classes, (synthetic,), generator=g)
        return PrivateData(InMemoryDataset(x, y, kind="latents", num_classes=cfg.data.num_classes),
                           f"{synthetic} synthetic random latents (smoke run: NOT private data)",
                           f"synthetic-{synthetic}-12345")
    if is_shard_folder(spec):
        return _from_shards(cfg, Path(spec), ae_sha256, ctx)
    payload, error = None, None
    if ctx.is_main:
        try:
            payload = _encode_source(cfg, spec, ae, ctx.device)
        except Exception as e:  # noqa: BLE001 - every rank must learn that rank 0 failed, or they would hang
            error = e
    ctx.raise_everywhere(error)
    z, y, fingerprint, desc = ctx.broadcast_object(payload)
    return PrivateData(InMemoryDataset(z, y, kind="latents", num_classes=cfg.unet.num_classes), desc, fingerprint)

