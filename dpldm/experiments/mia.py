"""`dpldm experiment mia`: membership inference on the released (fine-tuned) model, beside the bound
that (epsilon, delta)-DP puts on every membership test (TPR <= e^eps FPR + delta, Kairouz et al. 2015).

Members are a fixed seeded subset of the private TRAIN split (what every fine-tune trains on),
non-members as many held-out TEST digits of the same distribution. Attacked models (cells):
  eps=E        DP fine-tuning of every attention module with the recipe (utility.run_dp_finetune), E
               from --epsilons; eps=inf: the same fine-tune without clipping or noise
               (utility.run_nonprivate_finetune); --model E=FOLDER attacks an already trained model
  control      the POSITIVE CONTROL: the whole UNet fine-tuned without privacy on a small member set
               (10 per class of the train split) long enough to overfit; non-members: the test digits.
               Its AUC must be clearly above 0.5, otherwise the attacks prove nothing.
  public       the pre-fine-tuning public model, which never saw a private digit (negative control)
Attacks (dpldm/experiments/mia_attacks.py): the loss attack, the reference-calibrated loss (the public
model is the reference) and PIA (Kong et al., ICLR 2024); AUC, TPR at 1% and 0.1% FPR with 95%
bootstrap intervals. The attacks' timesteps are chosen on PUBLIC data only: the control's procedure
is run on glyphs (members: 10 per digit glyph class, non-members: other glyphs) and the timestep of
the grid with the best AUC there is kept (the `calibration` cell records it); nothing is chosen on
private data. Every finished cell (a model's scores, an attack's metrics) is kept in results.json.

    dpldm experiment mia                                     # eps 1 10 inf (about an hour on 2 CPU cores)
    dpldm experiment mia --model 10=runs/experiments/epsilon/dp-attention@eps=10@rep=0
    dpldm experiment mia --quick --out /tmp/mia              # smoke run (the tests)
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from dpldm.errors import UserError
from dpldm.experiments import common, utility
from dpldm.experiments import mia_attacks as A
from dpldm.experiments.mia_report import (ATTACKS, CONTROL, PUBLIC, attack_scores, members_set, model_line,
                                            report_body, roc_figure)

NAME = "mia"
EPSILONS = (1.0, 10.0, math.inf)
FPRS = (0.01, 0.001)


@dataclass(frozen=True)
class Protocol:
    """Everything the scores depend on besides the recipe (recorded in the settings)."""

    members: int = 1000  # members scored = non-members scored
    grid: tuple[int, ...] = (10, 25, 50, 100, 200, 300, 500)  # candidate timesteps (chosen on public data)
    noises: int = 8  # fixed noise draws per timestep
    draw_seed: int = 0
    subset_seed: int = 0  # members, non-members and the control's member set
    control_per_class: int = 10
    # the positive control (and its public rehearsal): whole UNet, no privacy, 50 of the 100 members
    # per step (drawn with replacement) for 100 steps = 50 epochs; lr 1e-3 (AdamW)
    control_sets: tuple[str, ...] = ('train.finetune="all"', "privacy.steps=100", "privacy.expected_batch_size=50",
                                     "privacy.physical_batch_size=50", "train.lr=1e-3")
    public_render: int = 6000  # public glyphs rendered for the rehearsal (test split; digits kept)
    public_nonmembers: int = 500
    bootstrap: int = 1000
    pia_p: float = A.PIA_P


QUICK = Protocol(members=12, grid=(50, 200), noises=2, control_per_class=2, bootstrap=50, public_render=200,
                 public_nonmembers=12, control_sets=('train.finetune="all"', "privacy.steps=2",
                                                     "privacy.expected_batch_size=8", "privacy.physical_batch_size=8"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epsilons", type=float, nargs="+", default=None,
                   help="target epsilons of the attacked fine-tunes, 'inf' = without privacy (default 1 10 inf)")
    p.add_argument("--members", type=int, default=None,
                   help="members scored (train split) = non-members scored (test split) (default 1000; --quick: 12)")
    p.add_argument("--model", action="append", default=[], metavar="EPS=FOLDER",
                   help="attack this trained model as the epsilon-EPS cell instead of training one (repeatable)")


# -- flags ----------------------------------------------------------------------------------------------

def parse_models(specs: list[str], epsilons: list[float]) -> dict[str, str]:
    """--model EPS=FOLDER -> {eps text: absolute folder}; EPS must be one of --epsilons."""
    out: dict[str, str] = {}
    for s in specs:
        eps_s, sep, folder = s.partition("=")
        try:
            eps = float(eps_s)
        except ValueError:
            eps = None
        if not sep or not folder or eps is None:
            raise UserError(f"--model {s!r}: expected EPS=FOLDER, e.g. --model 10=runs/eps10")
        if eps not in epsilons:
            raise UserError(f"--model {s!r}: epsilon {eps_s} is not among --epsilons "
                            f"{' '.join(common.eps_text(e) for e in epsilons)}")
        if not Path(folder).is_dir():
            raise UserError(f"--model {s!r}: {folder} is not a folder")
        if f"{eps:g}" in out:
            raise UserError(f"--model: epsilon {eps_s} given twice")
        out[f"{eps:g}"] = str(Path(folder).resolve())
    return out


def protocol_of(args: argparse.Namespace) -> Protocol:
    prot = QUICK if args.quick else Protocol()
    if args.members is not None:
        if args.members < 1:
            raise UserError(f"--members must be >= 1, got {args.members}")
        prot = replace(prot, members=args.members)
    return prot


def settings_of(base, prot: Protocol, models: dict[str, str], quick_source: str | None) -> dict:
    """The recipe (minus what each cell sets), the protocol and the reused models."""
    d = base.to_dict()
    for section, key in (("privacy", "epsilon"), ("train", "finetune"), ("train", "out_dir"), ("train", "threads"),
                         ("train", "wandb")):
        d.get(section, {}).pop(key, None)
    if quick_source is not None:
        d["data"]["private"] = quick_source  # the subset's path lies in --out
    return {"recipe": d, "quick": quick_source is not None, "protocol": asdict(prot), "models": models}


# -- data --------------------------------------------------------------------------------------------------

@dataclass
class Examples:
    images: np.ndarray  # (N, H, W) uint8
    labels: np.ndarray  # (N,) int64


def stratified(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """`per_class` seeded indices of every class present, sorted."""
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def check_members(source: str, members: int, quick: bool) -> None:
    """--members against the private source's splits (--quick: its stratified subset), before
    anything is written."""
    from dpldm.data.sources import load_source

    sizes = []
    for split in ("train", "test"):
        y = load_source(source, split)[1]
        sizes.append(sum(min(utility.QUICK_PER_CLASS, int((y == c).sum())) for c in np.unique(y)) if quick else len(y))
    if members > min(sizes):
        raise UserError(f"--members {members}: the private source {source!r}{' (--quick subset)' if quick else ''} "
                        f"holds {sizes[0]} train (members) and {sizes[1]} test (non-member) examples; at most "
                        f"{min(sizes)}")


def private_sets(private: str, prot: Protocol) -> dict[str, Examples]:
    """members (train), nonmembers (test) and control_members (train, per class), seeded."""
    from dpldm.data.sources import load_source

    xtr, ytr, _ = load_source(private, "train")
    xte, yte, _ = load_source(private, "test")
    rng = np.random.default_rng(prot.subset_seed)
    mem = np.sort(rng.permutation(len(ytr))[:prot.members])
    non = np.sort(rng.permutation(len(yte))[:prot.members])
    ctl = stratified(ytr, prot.control_per_class, rng)
    return {"members": Examples(xtr[mem], ytr[mem]), "nonmembers": Examples(xte[non], yte[non]),
            "control_members": Examples(xtr[ctl], ytr[ctl])}


def public_sets(cfg, prot: Protocol) -> dict[str, Examples]:
    """The public rehearsal's members (control_per_class per private class) and non-members: glyphs
    of the public source's test split whose labels are private classes (glyph '0'-'9' = 0-9)."""
    from dpldm.data.sources import load_source

    x, y, _ = load_source(cfg.data.public, "test", num=prot.public_render, seed=cfg.data.seed)
    keep = np.flatnonzero(y < cfg.data.num_classes)
    rng = np.random.default_rng(prot.subset_seed)
    mem = keep[stratified(y[keep], prot.control_per_class, rng)]
    rest = rng.permutation(np.setdiff1d(keep, mem))[:prot.public_nonmembers]
    if len(rest) < prot.public_nonmembers:
        raise UserError(f"public source {cfg.data.public!r}: too few examples of the private classes for the "
                        f"rehearsal ({len(keep)} rendered, need {len(mem) + prot.public_nonmembers})")
    return {"members": Examples(x[mem], y[mem]), "nonmembers": Examples(x[np.sort(rest)], y[np.sort(rest)])}


