"""`dpldm demo` end to end on the shipped model, shrunk to seconds: every report field is there,
epsilon is what the accountant says, the grid and samples are written."""
import json
import re

from dpldm.cli import main
from dpldm.privacy.accountant import compute_epsilon

FIELDS = {"epsilon", "delta", "sigma", "q", "steps", "trainable_parameters", "fid", "fid_n_samples", "kid",
          "accuracy", "per_class_accuracy", "mean_per_class_accuracy", "worst_class", "seconds_sampling",
          "seconds_evaluation"}
# a private fine-tune's duration grows with its realised Poisson batches: never in a private report
TIMING_OF_PRIVATE_WORK = {"wall_time_s", "seconds_finetune"}


def test_demo_writes_full_report(tmp_path):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--no-wandb", "--set", "privacy.steps=2", "--set", "train.threads=1",
               "--set", "privacy.expected_batch_size=200", "--set", "privacy.physical_batch_size=100",
               "--samples-per-class", "4", "--fid-samples", "8"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert FIELDS <= set(report), FIELDS - set(report)
    assert report["private"] is True and not TIMING_OF_PRIVATE_WORK & set(report)
    assert re.search(r"\| time \(s\) \| sampling [0-9.]+, evaluation [0-9.]+ \(a private fine-tune's duration is "
                     r"not reported", (out / "report.md").read_text())
    assert report["steps"] == 2 and report["q"] == 200 / 4000 and report["delta"] == 1e-5
    assert report["epsilon"] == compute_epsilon(report["sigma"], report["q"], 2, 1e-5, "prv")
    assert report["epsilon"] <= 10.0 + 1e-9
    assert report["fid_n_samples"] == 8 and report["fid"] > 0
    assert 0.0 <= report["accuracy"] <= 1.0 and report["n_synthetic"] == 40
    assert report["n_train_synthetic"] + report["n_val_synthetic"] == report["n_synthetic"]
    assert (out / "samples_per_class.png").stat().st_size > 0
    assert "downstream accuracy" in (out / "report.md").read_text()
    per_class = report["per_class_accuracy"]  # the downstream CNN's real-test recall, one per MNIST class
    assert len(per_class) == 10 and all(0.0 <= a <= 1.0 for a in per_class)
    assert abs(report["mean_per_class_accuracy"] - sum(per_class) / 10) < 1e-12  # every class has test images
    assert per_class[report["worst_class"]] == min(per_class)
    worst = report["worst_class"]
    assert (f"| class fidelity: downstream CNN's real-test accuracy per class | mean "
            f"{100 * report['mean_per_class_accuracy']:.1f}%, worst class {worst}: {100 * per_class[worst]:.1f}% |"
            in (out / "report.md").read_text())


def test_demo_reuses_a_model_only_for_the_same_training_settings(tmp_path, capsys):
    """A second `dpldm demo` on the same --out reuses the fine-tuned model; with other training
    settings (here K) it refuses before any work instead of sampling the stale model."""
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--no-wandb", "--set", "privacy.steps=1", "--set", "train.threads=1",
            "--set", "privacy.expected_batch_size=100", "--set", "privacy.physical_batch_size=100",
            "--samples-per-class", "2", "--no-fid"]
    assert main(args) == 0
    before = (out / "finetune" / "model" / "meta.json").read_bytes()
    capsys.readouterr()
    assert main(args + ["--set", "diffusion.timesteps_per_example=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    k = json.loads((out / "finetune" / "model" / "meta.json").read_text())["config"]["diffusion"]["timesteps_per_example"]
    assert k != 2
    assert len(err) == 1 and f"was fine-tuned with other settings (diffusion.timesteps_per_example: model {k} != recipe 2)" in err[0]
    assert (out / "finetune" / "model" / "meta.json").read_bytes() == before
