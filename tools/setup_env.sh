#!/usr/bin/env bash
# Create .venv and install the pinned stack (called by `make setup`; idempotent through the Makefile stamp).
#
# mmcv 2.1.0 has no wheel for torch 2.14, and its sdist forces -std=c++17 while torch's headers need C++20.
# We build it once from the PyPI sdist with that flag raised and compiled ops on (CUDA ops when a GPU and
# nvcc are present), and cache the wheel under $WSSS_CACHE (default ~/.cache/wsss-clip), outside the work
# tree, keyed by torch version and accelerator, so later clones install in about a minute.
set -euo pipefail

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
CACHE=${WSSS_CACHE:-$HOME/.cache/wsss-clip}
TORCH_PIN=${TORCH_PIN:-torch==2.14.1}
TORCHVISION_PIN=${TORCHVISION_PIN:-torchvision==0.29.1}
MMCV_VERSION=2.1.0

log() { printf '[setup] %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

if ! "$PY" -c "import torch, torchvision, sys; sys.exit(0 if (torch.__version__.split('+')[0], torchvision.__version__.split('+')[0]) == ('${TORCH_PIN#torch==}', '${TORCHVISION_PIN#torchvision==}') else 1)" 2>/dev/null; then
  log "installing $TORCH_PIN $TORCHVISION_PIN"
  "${PIP[@]}" install -q "$TORCH_PIN" "$TORCHVISION_PIN"
fi

TORCH_TAG=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
if [ "${FORCE_CUDA:-0}" = 1 ] || { command -v nvcc >/dev/null 2>&1 && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; }; then
  ACC=cuda$("$PY" -c "import torch; print(torch.version.cuda or 'unknown')"); export FORCE_CUDA=1
else
  ACC=cpu
fi
WHEELDIR="$CACHE/wheels/mmcv-$MMCV_VERSION-torch$TORCH_TAG-$ACC"
mkdir -p "$WHEELDIR"

if ! ls "$WHEELDIR"/mmcv-"$MMCV_VERSION"-*.whl >/dev/null 2>&1; then
  log "no cached mmcv wheel in $WHEELDIR: building mmcv $MMCV_VERSION from source ($ACC ops; ~12 min on 2 cores)"
  BUILD=$(mktemp -d)
  trap 'rm -rf "$BUILD"' EXIT
  "$PY" - "$BUILD" "$MMCV_VERSION" <<'PYEOF'
import hashlib, json, sys, urllib.request
dest, version = sys.argv[1], sys.argv[2]
req = urllib.request.Request("https://pypi.org/simple/mmcv/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
files = json.load(urllib.request.urlopen(req, timeout=120))["files"]
(entry,) = [f for f in files if f["filename"] == f"mmcv-{version}.tar.gz"]
data = urllib.request.urlopen(entry["url"], timeout=600).read()
if hashlib.sha256(data).hexdigest() != entry["hashes"]["sha256"]:
    sys.exit("mmcv sdist sha256 mismatch")
open(f"{dest}/mmcv.tar.gz", "wb").write(data)
PYEOF
  tar -xzf "$BUILD/mmcv.tar.gz" -C "$BUILD"
  SRC="$BUILD/mmcv-$MMCV_VERSION"
  # torch >= 2.6 headers need C++20; mmcv's setup.py hard-codes -std=c++17.
  sed -i 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"
  grep -q -- '-std=c++20' "$SRC/setup.py" || { log "could not raise the C++ standard in mmcv's setup.py"; exit 1; }
  # mmcv's setup.py imports pkg_resources, which setuptools>=70 dropped.
  "${PIP[@]}" install -q "setuptools<70" wheel ninja
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "${PIP[@]}" wheel --no-build-isolation --no-deps -w "$WHEELDIR" "$SRC"
  log "cached $(ls "$WHEELDIR")"
fi

log "installing the project and its pinned dependencies"
"${PIP[@]}" install -q --find-links "$WHEELDIR" "mmcv==$MMCV_VERSION"
"${PIP[@]}" install -q --find-links "$WHEELDIR" -e ".[dev]"
# mmcv depends on the GUI build opencv-python, which shares the cv2 package with the headless build we pin;
# keep exactly one (headless: no libGL needed on servers).
if "${PIP[@]}" show -q opencv-python >/dev/null 2>&1; then
  "${PIP[@]}" uninstall -q -y opencv-python
  "${PIP[@]}" install -q --force-reinstall --no-deps "$("$PY" -c "from importlib.metadata import version; print('opencv-python-headless==' + version('opencv-python-headless'))")"
fi
"$PY" -c "import mmcv.ops, mmseg.models, open_clip, pydensecrf.densecrf, h5py" \
  || { log "the installed stack does not import; delete $VENV and $WHEELDIR and re-run make setup"; exit 1; }
log "environment ready in $VENV"