def write_member_npz(path: Path, members: Examples, nonmembers: Examples) -> Path:
    """A training set for run_nonprivate_finetune (data.private = this .npz): train = the members."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, train_images=members.images, train_labels=members.labels, test_images=nonmembers.images,
             test_labels=nonmembers.labels)
    tmp.replace(path)
    return path


# -- models ------------------------------------------------------------------------------------------------

def nonprivate_model(cfg, folder: Path):
    """run_nonprivate_finetune once; the model is saved in folder/model and reloaded next time."""
    from dpldm.models.ldm import load_ldm, save_ldm

    if (folder / "model" / "meta.json").is_file():
        return load_ldm(folder / "model")
    ldm, info = utility.run_nonprivate_finetune(cfg, folder)
    save_ldm(folder / "model", ldm.eval(), {"privacy": {**info, "delta": 0.0, "private": False}})
    return ldm.eval()


def reused_model(folder: str, eps: float, cfg):
    """--model: a trained model; its privacy report must match the cell and the private data."""
    from dpldm.models.ldm import load_ldm

    ldm = load_ldm(folder)
    meta = getattr(ldm, "meta", {}) or {}
    held = (meta.get("config") or {}).get("data", {}).get("private")
    if held is not None and held != cfg.data.private and not same_file(held, cfg.data.private):
        raise UserError(f"--model {folder}: fine-tuned on data.private={held!r}, not {cfg.data.private!r}: its "
                        "members are not this experiment's members")
    rep = meta.get("privacy") or {}
    target = rep.get("epsilon_target") if rep.get("private", True) else math.inf
    if target is not None and float(target) != eps:
        raise UserError(f"--model {folder}: trained at epsilon {common.eps_text(float(target))}, passed as "
                        f"{common.eps_text(eps)}")
    return ldm, rep


def same_file(a: str, b: str) -> bool:
    """Two data.private paths naming files with the same bytes (e.g. --quick subsets in two folders)."""
    pa, pb = Path(a), Path(b)
    return pa.is_file() and pb.is_file() and pa.read_bytes() == pb.read_bytes()


def privacy_of(rep: dict, cfg) -> tuple[float, float]:
    """(epsilon, delta) the model's release claims (the accountant's epsilon, the total delta)."""
    eps = rep.get("epsilon", math.inf)
    return float(math.inf if eps is None else eps), float(rep.get("delta_total", rep.get("delta", cfg.privacy.delta)))


# -- scores -----------------------------------------------------------------------------------------------

def score_sets(ldm, sets: dict[str, Examples], chosen: dict[str, int], draws: A.Draws, prot: Protocol) -> dict:
    """{set: {"loss", "loss_cal", "pia": [N floats]}} of one model: the raw loss at the loss attack's
    and at the calibrated attack's timestep (the reference is subtracted later), PIA at its own."""
    unet, out = ldm.sampling_unet(), {}
    for name, ex in sets.items():
        z0, y = A.encode_examples(ldm, ex.images), torch.from_numpy(ex.labels).long()  # (N, Z, h, w), (N,)
        row = {"loss": A.loss_scores(unet, ldm.schedule, z0, y, draws.at(chosen["loss"]))}
        row["loss_cal"] = (row["loss"] if chosen["calibrated"] == chosen["loss"]
                           else A.loss_scores(unet, ldm.schedule, z0, y, draws.at(chosen["calibrated"])))
        row["pia"] = A.pia_matrix(unet, ldm.schedule, z0, y, [chosen["pia"]], prot.pia_p)[:, 0]
        out[name] = {k: [float(f"{v:.7g}") for v in t.tolist()] for k, t in row.items()}
    return out


