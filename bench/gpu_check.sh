#!/usr/bin/env bash
# bench/gpu_check.sh: the GPU checks of one session, at most ~6 minutes on one H200.
#
#   bash bench/gpu_check.sh            # from the repository root (or anywhere: it cd's there)
#   PY=/usr/bin/python3 bash bench/gpu_check.sh
#   GPU_CHECK_BUILD=1 bash bench/gpu_check.sh   # first build dpldm._cuda in place (+1-2 min, nvcc)
#
# Python: $PY (default .venv/bin/python, else python3 on PATH). It must already have a CUDA
# build of torch and triton (nothing is downloaded: these machines are offline); opacus,
# deepspeed and mlxtend are needed by stages (c)-(e) only, whose failure then names them.
# dpldm need not be installed: if `import dpldm.kernels` fails, a symlink overlay of dpldm/
# with kernels/ as dpldm/kernels goes first on PYTHONPATH (what `pip install -e .` maps), and
# PYTHONSAFEPATH=1 keeps the current directory's bare dpldm/ from shadowing it.
#
# Stages (each under `timeout`, limits summing to 6 min 15 s; a stage passes when it exits 0, and
# (d)/(e) must also print a line starting RESULT_JSON):
#   env        CUDA visible to torch, triton importable, the GPU's name
#   (a) tests  pytest tests/test_kernels_gpu.py tests/test_kernels_triton.py tests/test_engine_bf16.py
#              with Triton autotuning off (fixed blocks), then the autotune / bf16 tests with it on
#   (b) kern   bench/kernels.py --quick --device cuda (fp32 + bf16)
#   (c) step   bench/dp_step.py --device cuda --quick (demo b=256, CelebA64 b=32, fp32 + bf16)
#   (d) ft     dpldm finetune, 20 steps, fp32 and bf16
#   (e) zero3  launch/train.py --zero 3, 5 steps
# Prints one table (stage, status, seconds, log) and exits 1 if any stage failed. Logs and the
# JSON of (b)/(c) go to $GPU_CHECK_OUT (default: a new folder under /tmp; also copied to $OUT
# when that is set, as on the device machine).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-.venv/bin/python}
if ! [ -x "$PY" ]; then PY=$(command -v python3 || true); fi
LOGS=${GPU_CHECK_OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$LOGS/torch_extensions}

declare -a NAMES STATUS SECS
FAILED=0

record() {  # name status seconds
  NAMES+=("$1"); STATUS+=("$2"); SECS+=("$3")
  if [ "$2" != "ok" ]; then FAILED=1; fi
}

stage() {  # stage NAME LIMIT_S [--result] CMD...  (output to $LOGS/NAME.log)
  local name=$1 limit=$2; shift 2
  local want_result=0
  if [ "${1:-}" = "--result" ]; then want_result=1; shift; fi
  local t0=$SECONDS rc
  echo "== $name (limit ${limit}s): $*" | tee "$LOGS/$name.log"
  timeout --kill-after=15 "$limit" "$@" >>"$LOGS/$name.log" 2>&1
  rc=$?
  local dt=$((SECONDS - t0)) st=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then st="timeout"
  elif [ $rc -ne 0 ]; then st="fail(rc=$rc)"
  elif [ $want_result -eq 1 ] && ! grep -q '^RESULT_JSON ' "$LOGS/$name.log"; then st="fail(no RESULT_JSON)"
  fi
  tail -n 4 "$LOGS/$name.log" | sed 's/^/   | /'
  record "$name" "$st" "$dt"
}

# ---- env ------------------------------------------------------------------------------------------
if [ -z "$PY" ]; then
  echo "no python: set PY=/path/to/python (with a CUDA build of torch)"; exit 2
fi
if ! "$PY" -c "import dpldm.kernels" >/dev/null 2>&1; then
  SHIM="$LOGS/shim"
  rm -rf "$SHIM"; mkdir -p "$SHIM/dpldm"
  for f in "$ROOT"/dpldm/* "$ROOT"/dpldm/.[!.]*; do [ -e "$f" ] && ln -s "$f" "$SHIM/dpldm/"; done
  ln -sfn "$ROOT/kernels" "$SHIM/dpldm/kernels"
  export PYTHONPATH="$SHIM:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONSAFEPATH=1
  echo "dpldm is not installed for $PY: using the overlay $SHIM (dpldm/ + kernels/ as dpldm.kernels)"
fi
if [ "${GPU_CHECK_BUILD:-0}" = "1" ]; then
  stage build 300 "$PY" setup.py build_ext --inplace
fi
stage env 30 "$PY" -c "
import torch, triton, dpldm.kernels as K
assert torch.cuda.is_available(), 'torch sees no CUDA device (torch %s, built with CUDA %s)' % (torch.__version__, torch.version.cuda)
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(0))
print({k: v for k, v in K.backend_report().items() if k.endswith('@cuda')})
"
if [ "${STATUS[${#STATUS[@]}-1]}" != "ok" ]; then
  echo "environment check failed: see $LOGS/env.log"; exit 1
fi
if ! "$PY" -c "import dpldm._cuda" >/dev/null 2>&1; then
  export DPLDM_SKIP_CUDA_BUILD=1  # the tests then check triton only, and say the CUDA extension was skipped
  echo "dpldm._cuda is not built here (GPU_CHECK_BUILD=1 builds it): the CUDA-extension tests are skipped"
fi

# ---- (a) tests ------------------------------------------------------------------------------------
TESTS="tests/test_kernels_gpu.py tests/test_kernels_triton.py tests/test_engine_bf16.py tests/test_kernel_selection.py"
stage tests 80 env DPLDM_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -x -p no:cacheprovider $TESTS
stage tests_autotune 40 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_kernels_gpu.py \
  -k "autotune or same_inputs or selector"

# ---- (b) kernels bench, (c) DP step bench ------------------------------------------------------------
stage kernels 30 "$PY" bench/kernels.py --quick --device cuda --reps 3 --json "$LOGS/kernels.json"
stage dp_step 75 "$PY" bench/dp_step.py --device cuda --quick --json

# ---- (d) 20-step fine-tuning, fp32 and bf16; (e) ZeRO-3 launch, 5 steps ----------------------------------
for prec in fp32 bf16; do
  stage "finetune_$prec" 30 --result "$PY" -m dpldm finetune --config configs/demo.toml --out "$LOGS/ft_$prec" \
    --device cuda --max-steps 20 --set "train.precision=$prec" --set train.wandb=false
done
stage zero3 45 --result "$PY" launch/train.py --config configs/demo.toml --zero 3 --out "$LOGS/zero3" \
  --device cuda --set privacy.steps=5 --set train.wandb=false

# ---- table ----------------------------------------------------------------------------------------
echo
grep '^|' "$LOGS/dp_step.log" 2>/dev/null || true
grep -E 'measured auto|GFLOP per example' "$LOGS/dp_step.log" 2>/dev/null || true
echo
printf '%-16s %-22s %6s  %s\n' stage status seconds log
for i in "${!NAMES[@]}"; do
  printf '%-16s %-22s %6s  %s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "$LOGS/${NAMES[$i]}.log"
done
echo "total ${SECONDS}s"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  cp "$LOGS"/*.log "$LOGS"/*.json "$OUT"/ 2>/dev/null || true
fi
exit $FAILED
