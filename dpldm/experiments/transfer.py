"""`dpldm experiment transfer`: cross-domain transfer (the paper's next check 1). The same recipe
(--config, every value chosen on public data) with a private set far from the public glyphs
(CryptoPunks: pixel-art faces, 5 very unbalanced punk types) beside the in-domain MNIST digits, at
one epsilon (default 10): ours (DP fine-tuning of the attention modules), the public model without
fine-tuning, and the direct DP-SGD classifier trained on the private images at the same epsilon.
How much the transfer degrades = the margins ours - direct and ours - public on the far domain
minus the same margins on MNIST.

Only data.private and data.num_classes differ between domains. The data layer refuses a source
whose images do not match the model (cryptopunks: (4, 24, 24) RGBA against data.channels x
data.image_size = (1, 32, 32)); such a source is converted once, as `dpldm data import --mode L
--resize S` converts an image folder (dpldm.data.images: alpha composited over black, ITU-R 601
luma, Lanczos to S x S, rounded half up), into <out>/data/<domain>_L<S>.npz. Every cell is one run
of the utility protocol (dpldm/experiments/utility.py: `run_one`) in <out>/<domain>/.

    dpldm experiment transfer                           # 2 domains x (public + 3 x (ours, direct)); hours
    dpldm experiment transfer --domains cryptopunks --repeats 1
    dpldm experiment transfer --quick --out /tmp/transfer   # smoke run (the tests)
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpldm.errors import UserError
from dpldm.experiments import common, figures, utility
from dpldm.experiments.common import Stat, stat
from dpldm.experiments.results_data import check_run, run_key
from dpldm.experiments.store import ResultStore

NAME = "transfer"
HELP = "cross-domain transfer: a private set far from the public one"
OURS, DIRECT, PUBLIC = "dp-attention", "dp-classifier", "public"
VARIANTS = (PUBLIC, OURS, DIRECT, "nonprivate-attention", "nonprivate-classifier")
DEFAULT_VARIANTS = (PUBLIC, OURS, DIRECT)
ONCE = (PUBLIC, "nonprivate-attention", "nonprivate-classifier")  # no privacy: run once per domain
IN_DOMAIN = "mnist5k"
QUICK_REPEATS = 2
CONVERSION = ("colour/alpha -> L: alpha composited over black, luma 0.299R+0.587G+0.114B; Lanczos to the model's "
              "size; rounded half up (dpldm.data.images, as `dpldm data import --mode L --resize S`)")
Cell = tuple[str, str, float | None, int]  # (domain, variant, target epsilon or None, repetition)


@dataclass(frozen=True)
class Domain:
    source: str       # dpldm.data.sources name
    num_classes: int  # data.num_classes (the private labels index the public embedder's first rows)
    what: str


DOMAINS = {
    "mnist5k": Domain("mnist5k", 10, "MNIST digits, in-domain (the recipe's own private set)"),
    "cryptopunks": Domain("cryptopunks", 5, "CryptoPunks punk types (alien, ape, zombie, female, male), far domain"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epsilon", type=float, default=10.0, help="target epsilon of every private cell (default 10)")
    p.add_argument("--repeats", type=int, default=None, help=f"fresh runs per private cell (default 3; --quick: "
                                                             f"{QUICK_REPEATS})")
    p.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS),
                   help="private sets (default: %(default)s); mnist5k is the in-domain reference")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS,
                   help="default: public dp-attention dp-classifier")
    p.add_argument("--samples-per-class", type=int, default=None, help="samples judged per class (default 200)")
    p.add_argument("--fid-samples", type=int, default=200, help="FID/KID on this many samples vs real (default 200)")
    p.add_argument("--no-fid", action="store_true", help="skip FID/KID (accuracy only)")


def check_args(args: argparse.Namespace) -> int:
    """Bad flags as one line, before anything is read or written; returns the repeats."""
    common.check_common(args)
    common.check_positive([args.epsilon], "--epsilon")
    repeats = args.repeats if args.repeats is not None else (QUICK_REPEATS if args.quick else 3)
    if repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {repeats}")
    for flag, values in (("--domains", args.domains), ("--variants", args.variants)):
        dup = sorted({v for v in values if values.count(v) > 1})
        if dup:
            raise UserError(f"{flag}: {', '.join(dup)} given twice")
    if args.samples_per_class is not None and args.samples_per_class < 2:
        raise UserError(f"--samples-per-class must be >= 2 (the downstream CNN holds some out), got "
                        f"{args.samples_per_class}")
    if not (args.no_fid or args.quick) and args.fid_samples < 2:
        raise UserError(f"--fid-samples must be >= 2, got {args.fid_samples} (or pass --no-fid)")
    for s in args.set:
        if s.split("=", 1)[0].strip() in ("data.private", "data.num_classes"):
            raise UserError(f"--set {s}: the transfer experiment sets data.private and data.num_classes per domain "
                            "(--domains)")
    return repeats


# -- the private sets ------------------------------------------------------------------------------

def convert_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W[, C]) square images -> uint8 (N, size, size) grey, as the data layer converts an
    image folder with --mode L --resize size (dpldm.data.images)."""
    from dpldm.data.images import _resize, to_mode  # the import path's own conversion, not a copy

    if images.shape[1] != images.shape[2]:
        raise UserError(f"images of {images.shape[1]}x{images.shape[2]} are not square")
    out = np.empty((len(images), size, size), dtype=np.uint8)
    for i, im in enumerate(images):
        x = im.astype(np.float64)
        x = x[..., None] if x.ndim == 2 else x
        colour, alpha = (x[..., :3], x[..., 3]) if x.shape[2] == 4 else (x, None)
        g = _resize(to_mode(colour, alpha, "L"), (size, size), premultiplied_alpha=False)  # (size, size, 1)
        out[i] = np.clip(np.floor(g[..., 0] + 0.5), 0, 255).astype(np.uint8)
    return out


