"""README.md's `## Commands` block runs VERBATIM (SLOW: about 2-3 minutes on two shared cores).

Each line of the block is run in order by bash in a fresh folder that holds a copy of `configs/`
and a link to `launch/`, with the venv's `bin/` first on PATH (so `dpldm`, `deepspeed` and
`python` are this checkout's), and must exit 0 and leave the files it should: a model folder with
its card, shards with their manifest, a private run whose released model spends at most the
target epsilon, the same run on 2 DeepSpeed ranks, a PNG grid, a labelled npz, an evaluation, a
diffusers export. A README line this test does not know fails it (EXPECT names every command),
so the block and the test change together."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent
TIMEOUT_S = 600  # per line; a hang fails the test instead of stalling the suite

pytestmark = pytest.mark.slow


def commands_block(text: str) -> list[str]:
    """The lines of the first ```bash block after `## Commands`."""
    section = text[text.index("\n## Commands\n"):]
    m = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    assert m, "no ```bash block under ## Commands"
    return [ln for ln in m.group(1).splitlines() if ln.strip()]


def _json_line(out: str) -> dict:
    return json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])


def _model(folder: Path, epsilon_at_most: float | None = None) -> dict:
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["kind"] == "ldm" and (folder / "tensors.safetensors").is_file() and (folder / "README.md").is_file()
    if epsilon_at_most is not None:
        p = meta["privacy"]
        assert p["private"] is True and 0 < p["epsilon"] <= epsilon_at_most + 1e-6, p
        assert f"| epsilon | {p['epsilon']:.6g} |" in (folder / "README.md").read_text()
    return meta


def _ae(d: Path, out: str) -> None:
    assert json.loads((d / "runs/public/ae/model/meta.json").read_text())["kind"] == "autoencoder"


def _ldm(d: Path, out: str) -> None:
    meta = _model(d / "runs/public/ldm/model")
    assert meta.get("privacy") is None and "No differential-privacy guarantee" in \
        (d / "runs/public/ldm/model/README.md").read_text()


def _import(d: Path, out: str) -> None:
    manifest = json.loads((d / "shards/mnist/manifest.json").read_text())
    assert manifest["num_examples"] == sum(s["nsamples"] for s in manifest["shards"]) == 4000
    assert manifest["class_histogram"] == [400] * 10


def _encode(d: Path, out: str) -> None:
    assert (d / "latents/mnist/manifest.json").is_file() and list((d / "latents/mnist").glob("shard-*.tar"))


def _privacy(d: Path, out: str) -> None:
    rep = _json_line(out)
    assert rep["steps"] == 750 and rep["sample_rate"] == 0.04 and rep["epsilon"] <= 10 + 1e-6
    assert 0.5 < rep["noise_multiplier"] < 2, rep


def _finetune(d: Path, out: str) -> None:
    meta = _model(d / "runs/ft/model", epsilon_at_most=10.0)
    assert meta["privacy"]["steps"] == 3 and meta["privacy"]["num_examples"] == 4000


def _deepspeed(d: Path, out: str) -> None:
    meta = _model(d / "runs/ft-zero3/model", epsilon_at_most=10.0)
    assert meta["trained"]["world_size"] == 2 and meta["trained"]["zero_stage"] == 3, meta["trained"]


def _grid(d: Path, out: str) -> None:
    from PIL import Image

    assert Image.open(d / "grid.png").size[0] > 0


def _npz(d: Path, out: str) -> None:
    with np.load(d / "samples.npz") as z:
        assert z["images"].shape == (100, 32, 32) and sorted(set(z["labels"].tolist())) == list(range(10))


def _real(d: Path, out: str) -> None:
    for split, n in (("train", 4000), ("test", 1000)):
        with np.load(d / f"real_{split}.npz") as z:
            assert z["images"].shape == (n, 32, 32) and z["labels"].shape == (n,)


def _evaluate(d: Path, out: str) -> None:
    assert re.search(r"accuracy [0-9.]+% \(n_test=1000\)", out), out[-2000:]


def _export(d: Path, out: str) -> None:
    assert (d / "hf/unet/config.json").is_file() and (d / "hf/vae/config.json").is_file()
    assert json.loads((d / "hf/.dpldm-output.json").read_text())["kind"] == "diffusers-export"
    assert "| epsilon |" in (d / "hf/README.md").read_text()


def _audit(d: Path, out: str) -> None:
    rep = _json_line(out)
    assert rep["canaries"] == 1000 and rep["control"] == "none", rep
    assert 0 <= rep["epsilon_lower_bound"] <= rep["epsilon_claimed"] and rep["as_expected"] is True, rep


def _version(d: Path, out: str) -> None:
    import dpldm

    assert out.strip() == f"dpldm {dpldm.__version__}"


# the first words of each README line -> what it must leave behind
EXPECT: list[tuple[str, Callable[[Path, str], None]]] = [
    ("dpldm pretrain-ae ", _ae), ("dpldm pretrain-ldm ", _ldm), ("dpldm data import ", _import),
    ("dpldm data encode ", _encode), ("dpldm privacy ", _privacy), ("dpldm finetune ", _finetune),
    ("deepspeed ", _deepspeed), ("dpldm sample --checkpoint runs/ft/model --classes", _grid),
    ("dpldm sample --checkpoint runs/ft/model --per-class", _npz), ("python -c ", _real),
    ("dpldm evaluate ", _evaluate), ("dpldm export ", _export), ("dpldm audit ", _audit),
    ("dpldm --version", _version),
]


def check_for(line: str) -> Callable[[Path, str], None]:
    found = [fn for prefix, fn in EXPECT if line.startswith(prefix)]
    assert len(found) == 1, f"README line without exactly one expectation in this test: {line!r}"
    return found[0]


def run_line(line: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(["bash", "-c", line], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the line's own process group only
        out, _ = proc.communicate()
        pytest.fail(f"{line!r} did not finish in {TIMEOUT_S} s\n{out[-4000:]}")
    return subprocess.CompletedProcess(line, proc.returncode, out, "")


def test_first_lines_are_make_targets_that_exist():
    text = README.read_text()
    first = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1).splitlines()
    assert [ln.split("#")[0].strip() for ln in first] == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: ", makefile, flags=re.M) and re.search(r"^test: ", makefile, flags=re.M)


def test_no_deepspeed_flag_after_the_script():
    """The launcher's flags (--hostfile, --num_gpus, ...) go before the script, everywhere."""
    bad = []
    for path in [README, *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "launch").rglob("*"))]:
        if path.is_file() and path.suffix in ("", ".md", ".py", ".sbatch", ".example", ".sh"):
            for m in re.finditer(r"deepspeed\s+(?:\S+\s+)*?\S*train\.py\s+(--hostfile|--num_gpus|--no_ssh|--num_nodes)",
                                 path.read_text(errors="replace")):
                bad.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert not bad, bad


def test_readme_commands_run_verbatim(tmp_path):
    lines = commands_block(README.read_text())
    checks = [check_for(line) for line in lines]  # every line known before anything runs
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    (tmp_path / "launch").symlink_to(ROOT / "launch")
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))  # as the Makefile
    for k in [k for k in env if k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_"))]:
        del env[k]
    for line, check in zip(lines, checks):
        r = run_line(line, tmp_path, env)
        assert r.returncode == 0, f"{line!r} exited {r.returncode}\n{r.stdout[-4000:]}"
        check(tmp_path, r.stdout)
