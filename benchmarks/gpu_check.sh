#!/usr/bin/env bash
# The one GPU check: every GPU figure the project needs, in one run of under 8 minutes on one NVIDIA GPU.
#
#   bash benchmarks/gpu_check.sh --fetch-wheels   # on a machine with pip access: wheels into .whl/ (git-ignored)
#   bash benchmarks/gpu_check.sh                  # on the GPU machine (carry .whl): writes $OUT or benchmarks/results/gpu
#
# Steps (each with its own time limit, so one failure does not eat the others' time):
#   1. nvidia-smi and the JAX / Triton / torch versions
#   2. Triton compile + numerics of the fused wkv7 kernels vs the float64 loop, every input family, forward and
#      all gradients, at a small shape (benchmarks/wkv7_numerics.py)
#   3. wkv7 forward and forward+backward at B=8 T=4096 H=64 N=64 bf16: pallas (fused) vs chunked (XLA) vs fla's
#      chunk_rwkv7, with the numerics checks at that shape (wkv7_gpu.py); then the chunk / warps / stages sweep
# The time limits add up to 470 s (7.8 min) plus the wheel install.
#   4. train-step tokens/s and MFU for qwen2 / wuneng / rwkv7 at the 150m size (train_step.py)
#   5. decode tokens/s (decode.py, 0.5B-like shape, contexts 1k-8k)
# The GPU image has its own jax (0.11.x, CUDA 13) and torch; the wheels add what it lacks or pins differently
# (fla-core: fla's chunk_rwkv7; flax at the project's version). Results: JSON files with the device name.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl fla-core==0.6.0 flax==0.12.8
  ls -l .whl
  exit 0
fi

OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  echo "note: no .whl/ carried: fla column skipped unless fla is installed"
fi
export WUNENG_RESULTS_DIR="$OUT"

status=0
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s) ==="
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc in $((SECONDS - t0)) s ==="
  [[ $rc -ne 0 ]] && status=1
  return 0
}

step env 20 bash -c 'nvidia-smi; python3 -c "import jax, triton; print(jax.__version__, jax.devices(), triton.__version__)"; python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"'
step numerics 70 python3 benchmarks/wkv7_numerics.py
step wkv7 130 python3 benchmarks/wkv7_gpu.py --reps 10
# the sweep prints one line per configuration (kept in its log even if the step runs out of time)
step wkv7_sweep 90 python3 benchmarks/wkv7_gpu.py --reps 5 --warmup 1 --sweep --no-fla --no-check
step train_step 100 python3 benchmarks/train_step.py --size 150m --reps 5
step decode 60 python3 benchmarks/decode.py --contexts 1024 4096 8192 --steps 32 --reps 3
echo "results in $OUT:"
ls -l "$OUT"
exit $status