def converted_source(domain: str, size: int, path: Path) -> Path:
    """<path>: the domain's train and test splits converted for a 1-channel size x size model (.npz,
    written once; an .npz made from another source or conversion is refused, never reused)."""
    from dpldm.data.sources import load_source

    tag = f"{DOMAINS[domain].source}|{size}|{CONVERSION}"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                held = str(z["conversion"]) if "conversion" in z.files else None
        except Exception as e:  # noqa: BLE001 - not an .npz: not this tool's file
            raise UserError(f"{path}: not a converted source this tool wrote ({type(e).__name__}); use another "
                            "--out (nothing was changed)") from None
        if held != tag:
            raise UserError(f"{path}: converted from {held!r}, not {tag!r}; use another --out (nothing was changed)")
        return path
    arrays: dict[str, np.ndarray] = {"conversion": np.array(tag)}
    for split in ("train", "test"):
        x, y, meta = load_source(DOMAINS[domain].source, split)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = convert_images(x, size), y
        arrays["class_names"], arrays["num_classes"] = np.array(meta["class_names"]), np.array(meta["num_classes"])
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def prepare_domain(domain: str, size: int, data_dir: Path, quick: bool) -> str:
    """The data.private of the domain's cells: the source itself when its images fit the model, else
    its converted .npz; with --quick the stratified subset of that (utility.quick_private_source)."""
    from dpldm.data.sources import load_source

    data_dir.mkdir(parents=True, exist_ok=True)
    spec, converted = DOMAINS[domain].source, data_dir / f"{domain}_L{size}.npz"
    if converted.exists() or load_source(spec, "test")[0].shape[1:] != (size, size):
        spec = str(converted_source(domain, size, converted))
    if quick:
        spec = str(utility.quick_private_source(spec, data_dir / f"{domain}_quick_{utility.QUICK_PER_CLASS}.npz"))
    return spec


def domain_sets(domain: str, spec: str) -> list[str]:
    """The --set values that make the recipe's run on this domain."""
    return [f"data.private={json.dumps(spec)}", f"data.num_classes={DOMAINS[domain].num_classes}"]