def calibrate(cfg, sets_base: list[str], config: str, prot: Protocol, out: Path, draws: A.Draws) -> dict:
    """The public rehearsal: the control's procedure on glyphs; per attack, the AUC at every timestep
    of the grid and the best one (ties: the earlier grid entry)."""
    from dpldm.config import load_config
    from dpldm.models.ldm import load_public_model

    sets = public_sets(cfg, prot)
    npz = write_member_npz(out / "calibration" / "public_members.npz", sets["members"], sets["nonmembers"])
    ccfg = load_config(config, sets_base + list(prot.control_sets) + [f"data.private={json.dumps(str(npz))}"])
    tuned, public = nonprivate_model(ccfg, out / "calibration"), load_public_model()
    L, R, P = {}, {}, {}
    for name, ex in sets.items():
        y = torch.from_numpy(ex.labels).long()
        z = A.encode_examples(tuned, ex.images)  # (N, Z, h, w); the encoder is frozen: same for both models
        G = len(prot.grid)  # draws: row k * noises + j = (grid[k], noise j)
        L[name] = A.loss_matrix(tuned.sampling_unet(), tuned.schedule, z, y, draws).view(len(y), G, -1).mean(2)
        R[name] = A.loss_matrix(public.sampling_unet(), public.schedule, z, y, draws).view(len(y), G, -1).mean(2)
        P[name] = A.pia_matrix(tuned.sampling_unet(), tuned.schedule, z, y, prot.grid, prot.pia_p)  # (N, G)
    score = {"loss": L, "calibrated": {k: L[k] - R[k] for k in L}, "pia": P}
    aucs = {a: {str(t): A.auc(-s["members"][:, k].numpy(), -s["nonmembers"][:, k].numpy())
                for k, t in enumerate(prot.grid)} for a, s in score.items()}
    chosen = {a: int(max(prot.grid, key=lambda t: (aucs[a][str(t)], -prot.grid.index(t)))) for a in aucs}
    return {"chosen": chosen, "auc": aucs, "public_members": len(sets["members"].labels),
            "public_nonmembers": len(sets["nonmembers"].labels)}




