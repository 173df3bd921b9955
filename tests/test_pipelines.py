"""`python -m pipelines`: clear errors for missing inputs, config-change guard, status."""

import pytest

from pipelines.__main__ import main
from pipelines.stages import StageError, stage2_config

VOC = "configs/stage1/weclip_vit-b16_voc12aug-320x320_30k.py"
TINY = "configs/stage1/weclip_tiny-clip_synthetic-160x160_300i.py"


def test_pseudo_labels_without_voc_fails_with_the_dataset_message(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("WSSS_DATA_ROOT", str(tmp_path / "nodata"))
    rc = main(["pseudo-labels", "--config", VOC, "--run", "x", "--cfg-options", f"run.root={tmp_path / 'runs'}"])
    assert rc == 2
    err = capfd.readouterr().err
    assert "VOC2012" in err and "JPEGImages" in err and "SegmentationClassAug" in err


def test_retrain_before_pseudo_labels_names_the_missing_step(tmp_path, capfd):
    rc = main(["retrain", "--config", TINY, "--run", "y", "--cfg-options", f"run.root={tmp_path / 'runs'}"])
    assert rc == 2
    assert "make pseudo-labels" in capfd.readouterr().err


def test_changed_config_needs_overwrite(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("WSSS_DATA_ROOT", str(tmp_path / "nodata"))
    base = ["pseudo-labels", "--config", VOC, "--run", "z"]
    main(base + ["--cfg-options", f"run.root={tmp_path / 'runs'}"])  # fails on data, but the run dir exists now
    capfd.readouterr()
    rc = main(base + ["--cfg-options", f"run.root={tmp_path / 'runs'}", "train.lr=0.1"])
    assert rc == 2 and "OVERWRITE=1" in capfd.readouterr().err


def test_status_lists_the_stages(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WSSS_DATA_ROOT", str(tmp_path / "nodata"))
    main(["pseudo-labels", "--config", VOC, "--run", "s", "--cfg-options", f"run.root={tmp_path / 'runs'}"])
    assert main(["status", "--config", VOC, "--run", "s", "--cfg-options", f"run.root={tmp_path / 'runs'}"]) == 0
    out = capsys.readouterr().out
    assert "stage-1 checkpoint: no" in out and "shards: no manifest" in out
    manifest = tmp_path / "runs" / "voc" / "s" / "pseudo_masks" / "manifest.json"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text('{"format": "wsss-pseudo-masks", "shards": [')  # truncated
    assert main(["status", "--config", VOC, "--run", "s", "--cfg-options", f"run.root={tmp_path / 'runs'}"]) == 0
    assert f"{manifest} is unreadable" in capsys.readouterr().out


def test_stage2_config_table():
    assert stage2_config("voc", None).endswith("deeplabv3plus_r101-d8_1xb8-20k_voc12aug-pseudo-512x512.py")
    assert "segformer" in stage2_config("voc", "segformer_mitb2")
    with pytest.raises(StageError, match="valid"):
        stage2_config("voc", "unet")
