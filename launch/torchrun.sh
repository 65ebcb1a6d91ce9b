#!/usr/bin/env bash
# Single-node launch of `megamoe train` on NPROC processes (gloo on CPU, nccl on GPUs).
#
#   launch/torchrun.sh [CONFIG | RUN_DIR] [key=value ...] [--resume]
#   NPROC=4 launch/torchrun.sh configs/debug/cpu_tiny.yaml parallel.tensor_parallel=2
#
# NPROC defaults to the number of visible GPUs, or 2 without any. The parallel degrees come from
# the config (parallel.*); the world size is NPROC. PYTHON picks the interpreter (default: the
# repository's .venv, else python3).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
if [[ -z "${NPROC:-}" ]]; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  NPROC=$(( gpus > 0 ? gpus : 2 ))
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$repo/.cache/torch_extensions}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m megamoe train "$@"
