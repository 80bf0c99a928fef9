#!/usr/bin/env bash
# Wheels the GPU machine lacks (its image has torch, lightning, torchmetrics, timm, safetensors,
# transformers, huggingface_hub but not open_clip, webdataset, diffusers or jsonargparse), fetched
# here into .whl/ (git-ignored) so that `run` can carry them: the machine reaches no package index.
# Pure-Python wheels (wcwidth: manylinux), CPython 3.12.
set -euo pipefail
cd "$(dirname "$0")/../.."
exclude="$(git rev-parse --git-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 webdataset==1.0.2 braceexpand==0.1.7 \
  diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 \
  jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0
ls -l .whl
