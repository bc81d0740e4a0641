"""What `dpldm experiment mia` shows: each attack's table (AUC, TPR at 1% and 0.1% FPR with 95%
bootstrap intervals, beside the (epsilon, delta)-DP bound), the ROC figure, the report's text and one
line per model. Reads only results.json's cells (scores and metrics); computes nothing new."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from dpldm.experiments import figures
from dpldm.experiments import mia_attacks as A

ATTACKS = {"loss": "loss attack (per-example diffusion loss)",
           "calibrated": "reference-calibrated loss (target minus public model)",
           "pia": "PIA (Kong et al. 2024, p = 4)"}
CONTROL, PUBLIC = "control", "public"


def attack_scores(model: dict, public: dict, attack: str, members: str) -> tuple[np.ndarray, np.ndarray]:
    """Membership scores (higher = member) of the members and the non-members under one attack."""
    def raw(sets: str) -> np.ndarray:
        if attack == "calibrated":
            return np.asarray(model[sets]["loss_cal"]) - np.asarray(public[sets]["loss_cal"])
        return np.asarray(model[sets][attack])
    return -raw(members), -raw("nonmembers")


# -- metrics --------------------------------------------------------------------------------------------

def eps_delta(eps: float, delta: float) -> str:
    """The (epsilon, delta) a release claims: '0.997 (1e-05)', '∞'."""
    return "∞" if eps == math.inf else f"{eps:.3g}" + (f" ({delta:.0e})" if delta else "")


def ci_text(v: float, ci) -> str:
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def table(runs: dict, attack: str, labels: list[str]) -> str:
    head = ("| model | ε (δ) | AUC [95% CI] | AUC bound | TPR@1% FPR [CI] | bound | TPR@0.1% FPR [CI] | bound "
            "| under the bound |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for lab in labels:
        r = runs.get(f"metrics:{attack}:{lab}")
        if r is None:
            continue
        t, c, b = r["tpr"], r["tpr_ci"], r["bound"]
        lines.append(f"| {lab} | {eps_delta(r['epsilon'], r['delta'])} | {ci_text(r['auc'], r['auc_ci'])} "
                     f"| {r['auc_bound']:.3f} | {ci_text(t['0.01'], c['0.01'])} | {b['0.01']:.4f} | "
                     f"{ci_text(t['0.001'], c['0.001'])} | {b['0.001']:.4f} | {r['under_bound']} |")
    return "\n".join(lines)


def roc_figure(path: Path, runs: dict, labels: list[str]) -> Path:
    """One log-log panel per attack: the ROC curve of every model, its DP bound dashed (same colour)."""
    plt = figures._plt()
    fig, axes = plt.subplots(1, len(ATTACKS), figsize=(5.0 * len(ATTACKS), 4.4), squeeze=False)
    public = runs[f"scores:{PUBLIC}"]["scores"]
    for ax, attack in zip(axes[0], ATTACKS):
        floor = 1.0
        for j, lab in enumerate(labels):
            r, m = runs.get(f"scores:{lab}"), runs.get(f"metrics:{attack}:{lab}")
            if r is None or m is None:
                continue
            mem, non = attack_scores(r["scores"], public, attack, members_set(lab))
            fpr, tpr = A.roc_curve(mem, non)
            floor = min(floor, 0.5 / non.size, 0.5 / mem.size)
            ax.plot(np.maximum(fpr, 1e-6), np.maximum(tpr, 1e-6), color=f"C{j}", label=f"{lab} (AUC {m['auc']:.2f})")
            if 0 < m["epsilon"] < math.inf:  # eps = 0 is the chance line
                xs = np.logspace(-5, 0, 200)
                ax.plot(xs, A.dp_tpr_bound(xs, m["epsilon"], m["delta"]), color=f"C{j}", linestyle="--", lw=0.9,
                        label=f"DP bound ε={m['epsilon']:.3g}")
        ax.plot([floor, 1], [floor, 1], color="gray", linestyle=":", label="chance")
        ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1.05), xlabel="false positive rate",
               ylabel="true positive rate", title=ATTACKS[attack])
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("Membership inference: ROC (log-log) against the (ε, δ)-DP bound (dashed)", fontsize=10)
    fig.tight_layout()
    return figures._save(fig, path)


def members_set(label: str) -> str:
    return "control_members" if label == CONTROL else "members"


def model_line(runs: dict, label: str) -> str:
    parts = []
    for a in ATTACKS:
        m = runs.get(f"metrics:{a}:{label}")
        if m is not None:
            parts.append(f"{a} AUC {ci_text(m['auc'], m['auc_ci'])}, TPR@1% {m['tpr']['0.01']:.3f} "
                         f"(bound {m['bound']['0.01']:.3f}), under the bound: {m['under_bound']}")
    r = runs[f"scores:{label}"]
    return f"[mia] {label} (ε {eps_delta(r['epsilon'], r['delta'])}): " + "; ".join(parts)


def report_body(runs: dict, labels: list[str], prot: Any) -> str:
    """results.md's body; `prot`: the experiment's Protocol (members, noises, grid, control_per_class)."""
    cal = runs["calibration"]
    grid_rows = "\n".join(f"| {t} | " + " | ".join(f"{cal['auc'][a][str(t)]:.3f}" for a in ATTACKS) + " |"
                          for t in prot.grid)
    control = {a: runs[f"metrics:{a}:{CONTROL}"]["auc"] for a in ATTACKS if f"metrics:{a}:{CONTROL}" in runs}
    works = bool(control) and max(control.values()) >= 0.6
    dp = [runs[k]["under_bound"] for k in runs if k.startswith("metrics:") and "eps=" in k
          and math.isfinite(runs[k]["epsilon"])]
    lines = [f"Members: {prot.members} private TRAIN examples (seeded); non-members: {prot.members} held-out TEST "
             f"examples. Scores: mean over {prot.noises} fixed noise draws at one timestep (loss, calibrated) or "
             "PIA at one timestep, chosen on public glyphs (the positive-control procedure rehearsed on "
             f"{cal['public_members']} public members vs {cal['public_nonmembers']} public non-members). Bound: "
             "TPR <= min(1, e^ε FPR + δ, 1 - e^-ε (1 - δ - FPR)) at the release's accounted ε and total δ; "
             "'yes (within CI)' = the estimate is above the bound but its 95% bootstrap interval is not (at FPR 0.1% "
             f"of {prot.members} non-members a chance-level attack scatters around e^1 x 0.001); 'NO' = the whole "
             "interval lies above the bound.", "",
             "**Timestep choice on public data** (AUC of each attack; chosen: "
             + ", ".join(f"{a} t={cal['chosen'][a]}" for a in ATTACKS) + ")", "",
             "| t | " + " | ".join(ATTACKS) + " |", "|---" * (len(ATTACKS) + 1) + "|", grid_rows, "",
             f"**Positive control** (whole UNet, no privacy, {prot.control_per_class} members per class): AUC "
             + ", ".join(f"{a} {v:.3f}" for a, v in control.items()) + ": "
             + ("the attacks work (>= 0.6)." if works else "BELOW 0.6: the attacks prove nothing here."), "",
             f"**DP models under the bound**: {'yes' if dp and 'NO' not in dp else 'NO' if dp else '—'} "
             f"({len(dp)} attack x model cells: {dp.count('yes')} under it, {dp.count(A.WITHIN)} above it within "
             f"the CI, {dp.count('NO')} significantly above).", ""]
    for a, title in ATTACKS.items():
        lines += [f"### {title}", "", table(runs, a, labels), ""]
    return "\n".join(lines)
