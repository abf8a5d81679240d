#!/bin/bash
# The device run of issue #13's check: install the carried wheels (benchmarks/gpu_wheels.sh), then the check,
# its JSON and log under $OUT. From the device tool: run(command="bash benchmarks/gpu_run.sh", carry=[".whl"],
# timeout_s=540). Extra arguments go to benchmarks.gpu_check (e.g. --sections graphs).
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
OUT=${OUT:-.}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).split()[1].lower() if torch.cuda.is_available() else 'cpu')")
set -o pipefail
timeout 510 python3 -m benchmarks.gpu_check --out "$OUT/gpu_check_$gpu.json" "$@" 2>&1 | tee "$OUT/gpu_check_$gpu.log"
