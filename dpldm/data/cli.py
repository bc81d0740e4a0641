"""`dpldm data import|encode|inspect` (see docs/data.md)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dpldm.data.errors import DataError
from dpldm.data.images import MODES
from dpldm.errors import UserError
from dpldm.utils.device import add_device_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("import", help="write a source as webdataset shards + wids index + manifest")
    p.add_argument("--source", required=True,
                   help="glyphs | mnist5k | digits | cryptopunks | an image folder | a .npz file")
    p.add_argument("--out", required=True, help="output shard folder")
    p.add_argument("--split", default="train", choices=("train", "test"))
    p.add_argument("--shard-size", type=int, default=1000, help="examples per shard (default 1000)")
    p.add_argument("--format", default="npy", choices=("npy", "png"), help="image payload format")
    p.add_argument("--num", type=int, default=None, help=f"glyphs only: how many to render (1..{MAX_NUM:,})")
    p.add_argument("--seed", type=int, default=None, help="glyphs only: render seed >= 0 (default 0; test split uses seed+1)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a shard folder dpldm wrote for a different dataset (never anything else)")
    p.add_argument("--mode", default=None, choices=MODES,
                   help="image folders: convert every image to L, RGB or RGBA (needed when modes differ, and for "
                        "palette / grey+alpha images)")
    p.add_argument("--resize", type=int, default=None, metavar="S",
                   help="image folders: scale the shorter side to S (Lanczos); non-square images need --center-crop")
    p.add_argument("--center-crop", action="store_true",
                   help="image folders: cut the centred square (S x S after --resize)")

    p = sub.add_parser("encode", help="private images once through the frozen encoder into latent shards")
    p.add_argument("--shards", required=True, help="image shard folder (from `dpldm data import`)")
    p.add_argument("--autoencoder", required=True, help="checkpoint folder: kind 'autoencoder' or 'ldm', or a run folder")
    p.add_argument("--out", required=True, help="output latent shard folder")
    p.add_argument("--format", default="npy", choices=("npy", "pth"), help="latent payload format")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--overwrite", action="store_true",
                   help="replace a latent folder dpldm wrote with another autoencoder (never anything else)")
    add_device_argument(p)

    p = sub.add_parser("inspect", help="counts, class histogram and a PNG grid of a shard folder")
    p.add_argument("dir", help="shard folder")
    p.add_argument("--grid", default=None, help="PNG path (default DIR/inspect_grid.png; 'none' to skip)")
    p.add_argument("--per-class", type=int, default=8, help="grid: examples per class (one row per class)")
    p.add_argument("--verify", action="store_true", help="read every sample and check every sha256")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


MAX_NUM = 10_000_000  # glyphs rendered per import (about 10 GiB of 32x32 images in memory)
MAX_INSPECT_PER_CLASS = 1000  # grid rows of `data inspect`
PATH_ARGS = ("source", "out", "shards", "autoencoder", "dir", "grid")


def check_args(args: argparse.Namespace) -> None:
    """Argument checks that need no data: empty paths, counts and seeds out of range."""
    for name in PATH_ARGS:
        value = getattr(args, name, None)
        if value is not None and not str(value).strip():
            flag = "DIR" if name == "dir" else f"--{name.replace('_', '-')}"
            raise UserError(f"{flag}: empty path")
    if args.data_command == "import":
        if args.source != "glyphs":
            given = [flag for flag, v in (("--num", args.num), ("--seed", args.seed)) if v is not None]
            if given:
                verb = "apply" if len(given) > 1 else "applies"
                raise UserError(f"{' and '.join(given)} {verb} to --source glyphs only (--source {args.source} "
                                "imports every example it holds)")
        if args.num is not None and not 1 <= args.num <= MAX_NUM:
            raise UserError(f"--num must lie in [1, {MAX_NUM:,}] (glyphs to render), got {args.num}")
        if args.seed is not None and not 0 <= args.seed < 2**63 - 1:
            raise UserError(f"--seed must lie in [0, 2**63 - 1), got {args.seed}")
        if args.seed is None:
            args.seed = 0
    if args.data_command == "inspect" and not 1 <= args.per_class <= MAX_INSPECT_PER_CLASS:
        raise UserError(f"--per-class must lie in [1, {MAX_INSPECT_PER_CLASS}] (grid examples per class), "
                        f"got {args.per_class}")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    progress = _Progress()
    try:
        return {"import": _import, "encode": _encode, "inspect": _inspect}[args.data_command](args, progress)
    except DataError as e:
        raise UserError(str(e)) from None
    finally:
        progress.close()  # an error message must start on its own line, not after a \r progress line


class _Progress:
    """A `\r`-rewritten progress line on stderr, ended with a newline before anything else is printed."""

    def __init__(self) -> None:
        self.open = False

    def start(self, label: str):
        t0 = time.time()

        def on_shard(k: int) -> None:
            print(f"\r{label}: shard {k + 1} done ({time.time() - t0:.1f}s)", end="", file=sys.stderr, flush=True)
            self.open = True
        return on_shard

    def close(self) -> None:
        if self.open:
            print(file=sys.stderr, flush=True)
            self.open = False


def _report(verb: str, report, out: str, progress: _Progress) -> None:
    m = report.manifest
    progress.close()
    print(f"{verb} {m['num_examples']} examples into {len(m['shards'])} shard(s) in {out} "
          f"(written {len(report.written)}, kept {len(report.skipped)} intact from an earlier run)")
    print(f"class histogram: {m['class_histogram']}")


def _import(args: argparse.Namespace, progress: _Progress) -> int:
    from dpldm.data.images import ImageOptions
    from dpldm.data.outdir import check_output_folder
    from dpldm.data.shards import import_arrays
    from dpldm.data.sources import load_source, source_path

    if args.shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {args.shard_size}")
    options = ImageOptions(mode=args.mode, resize=args.resize, center_crop=args.center_crop)
    check_output_folder(args.out, [("--source", source_path(args.source))])  # before loading anything
    images, labels, meta = load_source(args.source, args.split, num=args.num, seed=args.seed, image_options=options)
    print(f"source {args.source} [{args.split}]: {images.shape} {images.dtype}, {meta['num_classes']} classes",
          file=sys.stderr)
    if "label_rule" in meta:
        print(f"labels: {meta['label_rule_text']} ({_short_map(meta['class_to_label'])}); "
              f"images: {meta['images']['conversion']}", file=sys.stderr)
    for w in meta.get("warnings", ()):
        print(f"warning: {args.source}: {w}", file=sys.stderr)
    report = import_arrays(images, labels, meta, args.out, shard_size=args.shard_size, fmt=args.format,
                           overwrite=args.overwrite, on_shard=progress.start("import"))
    _report("imported", report, args.out, progress)
    return 0


def _short_map(m: dict[str, int], n: int = 6) -> str:
    items = [f"{k}->{v}" for k, v in m.items()]
    return ", ".join(items[:n]) + (f", ... ({len(items)} classes)" if len(items) > n else "")


def _encode(args: argparse.Namespace, progress: _Progress) -> int:
    from dpldm.data.latents import encode_shards, load_encoder
    from dpldm.data.outdir import check_output_folder
    from dpldm.utils.device import describe_device, resolve_device

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)
    inputs = [("--shards", args.shards), ("--autoencoder", args.autoencoder)]
    check_output_folder(args.out, inputs)  # before loading anything
    encode_fn, ae_hash, info = load_encoder(args.autoencoder, device=device)
    print(f"autoencoder {args.autoencoder}: sha256 {ae_hash[:16]}... on {describe_device(device)}", file=sys.stderr)
    report = encode_shards(args.shards, args.out, encode_fn, autoencoder_sha256=ae_hash, batch_size=args.batch_size,
                           fmt=args.format, overwrite=args.overwrite, autoencoder_info=info,
                           on_shard=progress.start("encode"), inputs=inputs[1:])
    _report("encoded", report, args.out, progress)
    print(f"latent shape {report.manifest['latent_shape']} (float32, posterior mean, unscaled)")
    return 0


def _inspect(args: argparse.Namespace, progress: _Progress) -> int:
    from dpldm.data.inspect import inspect_folder

    grid = None if args.grid == "none" else (args.grid or str(Path(args.dir) / "inspect_grid.png"))
    info = inspect_folder(args.dir, grid=grid, per_class=args.per_class, verify=args.verify)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{info['folder']}: {info['kind']} of {info['source']} [{info['split']}]")
    print(f"  examples {info['num_examples']} in {info['num_shards']} shard(s); sample {info['sample']}")
    names = info["class_names"] or [str(i) for i in range(info["num_classes"])]
    print("  classes: " + ", ".join(f"{n}={c}" for n, c in zip(names, info["class_histogram"])))
    if info.get("autoencoder_sha256"):
        print(f"  autoencoder sha256 {info['autoencoder_sha256']}")
    if "verified_class_histogram" in info:
        print("  verified: every sample decodes and every shard's sha256 matches")
    if info.get("grid"):
        print(f"  grid: {info['grid']}")
    return 0
