#!/usr/bin/env bash
# Run the test suite under other CPU kernel families than the machine's default.
#
#   tools/test_isa.sh [FAMILY ...] [-- PYTEST_ARGS]     (FAMILY: avx2 avx512 sse; default: all three)
#
# fp32 results depend on which kernels ATen, MKL and oneDNN pick (AVX2 on AMD machines of this
# project's kind; AVX-512 and AMX on Intel ones), and CI may land on either. Each family caps all
# three libraries at one instruction set, so one machine can check the others' numerics. A family
# the CPU lacks falls back silently inside the libraries: check `MKL_VERBOSE=1` where in doubt.
set -euo pipefail
cd "$(dirname "$0")/.."
declare -A FAMILY=(
  [avx2]="ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2"
  [avx512]="ATEN_CPU_CAPABILITY=avx512 MKL_ENABLE_INSTRUCTIONS=AVX512 ONEDNN_MAX_CPU_ISA=AVX512_CORE"
  [sse]="ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41"
)
families=()
while (($#)) && [[ "$1" != "--" ]]; do families+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
((${#families[@]})) || families=(avx2 avx512 sse)
status=0
for fam in "${families[@]}"; do
  [[ -n "${FAMILY[$fam]:-}" ]] || { echo "test_isa: unknown family '$fam' (avx2, avx512, sse)" >&2; exit 2; }
  echo "== $fam: ${FAMILY[$fam]}"
  start=$SECONDS
  # shellcheck disable=SC2086  # the family is a list of VAR=value words
  env ${FAMILY[$fam]} .venv/bin/python -m pytest -q -p no:cacheprovider "$@" || status=1
  echo "== $fam: done in $((SECONDS - start)) s"
done
exit "$status"
