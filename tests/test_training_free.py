"""Training-free pseudo-masks (``head.type="none"``, ``python -m stage1_cam.dump --training-free``): the refined
initial CAMs written as the dump's shards; the same labels as ``python -m stage1_cam.cams``; resumable; readable by
stage 2; ``pipelines --head none`` skips training (local and SLURM); the report names them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from stage1_cam import dump as dump_mod
from stage1_cam.cams.initial import with_background
from stage1_cam.config import ConfigError, load_config, with_head
from stage1_cam.io import ShardReader, shard_filename
from tests.numerics import f16_sum_to_one_atol, one_torch_thread
from tests.shard_data import interrupt_then_resume

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/stage1/weclip_tiny-clip_synthetic-160x160_300i.py")


_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)  # the CRF worker needs the other core


def _opts(root: Path, runs: Path, **extra) -> list:
    opts = {"data.root": str(root), "run.root": str(runs), "dump.num_shards": 2, "dump.save_probs": True,
            "dump.crf.workers": 1, **extra}
    return ["--cfg-options"] + [f"{k}={v}" for k, v in opts.items()]


def _contents(shard_dir: Path) -> dict:
    with ShardReader(shard_dir, allow_incomplete=True) as r:
        return {n: r.read(n) for n in r.ids}


@pytest.fixture(scope="module")
def free(synthetic_root, tmp_path_factory):
    """Training-free shards of the synthetic train_aug split (PAR on, CRF on: the defaults) and their metrics."""
    runs = tmp_path_factory.mktemp("runs")
    argv = [TINY, "--training-free", "--no-progress", "--shard", "all", "--evaluate"] + _opts(synthetic_root, runs)
    assert dump_mod.main(argv) == 0
    return {"dir": runs / "synthetic" / "demo" / "training_free", "runs": runs, "root": synthetic_root}


def test_head_none_replaces_the_head_section():
    with pytest.raises(ConfigError, match="head"):  # head.type=none as an override keeps WeCLIP's keys
        load_config(TINY, {"head.type": "none"})
    cfg = load_config(TINY)
    free = with_head(cfg, {"type": "none"})
    assert dict(free.head) == {"type": "none"} and free.dump == cfg.dump and free.cam == cfg.cam


def test_shards_say_training_free_and_hold_allowed_labels(free):
    manifest = json.loads((free["dir"] / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_images"] == 16 and manifest["checkpoint_hash"] == ""
    extra = manifest["extra"]
    assert extra["training_free"] and extra["cam"]["source"] == "clip_es_gradcam" and extra["cam"]["par"]
    assert extra["crf"]["iterations"] == 10 and "long_side" not in extra and extra["input"] == "clip-es"
    metrics = json.loads((free["dir"] / "metrics.json").read_text())
    assert metrics["images"] == 16 and 0.0 <= metrics["miou"] <= 1.0 and "no_crf" in metrics
    from stage1_cam.data import build_dataset

    ds = build_dataset("synthetic", str(free["root"]), "train_aug")
    for name, item in _contents(free["dir"]).items():
        allowed = {0, *ds.image_labels(name).tolist()}
        assert set(np.unique(item["label"]).tolist()) <= allowed, name
        assert item["label"].shape == ds.load_image(name).shape[:2]
        probs, keys = item["probs"]
        assert keys.tolist() == sorted(allowed) and probs.dtype == np.float16
        # full / full.sum in float32 (a K-term sum and a division), then stored in float16
        k = len(keys)
        np.testing.assert_allclose(probs.astype(np.float64).sum(0), 1.0, rtol=0, atol=f16_sum_to_one_atol(k, k + 1))


def test_labels_equal_the_initial_cam_labels(synthetic_root, tmp_path):
    """Without PAR and CRF the masks are the labels `python -m stage1_cam.cams` stores for the same images (same
    refinement), except where two scores tie within the float16 rounding of the stored probabilities."""
    from stage1_cam.cams.__main__ import main as cams_main

    runs = tmp_path / "runs"
    extra = {"cam.par": False, "dump.crf.enabled": False}
    assert cams_main([TINY, "--run", "c"] + _opts(synthetic_root, runs, **extra)) == 0
    out = tmp_path / "free"
    assert dump_mod.main([TINY, "--run", "c", "--training-free", "--no-progress", "--out", str(out)]
                         + _opts(synthetic_root, runs, **extra)) == 0
    cams, free = _contents(runs / "synthetic" / "c" / "cams"), _contents(out)
    assert sorted(cams) == sorted(free) and len(cams) == 16
    ties = 0
    for name, item in cams.items():
        maps, keys = item["probs"]
        scores = np.sort(with_background(maps.astype(np.float32), 1.0), axis=0)
        near_tie = scores[-1] - scores[-2] < 1e-3
        differ = item["label"] != free[name]["label"]
        assert not (differ & ~near_tie).any(), name
        ties += int(differ.sum())
        assert free[name]["probs"][1].tolist() == [0, *keys.tolist()]
    assert ties <= 200  # of 16 x 96 x 128 pixels (60 here)


def test_interrupted_shard_resumes_to_identical_content(free, tmp_path, monkeypatch):
    out = tmp_path / "masks"
    argv = [TINY, "--training-free", "--shard", "0", "--out", str(out), "--no-progress"]
    argv += _opts(free["root"], free["runs"])
    interrupt_then_resume(dump_mod.main, argv, out, monkeypatch, after=4, shard=shard_filename(0, 2))
    reference = _contents(free["dir"])
    got = _contents(out)
    assert len(got) == 8
    for name, item in got.items():
        for key in ("label", "confidence", "image_labels"):
            np.testing.assert_array_equal(item[key], reference[name][key], err_msg=name)
        np.testing.assert_array_equal(item["probs"][0], reference[name]["probs"][0], err_msg=name)


def test_shards_are_readable_by_stage_2(free):
    pytest.importorskip("mmseg")
    from mmengine.registry import init_default_scope

    import stage2_seg  # noqa: F401  (registers the mmseg plug-ins)
    from stage2_seg.datasets import PseudoMaskSegDataset

    init_default_scope("mmseg")
    ds = PseudoMaskSegDataset(shard_dir=str(free["dir"]), data_root=str(free["root"]), class_set="synthetic",
                              pipeline=[dict(type="LoadImageFromFile"), dict(type="LoadPseudoMaskFromShards")])
    assert len(ds) == 16
    with ShardReader(free["dir"]) as r:
        for idx in (0, len(ds) - 1):
            item = ds[idx]
            np.testing.assert_array_equal(item["gt_seg_map"], r.label(item["sample_id"]))


def test_bad_combinations_exit_2(free, tmp_path):
    from stage1_cam.train import main as train_main

    argv = _opts(free["root"], tmp_path / "runs")
    assert dump_mod.main([TINY, "--training-free", "--checkpoint", "x.pth", "--no-progress"] + argv) == 2
    assert train_main([TINY, "--cfg-options", *argv[1:], "train.max_iters=1", "head.type=none"]) == 2


def test_report_labels_training_free_rows():
    from pipelines.report import _quality_rows

    pm = {"split": "train", "dump_settings": {"training_free": True, "crf": {"iterations": 10},
                                              "cam": {"source": "excel_svc", "par": True}},
          "final": {"miou": 0.5}, "no_crf": {"miou": 0.4}, "final_confident": {"miou": 0.5}}
    rows = [r[0] for r in _quality_rows({"pseudo_masks": pm})]
    assert rows == ["training-free pseudo-masks (excel_svc+PAR), before CRF",
                    "training-free pseudo-masks as written (excel_svc+PAR+CRF)",
                    "training-free pseudo-masks, confident pixels only"]
    pm["dump_settings"] = {"crf": None}
    assert [r[0] for r in _quality_rows({"pseudo_masks": pm})][1] == "dumped masks as written (msc+flip)"


# ------------------------------------------------------------------------------------------------ pipelines
@pytest.mark.slow  # the whole pipeline twice and the report (about 20 s)
def test_pipelines_head_none_end_to_end(tmp_path, monkeypatch, capfd):
    """`make pseudo-labels HEAD=none` then `make report`: no training, the training-free writer, the evaluation;
    a second run skips everything."""
    from pipelines.__main__ import main

    monkeypatch.setenv("WSSS_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.delenv("WSSS_RUN_LOCK", raising=False)
    common = ["--config", TINY, "--run", "free", "--cfg-options", f"run.root={tmp_path / 'runs'}",
              "data.synthetic.num_train=12", "data.synthetic.num_val=4", "dump.num_shards=2", "dump.crf.workers=1"]
    assert main(["pseudo-labels", "--head", "none", *common]) == 0
    run = tmp_path / "runs" / "synthetic" / "free"
    assert dict(load_config(run / "config.py").head) == {"type": "none"}
    assert not (run / "stage1" / "checkpoints").exists() and not (run / "cams").exists()
    manifest = json.loads((run / "pseudo_masks" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_images"] == 12 and manifest["extra"]["training_free"]
    assert 0.0 <= json.loads((run / "pseudo_masks" / "metrics.json").read_text())["miou"] <= 1.0
    costs = json.loads((run / "stage_costs.json").read_text())
    assert list(costs) == ["training-free pseudo-masks"]
    capfd.readouterr()
    assert main(["pseudo-labels", "--head", "none", *common]) == 0
    assert "training-free pseudo-masks skipped" in capfd.readouterr().err
    assert main(["report", *common]) == 0
    report = (run / "report" / "report.md").read_text()
    assert "training-free pseudo-masks as written (clip_es_gradcam+PAR+CRF)" in report and "head `none`" in report


def test_slurm_head_none_submits_no_training(tmp_path, monkeypatch):
    from pipelines.__main__ import main
    from pipelines.slurm import load_jobs
    from tests.test_slurm import _fake_slurm

    log = _fake_slurm(tmp_path / "bin", state="COMPLETED")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("WSSS_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.delenv("WSSS_RUN_LOCK", raising=False)
    assert main(["pseudo-labels", "--head", "none", "--scheduler", "slurm", "--config", TINY, "--run", "s",
                 "--cfg-options", f"run.root={tmp_path / 'runs'}", "data.synthetic.num_train=4",
                 "data.synthetic.num_val=2", "dump.num_shards=3"]) == 0
    run = tmp_path / "runs" / "synthetic" / "s"
    jobs = load_jobs(run / "slurm" / "jobs.json")
    assert list(jobs) == ["dump", "pseudo-labels"] and jobs["dump"]["array"] == "0-2"
    script = (run / "slurm" / "dump.sbatch").read_text()
    assert "-m stage1_cam.dump" in script and "--checkpoint" not in script and "training-free" in script
    assert "--dependency=afterok:101" in log.read_text().splitlines()[1]  # pseudo-labels after the dump array
