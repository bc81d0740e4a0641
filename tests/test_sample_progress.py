"""`dpldm sample` shows a tqdm progress bar on stderr when stderr is a terminal (as `dpldm
evaluate` does), prints plain `sampled k/n` lines when it is not, and is silent with --quiet; none
of this changes the samples."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest

from dpldm.cli import main
from tiny_ldm import TINY, save_tiny


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("progress") / "tiny", TINY)


def _sample(model: Path, out: Path, stderr: io.StringIO, *extra: str) -> np.ndarray:
    argv = ["sample", "--checkpoint", str(model), "--format", "npz", "--out", str(out), "--per-class", "3",
            "--classes", "0,1", "--batch-size", "2", "--steps", "2", "--device", "cpu", *extra]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        assert main(argv) == 0, stderr.getvalue()[-2000:]
    with np.load(out) as z:
        return z["images"]


def test_bar_on_a_terminal_lines_otherwise_nothing_with_quiet(model: Path, tmp_path: Path):
    tty, pipe, quiet = _Terminal(), io.StringIO(), _Terminal()
    with_bar = _sample(model, tmp_path / "bar.npz", tty)
    with_lines = _sample(model, tmp_path / "lines.npz", pipe)
    silent = _sample(model, tmp_path / "quiet.npz", quiet, "--quiet")

    bar = tty.getvalue()
    assert "sampling: 100%" in bar and "6/6" in bar  # tqdm's bar over the 6 samples, finished
    assert "sampled " not in bar  # no duplicate plain lines under the bar
    assert pipe.getvalue().splitlines() == ["dpldm sample: sampled 2/6", "dpldm sample: sampled 4/6",
                                            "dpldm sample: sampled 6/6"]
    assert quiet.getvalue() == ""  # --quiet: nothing on stderr, even on a terminal
    # the bar and the flags change nothing in the samples
    assert with_bar.shape == (6, 16, 16)
    np.testing.assert_array_equal(with_bar, with_lines)
    np.testing.assert_array_equal(with_bar, silent)
