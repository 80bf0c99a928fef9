#!/usr/bin/env bash
# Wheels the GPU machine lacks (its image has torch, lightning, torchmetrics, timm, safetensors,
# transformers but not open_clip or webdataset), fetched here into .whl/ (git-ignored) so that
# `run` can carry them: the machine reaches no package index. Pure-Python wheels, CPython 3.12.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 webdataset==1.0.2 braceexpand==0.1.7
ls -l .whl
