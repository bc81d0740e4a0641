"""dpldm: differentially private latent diffusion models.

`kernels/` installs as `dpldm.kernels` (package_dir), so no top-level `kernels` package lands in
site-packages. The C++ extension `dpldm._C` (csrc/*.cpp, OpenMP) is built when a compiler is
present; the CUDA extension `dpldm._cuda` (csrc/cuda/*.cu) only where torch has CUDA, unless
DPLDM_SKIP_CUDA_BUILD=1. A failed extension build never fails the install: the package falls
back to the torch backend and says so once at run time.
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("DPLDM_SKIP_EXT_BUILD") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("dpldm: torch not importable at build time; skipping C++/CUDA extensions", file=sys.stderr)
        return [], {}
    exts = []
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    if cpp_sources:
        exts.append(CppExtension("dpldm._C", cpp_sources, extra_compile_args=["-O3", "-fopenmp"],
                                 extra_link_args=["-fopenmp"]))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    skip_cuda = os.environ.get("DPLDM_SKIP_CUDA_BUILD") == "1" or torch.version.cuda is None
    if cuda_sources and not skip_cuda:
        exts.append(CUDAExtension("dpldm._cuda", cuda_sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]}))
    elif cuda_sources:
        print("dpldm: skipping CUDA extension (torch has no CUDA or DPLDM_SKIP_CUDA_BUILD=1)", file=sys.stderr)

    class TolerantBuildExt(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - an optional accelerator must not break install
                print(f"dpldm: WARNING building {ext.name} failed ({e}); the torch backend will be used", file=sys.stderr)

    return exts, {"build_ext": TolerantBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="dpldm",
    version="0.1.0",
    description="Differentially private latent diffusion models (DP-LDM) with fused per-example clipping",
    python_requires=">=3.11",
    packages=find_packages(include=["dpldm", "dpldm.*"]) + ["dpldm.kernels"],
    package_dir={"dpldm.kernels": "kernels"},
    package_data={"dpldm": ["assets/*", "assets/**/*"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["dpldm=dpldm.cli:main"]},
)