# -- the experiment -------------------------------------------------------------------------------------

def target_model(eps: float, models: dict[str, str], config: str, sets: list[str], out: Path, verbose: bool):
    """The eps cell's model and the (epsilon, delta) its release claims: reused (--model), or trained
    with the recipe (DP attention fine-tune; eps = inf: the same without clipping or noise)."""
    from dpldm.config import load_config

    folder = out / f"eps={eps:g}"
    cfg = load_config(config, sets + ([f"privacy.epsilon={eps!r}"] if math.isfinite(eps) else []))
    if f"{eps:g}" in models:
        ldm, rep = reused_model(models[f"{eps:g}"], eps, cfg)
        return ldm, privacy_of(rep, cfg), models[f"{eps:g}"]
    if math.isfinite(eps):
        ldm, rep = utility.run_dp_finetune(cfg, folder, "attention:all", verbose=verbose)
        return ldm.eval(), privacy_of(rep, cfg), str(folder)
    return nonprivate_model(cfg, folder), (math.inf, 0.0), str(folder)


def cell_model(label: str, args: argparse.Namespace, sets: list[str], prot: Protocol, data: dict[str, Examples],
               models: dict[str, str]):
    """(model, (epsilon, delta) of its release, folder, the example sets it is scored on) of a cell."""
    from dpldm.config import load_config
    from dpldm.models.ldm import load_public_model

    out = Path(args.out)
    if label == PUBLIC:  # never saw a private example: 0-DP with respect to them
        return load_public_model(), (0.0, 0.0), "public", data
    if label == CONTROL:
        npz = write_member_npz(out / CONTROL / "members.npz", data["control_members"], data["nonmembers"])
        cfg = load_config(args.config, sets + list(prot.control_sets) + [f"data.private={json.dumps(str(npz))}"])
        sub = {k: data[k] for k in ("control_members", "nonmembers")}
        return nonprivate_model(cfg, out / CONTROL), (math.inf, 0.0), str(out / CONTROL), sub
    eps = float(label.split("=", 1)[1])
    ldm, privacy, folder = target_model(eps, models, args.config, sets, out, verbose=not args.quick)
    return ldm, privacy, folder, {k: data[k] for k in ("members", "nonmembers")}


def run(args: argparse.Namespace) -> int:
    from dpldm.config import load_config
    from dpldm.experiments.store import ResultStore
    from dpldm.train.private_data import latent_shape

    common.check_common(args)
    epsilons = list(args.epsilons or EPSILONS)
    common.check_positive(epsilons, "--epsilons", allow_inf=True)
    prot, models = protocol_of(args), parse_models(args.model, epsilons)
    out = Path(args.out)
    sets = (list(utility.QUICK_SETS) if args.quick else []) + list(args.set) + [f"train.threads={args.threads}"]
    base = load_config(args.config, sets)  # ConfigError on a bad recipe or --set, before anything is written
    source = base.data.private
    check_members(source, prot.members, args.quick)
    if args.quick:  # the smoke run's private set: a stratified subset of the recipe's
        sets.append(f"data.private={json.dumps(str(out / utility.QUICK_NPZ))}")
        base = load_config(args.config, sets)
    store = ResultStore(out, NAME, settings_of(base, prot, models, source if args.quick else None))
    store.open(getattr(args, "command_line", None))
    torch.set_num_threads(args.threads)
    if args.quick:
        utility.quick_private_source(source, out / utility.QUICK_NPZ)
    data = private_sets(base.data.private, prot)
    draws = A.fixed_draws(prot.grid, prot.noises, latent_shape(base), prot.draw_seed)
    labels = [PUBLIC] + [f"eps={e:g}" for e in epsilons] + [CONTROL]
    print(f"[{NAME}] settings {store.sha}; cells: calibration (public), {', '.join(labels)}", flush=True)
    for label in common.progress(["calibration", *labels], f"{NAME} cells"):
        key = label if label == "calibration" else f"scores:{label}"
        if key in store.runs:
            continue
        t0 = time.time()
        print(f"[{NAME}] {label} ...", flush=True)
        if label == "calibration":
            row = calibrate(base, sets, args.config, prot, out, draws)
        else:
            ldm, (eps, delta), folder, sub = cell_model(label, args, sets, prot, data, models)
            scores = score_sets(ldm, sub, store.runs["calibration"]["chosen"], draws, prot)
            row = {"epsilon": eps, "delta": delta, "folder": folder, "scores": scores}
        store.record(key, {**row, "seconds": round(time.time() - t0, 1)})
    runs = store.runs
    for label in labels:
        for a in ATTACKS:
            key = f"metrics:{a}:{label}"
            if key in runs or (a == "calibrated" and label == PUBLIC):
                continue
            r = runs[f"scores:{label}"]
            mem, non = attack_scores(r["scores"], runs[f"scores:{PUBLIC}"]["scores"], a, members_set(label))
            store.record(key, A.evaluate(mem, non, r["epsilon"], r["delta"], FPRS, prot.bootstrap, prot.subset_seed))
    runs = store.runs
    png = roc_figure(out / "mia_roc.png", runs, labels)
    report = common.write_report(out, "Membership inference on the released model vs the DP bound", store.data,
                                 report_body(runs, labels, prot), [png])
    for label in labels:
        print(model_line(runs, label), flush=True)
    print(f"[{NAME}] wrote {report}, {png} and {store.path}", flush=True)
    return 0
