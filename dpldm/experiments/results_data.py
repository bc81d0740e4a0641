"""What the utility protocol (dpldm/experiments/utility.py; the epsilon and ablation experiments)
keeps and shows: the variant names, what a run in results.json must hold (the store itself:
dpldm/experiments/store.py) and the table (mean +- sample std over repetitions, the direct DP-SGD
classifier beside each row). No training or evaluation happens here."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpldm.errors import UserError
from dpldm.experiments import store
from dpldm.experiments.common import Stat, stat

SCHEMA = store.SCHEMA  # results.json: store.py's fields + "ablation_specs"
# not private: run once, or once per repetition with --repeat-once (the epsilon experiment's "inf" column)
ONCE = ("public", "nonprivate-attention", "nonprivate-classifier")
GENERATIVE_PRIVATE = ("dp-attention", "dp-attention-decoder", "dp-attention-last", "dp-full")
DIRECT = "dp-classifier"
PRIVATE = GENERATIVE_PRIVATE + (DIRECT,)
VARIANTS = ONCE + PRIVATE
DEFAULT_VARIANTS = ("public", "nonprivate-attention") + PRIVATE  # `make results` of issue 16
LEGACY_NOTE = ("includes runs from an old results.json (one run per key, read as repetition 0) whose settings were "
               "not recorded: they may come from an earlier recipe")
TABLE_HEADER = ("| variant (trained modules) | ε target | ε spent | trainable params | runs | downstream acc. (real test) "
                "| FID (n) | KID | direct DP-SGD classifier, same ε | ours − direct (points) | time per run (s) |")


# -- results.json ----------------------------------------------------------------------------------------

def run_key(variant: str, eps: float | None, rep: int) -> str:
    if eps is None:  # a non-private variant: repetition 0 keeps the key of the once-only protocol
        return variant if rep == 0 else f"{variant}@rep={rep}"
    return f"{variant}@eps={eps:g}@rep={rep}"


def migrate_legacy(old: dict, path: Path) -> dict:
    """The flat schema-1 file ({"dp-attention@eps=10": row, "public": row, ...}, one run each, sampled
    and classified with seed 0) as schema 2: each old run becomes repetition 0."""
    runs: dict[str, dict] = {}
    for key, row in old.items():
        if not isinstance(row, dict):
            raise UserError(f"{path}: entry {key!r} is not a run (expected a JSON object)")
        variant, _, eps_text = key.partition("@eps=")
        if variant not in VARIANTS:
            raise UserError(f"{path}: entry {key!r} names no known variant ({', '.join(VARIANTS)})")
        try:
            eps = float(eps_text) if eps_text else None
        except ValueError:
            raise UserError(f"{path}: entry {key!r}: {eps_text!r} after '@eps=' is not a number") from None
        spec = {"dp-attention": "attention:all", "dp-full": "all"}.get(variant)
        runs[run_key(variant, eps, 0)] = {**row, "variant": variant, "epsilon_target": eps, "rep": 0, "seed": 0,
                                          **({"finetune": spec} if spec else {}), "migrated_from": key}
    return {"schema": SCHEMA, "settings_sha256": None, "settings": None, "migrated_from_schema": 1, "runs": runs}


# the fields of a run that the table computes with: each a number (JSON null: not measured)
NUMBER_FIELDS = ("epsilon_target", "epsilon", "accuracy", "fid", "kid", "seconds", "trainable_parameters",
                 "fid_n_samples")


def check_run(key: str, row: Any, path: Path) -> None:
    """One run of results.json is what `record` writes: a JSON object naming a known variant, its
    repetition an integer, every NUMBER_FIELDS value a number or null, its finetune spec a string."""
    where = f"{path}: run {key!r}"
    if not isinstance(row, dict):
        raise UserError(f"{where} is not a run (expected a JSON object, got {type(row).__name__}); fix or remove the "
                        "run, or use another --out")
    if row.get("variant") not in VARIANTS:
        raise UserError(f"{where}: variant {row.get('variant')!r} is not one of {', '.join(VARIANTS)}; fix or remove "
                        "the run, or use another --out")
    bad = [(k, row[k]) for k in NUMBER_FIELDS if row.get(k) is not None and
           (isinstance(row[k], bool) or not isinstance(row[k], (int, float)))]
    if "rep" in row and (isinstance(row["rep"], bool) or not isinstance(row["rep"], int)):
        bad.append(("rep", row["rep"]))
    if row.get("finetune") is not None and not isinstance(row["finetune"], str):
        bad.append(("finetune", row["finetune"]))
    if bad:
        k, v = bad[0]
        kind = "an integer" if k == "rep" else "a string or null" if k == "finetune" else "a number or null"
        raise UserError(f"{where}: {k!r} must be {kind}, got {v!r}; fix or remove the run, or use another --out")


def read_results(path: Path) -> dict:
    """results.json of the utility protocol (an old flat file is migrated in memory; every run checked)."""
    return store.read(path, check_run, migrate_legacy)


# -- the table -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TableRow:
    variant: str
    epsilon_target: float | None
    finetune: str | None
    runs: int
    accuracy: Stat
    fid: Stat
    kid: Stat
    epsilon_spent: Stat
    seconds: Stat
    trainable_parameters: int | None
    fid_n_samples: int | None
    direct: Stat | None  # the direct DP-SGD classifier's accuracy at the same target epsilon
    margin: float | None  # accuracy mean - direct mean
    margin_se: float | None  # sqrt(s1^2/n1 + s2^2/n2) when both have >= 2 runs
    legacy: bool = False  # some run came from an old (schema 1) results.json: its settings were not recorded


def aggregate(runs: dict[str, dict]) -> list[TableRow]:
    """One row per (variant, target epsilon): the once-only variants first, then by epsilon."""
    groups: dict[tuple[str, float | None], list[dict]] = {}
    for row in runs.values():
        groups.setdefault((row["variant"], row.get("epsilon_target")), []).append(row)
    order = {v: i for i, v in enumerate(VARIANTS)}
    keys = sorted(groups, key=lambda k: (k[1] is not None, k[1] or 0.0, order.get(k[0], len(order)), k[0]))
    out = []
    for variant, eps in keys:
        rows = sorted(groups[(variant, eps)], key=lambda r: r.get("rep", 0))
        acc = stat([r.get("accuracy") for r in rows])
        direct = None
        if eps is not None and variant != DIRECT and (DIRECT, eps) in groups:
            direct = stat([r.get("accuracy") for r in groups[(DIRECT, eps)]])
        margin = margin_se = None
        if direct is not None and direct.n and acc.n:
            margin = acc.mean - direct.mean
            if acc.std is not None and direct.std is not None:
                margin_se = math.sqrt(acc.std ** 2 / acc.n + direct.std ** 2 / direct.n)
        out.append(TableRow(variant, eps, rows[0].get("finetune"), len(rows), acc, stat([r.get("fid") for r in rows]),
                            stat([r.get("kid") for r in rows]), stat([r.get("epsilon") for r in rows]),
                            stat([r.get("seconds") for r in rows]), rows[0].get("trainable_parameters"),
                            rows[0].get("fid_n_samples"), direct, margin, margin_se,
                            any("migrated_from" in r for r in rows)))
    return out


def markdown_table(rows: list[TableRow]) -> str:
    lines = [TABLE_HEADER, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        name = r.variant + (f" ({r.finetune})" if r.finetune else "") + (" †" if r.legacy else "")
        target = "—" if r.epsilon_target is None else f"{r.epsilon_target:g}"
        spent = r.epsilon_spent.mean
        spent_s = ("∞ (non-private)" if spent == float("inf") or (spent is None and r.variant.startswith("nonprivate"))
                   else "0 (no private data)" if spent == 0 else "—" if spent is None else f"{spent:.2f}")
        params = "—" if r.trainable_parameters is None else f"{r.trainable_parameters:,}"
        fid = r.fid.text() + ("" if r.fid.mean is None or r.fid_n_samples is None else f" ({r.fid_n_samples})")
        direct = "—" if r.direct is None else f"{r.direct.text(100, unit='%')} (n={r.direct.n})"
        margin = "—" if r.margin is None else f"{round(100 * r.margin, 1) + 0.0:+.1f}" + (  # never "-0.0"
            "" if r.margin_se is None else f" ± {100 * r.margin_se:.1f}")
        lines.append(f"| {name} | {target} | {spent_s} | {params} | {r.runs} | {r.accuracy.text(100, unit='%')} | "
                     f"{fid} | {r.kid.text(digits=4)} | {direct} | {margin} | {r.seconds.text(digits=0)} |")
    if any(r.legacy for r in rows):
        lines += ["", f"† {LEGACY_NOTE}"]
    return "\n".join(lines)
