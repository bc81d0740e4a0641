"""`dpldm export`: an LDM folder in another layout.

    dpldm export --checkpoint RUN/model --out hub/my-dp-ldm                      # diffusers (default)
    dpldm export --checkpoint RUN/model --out hub/my-dp-ldm --verify             # + compare with diffusers
    dpldm export --checkpoint hub/my-dp-ldm --format dpldm --out models/back     # diffusers -> dpldm folder

`--format diffusers` writes UNet2DConditionModel, AutoencoderKL and DDIMScheduler folders, the class
embedding table and a model card with the privacy guarantee (docs/interop.md; what maps exactly:
dpldm.interop.diffusers_layout). `--format dpldm` writes a native model folder (`save_ldm`) from
anything `load_ldm` reads, including a diffusers export -- for the tools that read native folders
only (the multi-rank trainer's --init, `dpldm data encode --autoencoder` read both).
Outputs are built beside --out and renamed into place. `--overwrite` replaces only a folder that
`dpldm export` wrote in the same format (its `.dpldm-output.json` says so) and that holds nothing
else; never the user's own folder, the --checkpoint (or the run folder holding it), the working
directory or a folder above it (dpldm.utils.io.check_output_dir, checked before the model loads).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dpldm.errors import UserError
from dpldm.utils.device import add_device_argument

KINDS = {"diffusers": "diffusers-export", "dpldm": "dpldm-model"}  # the marker kind of each --out folder
VERIFY_TOLERANCE = 1e-4  # relative max error of the diffusers forward vs dpldm's, fp32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="LDM model folder (dpldm or a diffusers export), "
                        "or a run folder with model/")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--format", choices=("diffusers", "dpldm"), default="diffusers", help="default diffusers")
    parser.add_argument("--no-ema", action="store_true", help="export the raw UNet weights instead of the EMA "
                        "(diffusers format)")
    parser.add_argument("--overwrite", action="store_true", help="replace an --out folder that dpldm export wrote "
                        "before in the same format (never any other folder)")
    parser.add_argument("--verify", action="store_true", help="after a diffusers export, load it with diffusers "
                        "and compare one UNet forward and one decode with dpldm's (needs the diffusers package)")
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    from dpldm.utils.io import atomic_dir, check_output_dir, model_inputs, resolve_path
    from dpldm.interop.diffusers_folder import export_diffusers, is_private, verify_export
    from dpldm.models.ldm import load_ldm, save_ldm
    from dpldm.utils.device import resolve_device

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; export writes a folder")
    if resolve_path(args.checkpoint, "--checkpoint") == resolve_path(out, "--out"):
        raise UserError(f"--out {out}: is the --checkpoint folder itself; write elsewhere")
    if args.format == "dpldm" and (args.no_ema or args.verify):
        raise UserError("--no-ema and --verify apply to --format diffusers only")
    inputs = model_inputs(args.checkpoint)  # the folder given and, for a run folder, its model/
    kind = KINDS[args.format]
    check_output_dir(out, kind, overwrite=args.overwrite, inputs=inputs)  # before any work
    device = resolve_device(args.device)
    if args.verify:
        import importlib.util

        if importlib.util.find_spec("diffusers") is None:
            raise UserError("--verify needs the diffusers package (pip install diffusers)")
    ldm = load_ldm(args.checkpoint)
    privacy = (getattr(ldm, "meta", None) or {}).get("privacy")
    if args.format == "dpldm":
        extra = {k: v for k, v in ldm.meta.items() if k not in ("kind", "config", "scale_factor", "tensors_sha256")}
        with atomic_dir(out, overwrite=args.overwrite, kind=kind, inputs=inputs) as tmp:
            save_ldm(tmp, ldm, extra)
        print(f"dpldm export: dpldm model folder -> {out}")
    else:
        export_diffusers(ldm, out, use_ema=not args.no_ema, overwrite=args.overwrite, source=str(args.checkpoint),
                         inputs=inputs)
        print(f"dpldm export: diffusers folder -> {out} (unet/, vae/, scheduler/, class_embedder/, README.md, "
              f"dpldm.json; {'raw' if args.no_ema else 'EMA'} weights)")
        print("  exact: UNet2DConditionModel, AutoencoderKL.decode, DDIM with steps = T; not exact: "
              "AutoencoderKL.encode (padding differs; see README.md)")
    if is_private(privacy):
        print(f"  privacy: epsilon={privacy['epsilon']:.4g}, delta={privacy.get('delta')} "
              f"({privacy.get('accountant')}, {privacy.get('steps')} steps)")
    else:
        print("  privacy: no DP guarantee recorded (the model card says so)")
    if args.verify:
        errs = verify_export(ldm, out, device, use_ema=not args.no_ema)
        print(f"  verify on {device}: UNet forward rel. error {errs['unet_rel_err']:.2e}, decode rel. error "
              f"{errs['decode_rel_err']:.2e} (tolerance {VERIFY_TOLERANCE:g})")
        if max(errs.values()) > VERIFY_TOLERANCE:
            print("dpldm export: error: diffusers does not reproduce this model within tolerance (a bug: please "
                  "report it)", file=sys.stderr)
            return 1
    return 0
