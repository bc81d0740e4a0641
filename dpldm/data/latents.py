"""The latent cache: private images through the frozen encoder once, into latent shards.

`encode_shards(shards, out, encode_fn, autoencoder_sha256=...)` reads an image shard folder shard
by shard (validated), maps images (B, C, H, W) in [-1, 1] through `encode_fn` to latents
(B, Z, h, w) and writes a latent shard folder with the same keys, labels and shard boundaries
(float32 `.npy` or `.pth` = the posterior mean, *unscaled*: multiply by the LDM's scale_factor
before the UNet). The manifest records `autoencoder_sha256`; readers given an expected hash
refuse latents from another autoencoder (AutoencoderMismatchError). Restartable like an import.

The autoencoder hash is `ae_state_hash(ae.state_dict())`: a sha256 over the autoencoder's own
weights (names, dtypes, shapes, bytes), so an LDM bundle whose UNet was retrained but whose
autoencoder is unchanged keeps its latents, and any change to the autoencoder invalidates them.
`autoencoder_hash(folder)` computes it from a checkpoint folder without building the model.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dpldm.data.codec import SampleSpec, images_to_tensor, sample_key
from dpldm.data.errors import ShardError
from dpldm.data.manifest import open_shard_folder
from dpldm.data.outdir import check_not_input
from dpldm.data.shards import FolderWriter, WriteReport, read_shard_arrays

EncodeFn = Callable[[torch.Tensor], torch.Tensor]  # (B, C, H, W) float32 in [-1, 1] -> (B, Z, h, w)


def ae_state_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 of an autoencoder state dict (un-prefixed names), independent of the file it came from."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def autoencoder_hash(folder: str | Path) -> str:
    """`ae_state_hash` of the `ae.*` tensors of an "autoencoder" or "ldm" checkpoint folder."""
    from dpldm.checkpoint import CheckpointError, load_checkpoint, unprefixed

    folder = Path(folder)
    if not (folder / "meta.json").is_file() and (folder / "model" / "meta.json").is_file():
        folder = folder / "model"  # a run folder
    tensors, _ = load_checkpoint(folder)
    state = unprefixed("ae", tensors)
    if not state:
        raise CheckpointError(f"{folder}: no autoencoder tensors ('ae.*')")
    return ae_state_hash(state)


def load_encoder(folder: str | Path, device: torch.device | str = "cpu") -> tuple[EncodeFn, str, dict[str, Any]]:
    """(encode_fn = posterior mean of the frozen autoencoder, its hash, info) from a checkpoint
    folder written by dpldm.models.ldm (kind "autoencoder" or "ldm", or a run folder). The
    autoencoder runs on `device`; encode_fn takes and returns tensors on any device."""
    from dpldm.models.ldm import load_autoencoder

    ae, _cfg, meta = load_autoencoder(folder)
    ae_hash = ae_state_hash(ae.state_dict())  # of the loaded (CPU) weights: the same on every device
    device = torch.device(device)
    ae.eval().requires_grad_(False).to(device)

    @torch.no_grad()
    def encode_fn(x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, Z, h, w) on `device`
        return ae.encode(x.to(device)).mean

    info = {"path": str(Path(folder).resolve()), "kind": meta.get("kind"), "device": str(device),
            "checkpoint_tensors_sha256": meta.get("tensors_sha256"), "scale_factor": meta.get("scale_factor"),
            "in_channels": ae.cfg.in_channels, "latent_channels": ae.cfg.latent_channels}
    return encode_fn, ae_hash, info


def encode_array(encode_fn: EncodeFn, images: np.ndarray, batch_size: int, *, shard: str,
                 first_index: int) -> np.ndarray:
    """uint8 images (n, H, W[, C]) -> float32 latents (n, Z, h, w), checked finite and consistent."""
    out: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        stop = min(len(images), start + batch_size)
        x = images_to_tensor(images[start:stop])  # (B, C, H, W) in [-1, 1]
        try:
            with torch.no_grad():
                z = encode_fn(x)
        except Exception as e:  # noqa: BLE001 - e.g. channel mismatch between data and autoencoder
            raise ShardError(f"encoder failed on images of shape {tuple(x.shape)} ({type(e).__name__}: {e})",
                             shard=shard, key=sample_key(first_index + start)) from None
        if not isinstance(z, torch.Tensor) or z.ndim < 2 or z.shape[0] != stop - start:
            raise ShardError(f"encoder returned {getattr(z, 'shape', type(z))} for a batch of {stop - start}",
                             shard=shard, key=sample_key(first_index + start))
        z = z.detach().to("cpu", torch.float32).numpy()
        finite = np.isfinite(z.reshape(len(z), -1)).all(axis=1)
        if not finite.all():
            j = int(np.argmin(finite))
            raise ShardError("encoder produced NaN/inf latents", shard=shard, key=sample_key(first_index + start + j))
        if out and z.shape[1:] != out[0].shape[1:]:
            raise ShardError(f"latent shape changed from {out[0].shape[1:]} to {z.shape[1:]}", shard=shard,
                             key=sample_key(first_index + start))
        out.append(z)
    return np.concatenate(out)


def encode_shards(shards: str | Path, out: str | Path, encode_fn: EncodeFn, *, autoencoder_sha256: str,
                  batch_size: int = 256, fmt: str = "npy", overwrite: bool = False,
                  autoencoder_info: dict[str, Any] | None = None,
                  on_shard: Callable[[int], None] | None = None,
                  inputs: Sequence[tuple[str, Any]] = ()) -> WriteReport:
    """Encode an image shard folder into a latent shard folder (see module doc). `out` may not be,
    lie inside or contain `shards` (or any of the extra (flag, path) `inputs`)."""
    if fmt not in ("npy", "pth"):
        raise ValueError(f"latent format must be npy or pth, got {fmt!r}")
    check_not_input(out, [("--shards", shards), *inputs])  # before reading anything
    src = open_shard_folder(shards)
    if src.kind != "images":
        raise ShardError(f"expected image shards, found {src.kind}", shard=str(src.path))
    fingerprint = {"kind": "latents", "format": fmt, "autoencoder_sha256": autoencoder_sha256,
                   "num_examples": src.num_examples, "source_shards_sha256": [s.sha256 for s in src.shards]}
    w = FolderWriter(Path(out), fingerprint, overwrite, inputs=[("--shards", shards), *inputs])
    for k, info in enumerate(src.shards):
        if not w.is_done(k, info.nsamples):
            images, labels = read_shard_arrays(src, k, verify="sha256")
            z = encode_array(encode_fn, images, batch_size, shard=str(src.shard_path(k)), first_index=info.first_index)
            w.write(k, info.first_index, z, labels, fmt)
        if on_shard is not None:
            on_shard(k)
    shapes = {tuple(w.record(k)["example_shape"]) for k in range(len(src.shards))}
    if len(shapes) != 1:
        raise ShardError(f"latent shapes differ between shards: {sorted(shapes)}", shard=str(out))
    shape = shapes.pop()
    spec = SampleSpec(fmt, shape, "float32", src.spec.num_classes)
    m = src.manifest
    fields = {"source": m.get("source"), "split": m.get("split"), "num_classes": src.spec.num_classes,
              "class_names": m.get("class_names"), "latent_shape": list(shape), "latent_dtype": "float32",
              "latents": "posterior mean, unscaled", "autoencoder_sha256": autoencoder_sha256,
              "autoencoder": autoencoder_info or {},
              "image_folder": {"path": str(src.path.resolve()), "fingerprint": m.get("fingerprint"),
                               "image_shape": m.get("image_shape")}}
    manifest = w.finish(len(src.shards), spec, "latents", fields)
    return WriteReport(manifest, w.written, w.skipped)
