#!/usr/bin/env bash
# Every GPU check and measurement of the project, for the device machine, in parts that each fit
# one command (at most 10 minutes). A session has 15 minutes of device time in all, the machine's
# start (a few minutes) included, so a session runs one part:
#
#   checks (the default), about 9 minutes:
#     1. the GPU variants of the tests (`pytest -m gpu`): a CLIP gradient pass on CUDA against the
#        CPU's, a Stable Diffusion run drawing in float16 and a LLaVA run answering in bfloat16;
#     2. benchmarks/real_size_gpu.py: SD 1.5 / SD 2.1 generation and LLaVA-1.5-7B answers at their
#        real shapes (random weights), through the project's own generation and question code;
#     3. benchmarks/gradient_pass.py: random-init ViT-B-32 (batch 512), ViT-L-14 (batch 128) and
#        ViT-H-14 (batch 64) in bf16, our gradient pass vs a bare open_clip forward + backward.
#   real_shape RUN...: benchmarks/real_shape_runs.py, whole `slug-pl fit` runs of the shipped
#     recipe configs at the real shapes (random weights, synthetic data at the recipes' counts),
#     all of it within 540 s: the last run is stopped when the time is up, and records how far it
#     got. Which runs fit:
#       - `real_shape vit_b32 sd15`: the data (about a minute on 16 cores), ViT-B/32 whole (target
#         3 minutes), then SD 1.5 with what is left: it finishes only if it meets well under its
#         10-minute target. When time is short (under 12 minutes of device time left), run
#         `real_shape vit_b32` alone;
#       - `real_shape sd15` in a session of its own gives SD 1.5 about 8 minutes;
#       - `real_shape llava15` cannot finish in one command (its target is 15 minutes, and
#         building and loading the 14 GB VLM takes minutes more): it is stopped at the budget and
#         records the phases it finished (`milestones_s`, `candidates_done_s`).
#     The results files merge: copy a session's real_shape_runs.json into benchmarks/results/
#     before the next session's command, and its runs are kept beside the new ones.
#
# Run there from the repo root with
#   run(command="bash benchmarks/device/gpu_benchmarks.sh", carry=[".whl"], timeout_s=570)
#   run(command="bash benchmarks/device/gpu_benchmarks.sh real_shape vit_b32 sd15", carry=[".whl"], timeout_s=590)
# after benchmarks/device/fetch_wheels.sh here; logs and results come back under $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out="${OUT:-benchmarks/results}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, diffusers, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'lightning', lightning.__version__)" | tee -a "$out/gpu.txt"

part="${1:-checks}"
if [ "$part" = real_shape ]; then
  shift
  python3 benchmarks/real_shape_runs.py --only "$@" --budget 540 2>&1 | tee "$out/real_shape_runs.log"
  cp benchmarks/results/real_shape_runs.json benchmarks/results/real_shape_runs.md "$out/" 2>/dev/null || true
  for run in "$@"; do  # each run's log and summary, to see where the time went
    mkdir -p "$out/real_shape/$run"
    cp .real_shape_runs/real/runs/"$run"/fit.log "$out/real_shape/$run/" 2>/dev/null || true
    cp .real_shape_runs/real/runs/"$run"/lightning_logs/version_0/summary.json "$out/real_shape/$run/" 2>/dev/null || true
  done
  exit 0
fi

timeout 210 python3 -m pytest -q -m gpu -p no:cacheprovider -rs 2>&1 | tee "$out/pytest_gpu.log"

timeout 200 python3 benchmarks/real_size_gpu.py 2>&1 | tee "$out/real_size_gpu.log"
cp benchmarks/results/real_size_gpu.json benchmarks/results/real_size_gpu.md "$out/" 2>/dev/null || true

timeout 120 python3 benchmarks/gradient_pass.py --device cuda --precision bf16-mixed \
  --model ViT-B-32 --batch 512 --model ViT-L-14 --batch 128 --model ViT-H-14 --batch 64 \
  --steps 10 --warmup 3 --out gradient_pass_gpu.json 2>&1 | tee "$out/gradient_pass_gpu.log"
cp benchmarks/results/gradient_pass_gpu.json "$out/" 2>/dev/null || true
