#!/usr/bin/env bash
# Issue 25's GPU checks as one script, for a lent NVIDIA H100 or H200 (the `device` tool's `run`,
# from the repository's root): the CUDA tests, then `swarm-bench gpu` for `small` and `1b` in bf16.
# About 5 minutes on an H100; logs go to $OUT (or /tmp/gpu_check). Needs python3 with torch (CUDA),
# msgpack, numpy, safetensors and pytest, as the lent machines have; nothing is installed, hivemind
# is not needed (the in-process peer moves no bytes over the network).
#
#   bash launch/gpu_check.sh                 # everything
#   SKIP_TESTS=1 bash launch/gpu_check.sh    # the benchmark only
set -uo pipefail
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
status=0
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$out/device.txt"
if [ -z "${SKIP_TESTS:-}" ]; then
    timeout 180 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_gpu_bench.py 2>&1 | tee "$out/tests.txt" || status=1
fi
timeout "${BENCH_TIMEOUT_S:-420}" $py -m launch.bench gpu --presets "${PRESETS:-small,1b}" --batch-size 8 --seq-len 2048 \
    --steps 20 --inner-steps 30 --rounds 2 --payloads 4 2>&1 | tee "$out/bench.txt" || status=1
exit $status
