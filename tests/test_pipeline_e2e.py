"""End to end on the synthetic set: pseudo-labels -> retrain -> report through `python -m pipelines` (slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = "configs/stage1/weclip_tiny-clip_synthetic-160x160_300i.py"


def _run(args, env):
    proc = subprocess.run([sys.executable, "-m", "pipelines", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.mark.slow
def test_synthetic_pipeline_end_to_end(tmp_path):
    env = {**os.environ, "WSSS_DATA_ROOT": str(tmp_path / "data")}
    stage1 = ["--config", TINY, "--run", "e2e", "--cfg-options", f"run.root={tmp_path / 'runs'}",
              "data.synthetic.num_train=24", "data.synthetic.num_val=8", "train.max_iters=20",
              "train.val_interval=10", "train.val_max_images=4", "train.ckpt_interval=10", "head.rfm.start_step=10",
              "dump.num_shards=2"]
    _run(["pseudo-labels", *stage1], env)
    run = tmp_path / "runs" / "synthetic" / "e2e"
    manifest = json.loads((run / "pseudo_masks" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_images"] == 24 and manifest["num_shards"] == 2
    masks = json.loads((run / "pseudo_masks" / "metrics.json").read_text())
    assert 0.0 <= masks["miou"] <= 1.0
    # A second run does nothing (everything is done for this config).
    again = _run(["pseudo-labels", *stage1], env)
    assert "training skipped" in again.stderr and "dump skipped" in again.stderr

    _run(["retrain", *stage1, "--s2-options", "train_cfg.max_iters=4", "train_cfg.val_interval=4",
          "default_hooks.checkpoint.interval=4"], env)
    s2 = json.loads((run / "stage2" / "metrics.json").read_text())
    assert "single_scale" in s2 or "mIoU" in json.dumps(s2)

    out = _run(["report", *stage1], env)
    index = run / "report" / "index.html"
    assert str(index) in out.stdout
    page = index.read_text()
    assert "data:image/png;base64," in page and "Published anchors" in page
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert metrics["pseudo_masks"]["miou"] == masks["miou"]
    assert (run / "report" / "report.md").is_file()
