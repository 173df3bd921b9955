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
    # Nothing was made with the first config (its start failed): a corrected config is taken without OVERWRITE=1.
    rc = main(base + ["--cfg-options", f"run.root={tmp_path / 'runs'}", "train.lr=0.1"])
    err = capfd.readouterr().err
    assert rc == 2 and "OVERWRITE=1" not in err and "holds no outputs of its earlier config" in err
    ckpt = tmp_path / "runs" / "voc" / "z" / "stage1" / "checkpoints" / "latest.pth"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"made with train.lr=0.1")  # once a stage has an output, a changed config is refused
    rc = main(base + ["--cfg-options", f"run.root={tmp_path / 'runs'}", "train.lr=0.2"])
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


def test_a_stage_command_that_exits_2_is_reported_once(tmp_path, monkeypatch, capfd):
    """A stage command that exits 2 has printed its one-line error: the pipeline exits 2 without adding a second
    line ("command failed ..."); any other failure (a bug's traceback) still gets that line."""
    import sys

    from pipelines import __main__ as pm
    from pipelines.stages import StageReportedError, run_cmd

    def stage(code):
        return [sys.executable, "-c", f"import sys; sys.stderr.write('the stage error\\n'); sys.exit({code})"]

    with pytest.raises(StageReportedError):
        run_cmd(stage(2))
    argv = ["report", "--config", TINY, "--run", "r", "--cfg-options", f"run.root={tmp_path}"]
    for code, extra in ((2, []), (1, ["command failed with exit code 1"])):
        monkeypatch.setitem(pm.COMMANDS, "report", lambda args, code=code: run_cmd(stage(code)))
        capfd.readouterr()
        assert main(argv) == 2
        lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip() and " I " not in ln]
        assert lines[0] == "the stage error" and len(lines) == 1 + len(extra), lines
        assert all(e in lines[1] for e in extra)
