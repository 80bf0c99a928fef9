#!/usr/bin/env bash
# Every GPU measurement of the project in one command, for the device machine (issue #4):
# random-init ViT-B-32 (batch 512) and ViT-L-14 (batch 128) in bf16, our gradient pass vs a bare
# open_clip forward + backward, same run, plus peak memory. Run there from the repo root with
#   run(command="bash benchmarks/device/gpu_benchmarks.sh", carry=[".whl"], timeout_s=540)
# after benchmarks/device/fetch_wheels.sh here; results come back under $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "${OUT:-.}/gpu.txt"
python3 benchmarks/gradient_pass.py --device cuda --precision bf16-mixed \
  --model ViT-B-32 --batch 512 --model ViT-L-14 --batch 128 --steps 20 --warmup 3 \
  --out gradient_pass_gpu.json 2>&1 | tee "${OUT:-.}/gradient_pass_gpu.log"
cp benchmarks/results/gradient_pass_gpu.json "${OUT:-.}/" 2>/dev/null || true
