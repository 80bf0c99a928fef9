#!/usr/bin/env bash
# Every GPU check and measurement of the project in one command, for the device machine:
#   1. the GPU variants of the tests (`pytest -m gpu`): a CLIP gradient pass on CUDA against the
#      CPU's, a Stable Diffusion run drawing in float16 and a LLaVA run answering in bfloat16;
#   2. benchmarks/real_size_gpu.py: SD 1.5 / SD 2.1 generation and LLaVA-1.5-7B answers at their
#      real shapes (random weights), through the project's own generation and question code;
#   3. benchmarks/gradient_pass.py: random-init ViT-B-32 (batch 512), ViT-L-14 (batch 128) and
#      ViT-H-14 (batch 64) in bf16, our gradient pass vs a bare open_clip forward + backward.
# Run there from the repo root with
#   run(command="bash benchmarks/device/gpu_benchmarks.sh", carry=[".whl"], timeout_s=570)
# after benchmarks/device/fetch_wheels.sh here; logs and results come back under $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out="${OUT:-benchmarks/results}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, diffusers, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'lightning', lightning.__version__)" | tee -a "$out/gpu.txt"

timeout 210 python3 -m pytest -q -m gpu -p no:cacheprovider -rs 2>&1 | tee "$out/pytest_gpu.log"

timeout 200 python3 benchmarks/real_size_gpu.py 2>&1 | tee "$out/real_size_gpu.log"
cp benchmarks/results/real_size_gpu.json benchmarks/results/real_size_gpu.md "$out/" 2>/dev/null || true

timeout 120 python3 benchmarks/gradient_pass.py --device cuda --precision bf16-mixed \
  --model ViT-B-32 --batch 512 --model ViT-L-14 --batch 128 --model ViT-H-14 --batch 64 \
  --steps 10 --warmup 3 --out gradient_pass_gpu.json 2>&1 | tee "$out/gradient_pass_gpu.log"
cp benchmarks/results/gradient_pass_gpu.json "$out/" 2>/dev/null || true
