#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one command, on one H100 / H200 (< 10 min):
#
#   bash benchmarks/gpu_suite.sh                 # all parts
#   bash benchmarks/gpu_suite.sh numerics mlp    # some parts (1b, mlp, numerics)
#
# 1b        ~1B Llama (d_model 2048, 16 layers, seq 2048, bf16), compiled: original,
#           u-muP, u-muP FP8 and torchao float8 tensorwise (when importable), interleaved;
#           step-time ratios and the step's peak memory.
# mlp       one SwiGLU block, the same four variants: FP8's gain without attention.
# numerics  torch._scaled_mm against the simulation, and FP8 training against bf16.
#
# Each part writes its own section of docs/benchmarks.md as it finishes and, when $OUT is
# set (the device tool's result folder), copies the page there at once, so a part that
# fails or a run cut short keeps what was already measured. Exit status: 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(1b mlp numerics)
status=0

save() {
  if [ -n "${OUT:-}" ]; then cp docs/benchmarks.md "$OUT/benchmarks.md"; fi
}

run() {
  echo "== $* ($(date +%T))"
  if ! "$@"; then status=1; echo "== FAILED: $*"; fi
  save
}

# torchao is optional and absent from the device image: wheels carried in .whl/ (see
# docs/benchmarks.md) are installed for this run only.
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/umup_site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/umup_site"
fi
$PY -c "
import sys, torch
if not torch.cuda.is_available():
    sys.exit('gpu_suite.sh: no CUDA GPU on this machine (torch.cuda.is_available() is False). '
             'It measures GPU step time and FP8 only; run it on an H100 / H200. The CPU '
             'figures come from the other benchmarks/ scripts (docs/benchmarks.md).')
print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1
for part in "${parts[@]}"; do
  case $part in
    1b) run $PY benchmarks/step_time.py --device cuda --dtype bfloat16 --compiled-only \
          --d-model 2048 --layers 16 --d-ff 5632 --seq 2048 --batch 4 --vocab 32000 \
          --fp8 --torchao --rounds 5 --steps 3 --warmup 2 --section step_time_gpu_1b_fp8 ;;
    mlp) run $PY benchmarks/step_time.py --device cuda --dtype bfloat16 --compiled-only --mlp \
          --d-model 2048 --d-ff 5632 --seq 2048 --batch 4 --fp8 --torchao --rounds 7 \
          --steps 10 --section step_time_gpu_mlp_fp8 ;;
    numerics) run $PY benchmarks/fp8_numerics.py ;;
    *) echo "unknown part '$part' (1b, mlp, numerics)"; status=1 ;;
  esac
done
exit $status
