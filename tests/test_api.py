"""The top-level Python API: `from dpldm import ...` is lazy (PEP 562), `__version__` is the
installed distribution's, and neither `import dpldm` nor `dpldm privacy` loads the models."""
from __future__ import annotations

import importlib
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dpldm

REPO = Path(__file__).resolve().parents[1]


def test_api_names_are_the_defining_objects():
    from dpldm import DPStep, LatentDiffusion, PrivacyLedger, __version__, load_ldm

    assert load_ldm is importlib.import_module("dpldm.models.ldm").load_ldm
    assert LatentDiffusion is importlib.import_module("dpldm.models.ldm").LatentDiffusion
    assert DPStep is importlib.import_module("dpldm.privacy.dp_step").DPStep
    assert PrivacyLedger is importlib.import_module("dpldm.privacy.accountant").PrivacyLedger
    assert isinstance(__version__, str)
    for name in dpldm.__all__:
        assert getattr(dpldm, name) is not None and name in dir(dpldm)
    with pytest.raises(AttributeError, match="no attribute 'frobnicate'"):
        dpldm.frobnicate  # noqa: B018


def test_version_is_setup_py_version():
    setup_version = re.search(r'version="([^"]+)"', (REPO / "setup.py").read_text()).group(1)
    assert dpldm.__version__ == importlib.metadata.version("dpldm") == setup_version


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
    return set(out.stdout.strip().splitlines()[-1].split())  # the last line: the module names


def test_import_dpldm_is_cheap_and_privacy_does_not_load_models():
    mods = _modules_after("import dpldm")
    assert "torch" not in mods and not any(m.startswith("dpldm.") for m in mods)
    mods = _modules_after("from dpldm.cli import main\nmain(['privacy', '--noise-multiplier', '1', '--delta', '1e-5', "
                          "'--sample-rate', '0.01', '--steps', '10', '--json'])")
    assert "dpldm.privacy.accountant" in mods
    assert not any(m.startswith("dpldm.models") or m.startswith("diffusers") for m in mods), \
        sorted(m for m in mods if m.startswith(("dpldm.models", "diffusers")))


def test_api_end_to_end_on_a_tiny_model(tmp_path):
    """load_ldm -> sample, and a ledger whose epsilon equals Opacus' accountant, via the top level."""
    import torch
    from opacus.accountants import RDPAccountant

    from tiny_ldm import save_tiny

    folder = save_tiny(tmp_path / "m")
    ldm = dpldm.load_ldm(folder)
    assert isinstance(ldm, dpldm.LatentDiffusion)
    images = ldm.sample(torch.tensor([0, 1]), steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 16, 16) and images.abs().max() <= 1
    ledger = dpldm.PrivacyLedger.create(num_examples=1000, sample_rate=0.01, max_grad_norm=1.0, delta=1e-5,
                                        noise_multiplier=1.0, accountant="rdp", seed=0)
    want = RDPAccountant()
    for _ in range(5):
        ledger.step()
        want.step(noise_multiplier=1.0, sample_rate=0.01)
    assert ledger.epsilon_spent() == pytest.approx(want.get_epsilon(delta=1e-5), rel=1e-12)


def test_cli_version(capsys):
    from dpldm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"dpldm {dpldm.__version__}"


def test_cli_has_export_command():
    from dpldm.cli import COMMANDS

    assert COMMANDS["export"][0] == "dpldm.export"
