"""Shared test set-up: one torch thread (CI has 2 cores), deterministic seeds.

Triton kernels run under the interpreter on machines without a GPU; the variable must be set
before triton is first imported.
"""
import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)  # tests use tiny tensors: one thread beats two (and never oversubscribes)
except ImportError:  # pragma: no cover
    pass

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test that starts real launchers or subprocess ranks (still run by make test)")
    config.addinivalue_line("markers", "cluster: brings up a real Slurm cluster and two ssh nodes (tests/cluster/; root "
                                       "only; required in CI: DPLDM_REQUIRE_CLUSTER=1)")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield
