"""`python -m stage1_cam.cams`: CAM shards for a split, resumable, and the evaluation table."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from stage1_cam.cams.__main__ import BG_CONSTANTS, evaluate_cams, labels_from_cams, main as cams_main
from stage1_cam.data.class_names import voc_palette
from stage1_cam.io.shards import ShardMeta, ShardReader, ShardWriter, write_manifest
from tests.shard_data import count_flushes

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
    # CLIP-ES's definitions beside MMSegmentation's, for every background rule of the table
    assert set(metrics["table_gt"]) == set(metrics["table_fwiou"]) == set(metrics["table"])
    assert all(v is None or 0.0 <= v <= 1.0 for k in ("table_gt", "table_fwiou") for v in metrics[k].values())
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


@pytest.mark.parametrize("every", [1, 4])
def test_cams_shard_flushes_at_progress_points(synthetic_root, tmp_path, monkeypatch, every):
    """dump.flush_every sets the CAM shard's progress points too: not a flush per image (8 images here)."""
    calls = count_flushes(monkeypatch)
    args = [TINY, "--run", "c", "--cfg-options", f"data.root={synthetic_root}", f"run.root={tmp_path}",
            "data.eval_split=val", f"dump.flush_every={every}"]
    assert cams_main(args) == 0
    # two flushes per progress point, plus the file's creation and the finish
    assert len(calls) >= 8 if every == 1 else len(calls) <= 2 * 2 + 2, len(calls)
    reader = ShardReader(tmp_path / "synthetic" / "c" / "cams")
    assert len(reader) == 8
    reader.close()


def test_evaluate_cams_records_gt_class_miou_and_fwiou(tmp_path):
    """A predicted class without ground truth (class 2): table (MMSegmentation) counts it as IoU 0, table_gt
    (WeCLIP / CLIP-ES) leaves it out, table_fwiou weighs the classes by their ground-truth pixels."""
    names = ("background", "cat", "dog")
    gt = np.array([[0, 0, 0, 1], [0, 0, 1, 1]], np.uint8)
    cams = np.zeros((2, 2, 4), np.float32)
    cams[0][gt == 1] = 0.9  # class 1 exactly where the ground truth has it
    cams[1, 0, 0] = 0.8  # class 2 above every background rule at one background pixel
    meta = ShardMeta(dataset="synthetic", split="val", class_names=names, palette=voc_palette(256))
    with ShardWriter(tmp_path, 0, 1, meta=meta) as writer:
        writer.write("a", label=gt, confidence=np.ones(gt.shape, np.float32), image_labels=[1, 2],
                     probs=cams.astype(np.float16), prob_keys=[1, 2])
        writer.finalize()
    write_manifest(tmp_path, 1)
    dataset = SimpleNamespace(split="val", num_classes=3, class_names=names, load_gt=lambda name: gt)
    result = evaluate_cams(tmp_path, dataset)
    # Every rule predicts [[2, 0, 0, 1], [0, 0, 1, 1]]: IoU background 4/5 (GT 5, TP 4), cat 3/3, dog 0/1.
    rules = ["bg=(1-max)^1", "bg=(1-max)^2"] + [f"bg={c:g}" for c in BG_CONSTANTS]
    assert list(result["table"]) == list(result["table_gt"]) == list(result["table_fwiou"]) == rules
    for rule in rules:
        assert result["table"][rule] == pytest.approx((4 / 5 + 1 + 0) / 3)
        assert result["table_gt"][rule] == pytest.approx((4 / 5 + 1) / 2)
        assert result["table_fwiou"][rule] == pytest.approx(5 / 8 * 4 / 5 + 3 / 8 * 1)
