#!/usr/bin/env bash
# Issue 20, part 2: the first GPU measurements in one run of at most 10 minutes, results under $OUT.
#
#   OUT=/tmp/gpu_out bench/gpu_suite.sh          # on a GPU node, from the repo root
#
# Each step has its own time limit and log ($OUT/<step>.log); a failing or timed-out step is
# recorded in $OUT/summary.txt and the next one runs anyway. No install is needed where python3
# already holds a CUDA torch and Triton (the device image): the repo runs from PYTHONPATH. Wheels
# in .whl/ (megatron-core, deepspeed for the peer benchmark) are installed into /tmp/site first.
# Budget: doctor 60 s + kernel tests 150 s + Lory merge 150 s + models 150 s + peers 60 s = 570 s.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

step() {  # step NAME SECONDS COMMAND...: run with a limit, log, and record the exit status
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local what=ok
  [ "$rc" -eq 124 ] && what="timed out after ${limit}s"
  [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && what="failed (exit $rc)"
  echo "$name: $what in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

: > "$OUT/summary.txt"
{ nvidia-smi; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, torch.cuda.get_device_name())"; } > "$OUT/machine.txt" 2>&1
step doctor 60 "$PY" -m megamoe doctor --shape 8,256,1024,2816
step kernel_tests 150 "$PY" -m pytest tests/kernels -q -p no:cacheprovider -x
step lory_merge 150 "$PY" -m bench.lory_merge --experts 8 16 32 --dtype bf16
step gpu_models 150 "$PY" -m bench.gpu_models --dtype bf16
step peer_moe_layers 60 "$PY" -m bench.peer_moe_layers --dtype bf16
cat "$OUT/summary.txt"
