"""`python -m stage1_cam.cams`: CAM shards for a split, resumable, and the evaluation table."""

import json

import numpy as np

from stage1_cam.cams.__main__ import labels_from_cams, main as cams_main
from stage1_cam.io.shards import ShardReader

TINY = "configs/stage1/weclip_tiny-clip_synthetic-160x160_300i.py"


def test_labels_from_cams_background_rules():
    cams = np.zeros((2, 2, 2), np.float32)
    cams[0, 0, 0] = 0.9
    cams[1, 1, 1] = 0.6
    keys = np.array([4, 9])
    assert labels_from_cams(cams, keys, bg="exp", value=1.0).tolist() == [[4, 0], [0, 9]]
    # constant background 0.7 beats the 0.6 of class 9 but not the 0.9 of class 4
    assert labels_from_cams(cams, keys, bg="const", value=0.7).tolist() == [[4, 0], [0, 0]]


def test_cams_entry_point_writes_shards_and_table(synthetic_root, tmp_path, capsys):
    args = [TINY, "--run", "c", "--cfg-options", f"data.root={synthetic_root}", f"run.root={tmp_path}",
            "data.eval_split=val"]
    assert cams_main(args) == 0
    out = tmp_path / "synthetic" / "c" / "cams"
    table = capsys.readouterr().out
    assert "bg=(1-max)^1" in table and "bg=(1-max)^2" in table and "best:" in table
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["table"]) >= {"bg=(1-max)^1", "bg=(1-max)^2", "bg=0.05", "bg=0.6"}
    assert all(v is None or 0.0 <= v <= 1.0 for v in metrics["table"].values())
    reader = ShardReader(out)
    assert len(reader) == 8
    name = reader.ids[0]
    cams, keys = reader.probs(name)
    assert cams.dtype == np.float16 and cams.shape[0] == len(keys) >= 1
    assert cams.min() >= 0 and cams.max() <= 1
    assert set(np.unique(reader.label(name))) <= {0, *keys.tolist()}
    reader.close()
    # Re-running resumes: nothing recomputed, same table.
    mtime = (out / "metrics.json").stat().st_mtime_ns
    assert cams_main(args) == 0
    assert json.loads((out / "metrics.json").read_text())["table"] == metrics["table"]
    assert (out / "metrics.json").stat().st_mtime_ns >= mtime
