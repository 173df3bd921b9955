#!/usr/bin/env bash
# Stage-1 figures on a CUDA machine, in one go (ViT-B/16 shapes, random weights; no data or weights needed):
#   1. the training-step benchmarks of WeCLIP and ExCEL (s/iter, peak GPU memory) for bf16, fp16 and float32 autocast,
#      separately and interleaved (train_heads), and the host<->device synchronisations per step (gpu_check --sync-check);
#   2. GPU vs CPU results of the same head (tools.gpu_check); with WITH_WORLD=1 also on the trained
#      synthetic-world CLIP, whose peaked CAMs are closer to real CLIP's than random weights' near-ties;
#   3. a short real run of the VOC WeCLIP config (python -m stage1_cam.train, then stage1_cam.dump with the
#      CRF and --evaluate, and once without the CRF: the overlapped dump's images/s in dump_summary.json) on a
#      VOC-sized synthetic set: the entry points, logging, checkpoints and the dump's CRF workers on a GPU machine;
#   4. the dump, GradCAM and WeakCLIP benchmarks.
# Usage: bash tools/gpu_session.sh OUT_DIR [TRAIN_ITERS]   (a python with the requirements: $PYTHON or python3)
#   WHEELS=DIR: first install what `bash tools/gpu_wheels.sh DIR` fetched (a lent machine has no package index).
#   ONLY="bench check run more": the parts to run (default all four, in that order), e.g. one part per command
#   where a command's time is limited.
# Results: OUT_DIR/*.json (as `make bench` writes them) and OUT_DIR/gpu_run.tgz (the short run's logs and metrics).
set -uo pipefail
OUT=${1:?usage: gpu_session.sh OUT_DIR [TRAIN_ITERS]}
ITERS=${2:-200}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1
FAILED=()
ONLY=" ${ONLY:-bench check run more} "
part() { [[ "$ONLY" == *" $1 "* ]]; }
for w in $ONLY; do
    case $w in bench|check|run|more) ;; *) echo "ONLY: unknown part '$w'; parts: bench check run more" >&2; exit 2;; esac
done
if [ -n "${WHEELS:-}" ]; then  # into a private folder on the path: the image's packages stay as they are
    SITE=$WORK/site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl || exit 1
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" "$WHEELS"/pydensecrf2-*.tar.gz \
        || exit 1
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
step() {  # run one step; a failure is reported and the later steps still run
    echo "=== $*"
    "$@" || { echo "=== FAILED ($?): $*"; FAILED+=("$1 ${2:-} ${3:-} ${4:-}"); }
}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

part bench && step "$PY" -m tools.bench --only train train_excel train_heads --steps 20 --out "$OUT"
part check && step "$PY" -m tools.gpu_check --sync-check --out "$OUT"
part check && step "$PY" -m tools.gpu_check --out "$OUT"
if part check && [ -n "${WITH_WORLD:-}" ]; then  # the trained synthetic-world CLIP (`make world`; found via $WSSS_CACHE)
    step "$PY" -m tools.gpu_check --model wsss-world-ViT-16 --size 160 --weights world:default \
        --name gpu-consistency-world --out "$OUT"
fi

SYN=$WORK/synthetic
if part run; then
step "$PY" -c "from stage1_cam.data.synthetic import generate_synthetic as g; \
g('$SYN', num_train=64, num_val=16, image_size=(375, 500), seed=0)"
CFG=configs/stage1/weclip_vit-b16_voc12aug-320x320_30k.py
OPTS=(data.dataset=synthetic "data.root=$SYN" data.val_split=val data.eval_split=train_aug
      data.dump_split=train_aug "run.root=$WORK/runs" clip.pretrained=None)
step "$PY" -m stage1_cam.train "$CFG" --run gpu --cfg-options "${OPTS[@]}" train.max_iters="$ITERS" \
    train.log_interval=20 train.ckpt_interval=$((ITERS / 2)) train.val_interval="$ITERS" train.val_max_images=16
step "$PY" -m stage1_cam.dump "$CFG" --run gpu --shard all --num-shards 2 --evaluate --no-progress \
    --cfg-options "${OPTS[@]}"
step "$PY" -m stage1_cam.dump "$CFG" --run gpu --shard all --num-shards 2 --no-progress --out "$WORK/runs/nocrf" \
    --cfg-options "${OPTS[@]}" dump.crf.enabled=False
cp "$WORK/runs/nocrf/dump_summary.json" "$OUT/dump-nocrf-summary.json" 2>/dev/null
tar czf "$OUT/gpu_run.tgz" -C "$WORK/runs" --exclude='*.pth' --exclude='*.h5' .
fi

part more && step "$PY" -m tools.bench --only dump cam train_weakclip --steps 10 --repeats 10 --images 64 --out "$OUT"
rm -rf "$WORK"
if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'failed step: %s\n' "${FAILED[@]}"
    exit 1
fi