def class_counts(spec: str) -> dict[str, list[int]]:
    """Examples per class of each split of a private set."""
    from dpldm.data.sources import load_source

    out = {}
    for split in ("train", "test"):
        _, y, meta = load_source(spec, split)
        out[split] = np.bincount(y, minlength=meta["num_classes"]).tolist()
    return out


# -- settings and cells --------------------------------------------------------------------------------

def settings_of(base, args: argparse.Namespace) -> dict:
    """The utility protocol's settings (recipe, evaluation, direct classifier) without the per-domain
    data.private / data.num_classes, plus the domain table; not the epsilon, repeats or domains run
    (cells are keyed by them, so one folder can grow)."""
    s, _ = utility.settings_of(base, args)
    s["recipe"].get("data", {}).pop("private", None)
    s["recipe"].get("data", {}).pop("num_classes", None)
    s.pop("quick_source", None)
    s["domains"] = {d: {"source": v.source, "num_classes": v.num_classes,
                        "conversion": CONVERSION} for d, v in DOMAINS.items()}
    if args.quick:
        s["quick_per_class"] = utility.QUICK_PER_CLASS
    return s


def cell_key(domain: str, variant: str, eps: float | None, rep: int) -> str:
    """'<domain>/<the utility protocol's run key>' (its run folder: <out>/<domain>/<run key>)."""
    return f"{domain}/{run_key(variant, eps, rep)}"


def plan(domains: list[str], variants: list[str], eps: float, repeats: int) -> list[Cell]:
    """The once-only variants of every domain, then repetition 0 of every (domain, private variant),
    then repetition 1, ... (an interrupted invocation leaves whole repetitions)."""
    cells: list[Cell] = [(d, v, None, 0) for d in domains for v in VARIANTS if v in ONCE and v in variants]
    for rep in range(repeats):
        cells += [(d, v, eps, rep) for d in domains for v in VARIANTS if v not in ONCE and v in variants]
    return cells


def check_cell(key: str, row, path: Path) -> None:
    """A run of results.json: the utility protocol's checks, and a known domain matching its key."""
    check_run(key, row, path)
    if row.get("domain") not in DOMAINS or not key.startswith(f"{row['domain']}/"):
        raise UserError(f"{path}: run {key!r}: domain {row.get('domain')!r} is not one of {', '.join(DOMAINS)}; fix "
                        "or remove the run, or use another --out")


# -- margins -------------------------------------------------------------------------------------------------

def cell_stats(runs: dict, domain: str, variant: str, eps: float, field: str = "accuracy") -> Stat:
    """Mean +- sample std of `field` over the domain's runs of the variant (at eps unless once-only)."""
    target = None if variant in ONCE else eps
    return stat([r.get(field) for r in runs.values()
                 if r.get("domain") == domain and r["variant"] == variant and r.get("epsilon_target") == target])


def margin(a: Stat, b: Stat) -> tuple[float | None, float | None]:
    """(mean a - mean b, its standard error sqrt(s_a^2/n_a + s_b^2/n_b) when both have a spread)."""
    if a.mean is None or b.mean is None:
        return None, None
    se = math.sqrt(a.std ** 2 / a.n + b.std ** 2 / b.n) if a.std is not None and b.std is not None else None
    return a.mean - b.mean, se


def degradation(m_far: tuple, m_in: tuple) -> tuple[float | None, float | None]:
    """Far-domain margin minus in-domain margin (negative: the transfer loses ground), se combined."""
    (a, sa), (b, sb) = m_far, m_in
    if a is None or b is None:
        return None, None
    return a - b, math.sqrt(sa ** 2 + sb ** 2) if sa is not None and sb is not None else None


def points(m: tuple[float | None, float | None]) -> str:
    """A margin in percentage points, '+x.x ± se' (never '-0.0'); '—' when not measured."""
    mean, se = m
    if mean is None:
        return "—"
    return f"{round(100 * mean, 1) + 0.0:+.1f}" + ("" if se is None else f" ± {100 * se:.1f}")


