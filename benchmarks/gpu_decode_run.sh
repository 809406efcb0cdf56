#!/usr/bin/env bash
# One command for a lent H100/H200 (device `run`, carry [".whl"]): install the carried DeepSpeed
# wheels into /tmp/site (if any were carried), then run benchmarks/gpu_decode.py under a hard
# limit of $GPU_DECODE_TIMEOUT seconds (default 450). Arguments go to the script.
# Results: $OUT/gpu_decode.json (rewritten after each item) and $OUT/gpu_decode.log.
# Run 2 (no wheels, DeepSpeed dropped): GPU_DECODE_TIMEOUT=395 bash benchmarks/gpu_decode_run.sh \
#   --skip deepspeed,own_plain --budget-s 365   (device run with timeout_s=420)
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_decode_out}"
mkdir -p "$OUT"
export OUT
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site \
    || echo "wheel install failed: DeepSpeed will be recorded as not importable"
fi
# The image sets TORCH_CUDA_ARCH_LIST=9.0a, which DeepSpeed's op builder cannot parse.
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv \
  2>&1 | tee "$OUT/nvidia-smi.txt"
set -o pipefail
# stdout's JSON goes to the log only (it is also in $OUT/gpu_decode.json); progress lines show.
timeout "${GPU_DECODE_TIMEOUT:-450}" python3 benchmarks/gpu_decode.py "$@" 2>&1 | tee "$OUT/gpu_decode.log" | grep -v '^[ {}]'
rc=${PIPESTATUS[0]}
echo "gpu_decode.py exit status: $rc"
exit $rc
