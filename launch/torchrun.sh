#!/usr/bin/env bash
# Single-node launch of `megamoe train` on NPROC processes (gloo on CPU, nccl on GPUs).
#
#   launch/torchrun.sh [CONFIG | RUN_DIR] [key=value ...] [--resume]
#   NPROC=4 launch/torchrun.sh configs/debug/cpu_tiny.yaml parallel.tensor_parallel=2
#
# NPROC defaults to the number of visible GPUs, or 2 without any. SIGTERM to this launcher (or to one
# rank) makes every rank finish its step, save a checkpoint and exit; if the launcher is killed
# outright, the ranks notice at the next step and do the same. The parallel degrees come from
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

# megamoe.cli.torchrun is torchrun with megamoe's signal and error handling (see its docstring).
exec "$PYTHON" -m megamoe.cli.torchrun --standalone --nproc-per-node "$NPROC" -m megamoe train "$@"
