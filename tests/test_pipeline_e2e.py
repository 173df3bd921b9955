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

    # Issue 17, cases 1, 4, 11: a shard damaged in place stops every stage; deleted, it alone is dumped again,
    # the masks are evaluated again, and the report flags the stage-2 figures trained on the old shard.
    from tests.test_integrity import _damage_label_chunks

    import numpy as np

    shard = run / "pseudo_masks" / "shard-00001-of-00002.h5"
    other = (run / "pseudo_masks" / "shard-00000-of-00002.h5").stat()
    _damage_label_chunks(shard, np.random.default_rng(0), images=2, flips=3)
    for command in (["pseudo-labels", *stage1], ["retrain", *stage1], ["report", *stage1]):
        proc = subprocess.run([sys.executable, "-m", "pipelines", *command], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2 and str(shard) in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    shard.unlink()
    again = _run(["pseudo-labels", *stage1], env)
    assert "dump skipped" not in again.stderr and "training skipped" in again.stderr
    assert (run / "pseudo_masks" / "shard-00000-of-00002.h5").stat().st_mtime_ns == other.st_mtime_ns
    # The dump is deterministic: the shard may come back bit-identical; the figures are stale only if it did not.
    now = {s["file"]: s["sha256"] for s in json.loads((run / "pseudo_masks" / "manifest.json").read_text())["shards"]}
    changed = now != masks["inputs"]["shards"]
    remasks = json.loads((run / "pseudo_masks" / "metrics.json").read_text())
    assert remasks["inputs"]["shards"] == now and (remasks["computed_at"] > masks["computed_at"]) == changed
    _run(["report", *stage1], env)
    prov = json.loads((run / "report" / "metrics.json").read_text())["provenance"]
    assert not prov["pseudo_masks"]["stale"] and prov["stage2"]["stale"] == changed