def domain_margins(runs: dict, domain: str, eps: float) -> tuple[tuple, tuple]:
    """(ours - direct, ours - public) accuracy margins on one domain."""
    ours = cell_stats(runs, domain, OURS, eps)
    return margin(ours, cell_stats(runs, domain, DIRECT, eps)), margin(ours, cell_stats(runs, domain, PUBLIC, eps))


# -- report -------------------------------------------------------------------------------------------------

def spent_text(s: float | None) -> str:
    return "—" if s is None else "0 (public)" if s == 0 else "∞ (non-private)" if s == math.inf else f"{s:.2f}"


def main_table(runs: dict, domains: list[str], variants: list[str], eps: float) -> list[str]:
    """One row per (domain, variant); the margins on ours' row."""
    lines = ["| domain | variant | runs | ε spent | accuracy (real test) | balanced acc. (mean recall) | FID | "
             "ours − direct (points) | ours − public (points) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for d in domains:
        md, mp = domain_margins(runs, d, eps)
        for v in variants:
            acc = cell_stats(runs, d, v, eps)
            bal, fid = (cell_stats(runs, d, v, eps, f) for f in ("mean_per_class_accuracy", "fid"))
            m = f"{points(md)} | {points(mp)}" if v == OURS else "— | —"
            lines.append(f"| {d} | {v} | {acc.n} | {spent_text(cell_stats(runs, d, v, eps, 'epsilon').mean)} | "
                         f"{acc.text(100, unit='%')} | {bal.text(100, unit='%')} | {fid.text(digits=2)} | {m} |")
    return lines


def degradation_table(runs: dict, domains: list[str], eps: float) -> list[str]:
    """Per far domain: its margins, the in-domain ones, and the change; empty without the in-domain cells."""
    far = [d for d in domains if d != IN_DOMAIN]
    if IN_DOMAIN not in domains or not far:
        return []
    i_d, i_p = domain_margins(runs, IN_DOMAIN, eps)
    lines = [f"| far domain | ours − direct there | on {IN_DOMAIN} | change | ours − public there | on {IN_DOMAIN} | "
             "change |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for d in far:
        f_d, f_p = domain_margins(runs, d, eps)
        lines.append(f"| {d} | {points(f_d)} | {points(i_d)} | {points(degradation(f_d, i_d))} | {points(f_p)} | "
                     f"{points(i_p)} | {points(degradation(f_p, i_p))} |")
    return lines


def tables(runs: dict, domains: list[str], variants: list[str], eps: float) -> str:
    """The main table, then the degradation table (when the in-domain cells are among the domains)."""
    out = "\n".join(main_table(runs, domains, variants, eps))
    deg = degradation_table(runs, domains, eps)
    if deg:
        out += ("\n\nDegradation (far-domain margin − in-domain margin, points; negative: the transfer loses "
                "ground):\n\n" + "\n".join(deg))
    return out


def domain_table(info: dict[str, dict]) -> str:
    """Each domain's private set, class counts and the majority-class floor."""
    lines = ["| domain | what | private set | classes (train / test counts) | majority-class test acc. |",
             "| --- | --- | --- | --- | ---: |"]
    for d, i in info.items():
        tr, te = i["counts"]["train"], i["counts"]["test"]
        lines.append(f"| {d} | {DOMAINS[d].what} | `{Path(i['spec']).name}` | {DOMAINS[d].num_classes}: "
                     f"{' '.join(map(str, tr))} / {' '.join(map(str, te))} | {100 * majority(i['counts']):.1f}% |")
    return "\n".join(lines)


def majority(counts: dict[str, list[int]]) -> float:
    """Test accuracy of always answering the commonest test class (the floor an unbalanced set gives)."""
    return max(counts["test"]) / max(1, sum(counts["test"]))


def figure(runs: dict, info: dict, variants: list[str], eps: float, path: Path) -> Path:
    """Grouped bars: accuracy per domain per variant (error bars: std over repetitions) and the
    majority-class floor."""
    domains = list(info)
    bars = []
    for k, v in enumerate(variants):
        st = [cell_stats(runs, d, v, eps) for d in domains]
        bars.append(figures.Series(v, list(range(len(domains))), [None if s.mean is None else 100 * s.mean for s in st],
                                   [None if s.std is None else 100 * s.std for s in st], {"color": f"C{k}"}))
    bars.append(figures.Series("always the commonest class", list(range(len(domains))),
                               [100 * majority(info[d]["counts"]) for d in domains], None, {"color": "0.75"}))
    return figures.grouped_bars(path, domains, bars, ylabel="downstream accuracy on the real test split (%)",
                                xlabel="private set", title=f"Cross-domain transfer at ε = {eps:g} (error bars: std "
                                                            "over repetitions)")


def report(out: Path, data: dict, info: dict, variants: list[str], eps: float) -> str:
    """results.md and the figure; returns the report's body (printed)."""
    runs = data["runs"]
    png = figure(runs, info, variants, eps, out / "transfer_accuracy.png")
    direct_bal = all(r.get("mean_per_class_accuracy") is not None for r in runs.values() if r["variant"] == DIRECT)
    body = "\n\n".join([
        f"Target ε = {eps:g} (δ = the recipe's) for every private cell; the same recipe on every domain except "
        "data.private and data.num_classes. Accuracy: mean ± sample std over repetitions; margins: difference of "
        "means ± its standard error (none where a side ran once). `public` is the glyph model without fine-tuning "
        "(its class rows 0..K-1 stand for the private classes). Balanced accuracy = mean recall over the classes "
        "present in the test split" + ("" if direct_bal else "; the direct DP classifier reports accuracy only") + ".",
        domain_table(info), tables(runs, list(info), variants, eps),
        f"Conversion of a source that does not fit the model: {CONVERSION}."])
    common.write_report(out, "Cross-domain transfer: a private set far from the public glyphs", data, body, [png])
    return body


# -- main ---------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    from dpldm.config import load_config
    from dpldm.models.unet import UNet

    repeats = check_args(args)
    out = Path(args.out).absolute()
    sets = (utility.QUICK_SETS if args.quick else []) + list(args.set) + [f"train.threads={args.threads}"]
    base = load_config(args.config, sets)  # ConfigError on a bad recipe or --set, before anything is written
    if base.data.channels != 1:
        raise UserError(f"the transfer experiment converts to grey images: data.channels must be 1, got "
                        f"{base.data.channels}")
    specs = utility.ablation_specs(UNet(base.unet))
    store = ResultStore(out, NAME, settings_of(base, args), check_run=check_cell).open()
    import torch

    torch.set_num_threads(args.threads)
    info = {}
    for d in args.domains:
        spec = prepare_domain(d, base.data.image_size, out / "data", args.quick)
        info[d] = {"spec": spec, "counts": class_counts(spec)}
        print(f"[{NAME}] {d}: data.private = {spec}; classes train {info[d]['counts']['train']}, test "
              f"{info[d]['counts']['test']}", flush=True)
    for d, v, eps, rep in common.progress(plan(args.domains, args.variants, args.epsilon, repeats), NAME):
        key = cell_key(d, v, eps, rep)
        if key in store.runs:
            print(f"[{NAME}] {key}: cached", flush=True)
            continue
        cfg = load_config(args.config, sets + domain_sets(d, info[d]["spec"]) +
                          ([f"privacy.epsilon={eps!r}"] if eps is not None else []))
        t0 = time.time()
        row = utility.run_one(v, eps, rep, cfg, specs, args, out / d)
        store.record(key, {**row, "domain": d, "seconds": round(time.time() - t0, 1)})
        print(f"[{NAME}] {key}: accuracy {row.get('accuracy'):.4f}, {time.time() - t0:.1f} s", flush=True)
    print(report(out, store.data, info, args.variants, args.epsilon))
    print(f"[{NAME}] wrote {out / 'results.md'}, {out / 'transfer_accuracy.png'} and {out / 'results.json'}",
          flush=True)
    return 0
