#!/usr/bin/env bash
# Fetch, here (PyPI reachable), what a lent GPU machine lacks to run tools/gpu_session.sh: that machine has Python
# 3.12 with torch, torchvision, timm, h5py, scikit-learn, opencv, matplotlib, rich, pyyaml and cython, no package
# index, and none of open_clip_torch, mmengine or pydensecrf2 (/work/.library/device/KINDS.md, 2026-11).
# Stage 2 (mmcv, mmsegmentation) is not needed there: the session measures stage 1.
# Usage: bash tools/gpu_wheels.sh [DIR]   (default .whl, which .git/info/exclude should ignore; about 3.3 MB)
# Then on the lent machine: WHEELS=DIR bash tools/gpu_session.sh OUT   (the call carrying DIR).
set -euo pipefail
DIR=${1:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
PLAT=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform any)
# The project's pins (setup.cfg) and the pure-Python dependencies the image does not have.
"$PY" -m pip download -q --no-deps --only-binary=:all: "${PLAT[@]}" -d "$DIR" \
    open_clip_torch==3.3.0 mmengine==0.10.7 "ftfy>=6.1" wcwidth addict yapf termcolor platformdirs
# pydensecrf2 has no wheel on PyPI: its sdist is built there (cython, setuptools, wheel and a compiler are in the
# image; about 40 s).
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$DIR" pydensecrf2==1.1
ls -1 "$DIR"
