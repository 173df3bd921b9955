"""The run report: markdown, JSON and a self-contained HTML page whose figures load in a real browser."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from pipelines.report import ANCHORS, build_report
from stage1_cam.config import default_config
from stage1_cam.data import build_dataset
from stage1_cam.data.class_names import voc_palette
from stage1_cam.dump import evaluate_shards
from stage1_cam.io.shards import ShardMeta, ShardWriter, write_manifest
from stage1_cam.utils.run_dir import RunDir


def _make_run(tmp_path, synthetic_root):
    """A run directory whose pseudo-masks are the ground truth with one class knocked out (real metrics)."""
    cfg = default_config({"data.root": str(synthetic_root), "run.root": str(tmp_path / "runs"), "run.name": "r",
                          "clip.model_name": "wsss-tiny-ViT-16", "clip.pretrained": None})
    run = RunDir.from_config(cfg).prepare(cfg)
    ds = build_dataset("synthetic", str(synthetic_root), cfg.data.dump_split)
    meta = ShardMeta(dataset="synthetic", split=ds.split, class_names=ds.class_names, palette=voc_palette(256),
                     config_hash="x")
    with ShardWriter(run.shard_dir, 0, 1, meta=meta) as w:
        for name in ds.names:
            gt = ds.load_gt(name).copy()
            gt[gt == ds.image_labels(name)[0]] = 0
            w.write(name, label=gt, confidence=np.ones(gt.shape, np.float32), image_labels=ds.image_labels(name))
        w.finalize()
    write_manifest(run.shard_dir, 1)
    metrics = evaluate_shards(run.shard_dir, ds)
    (run.shard_dir / "metrics.json").write_text(json.dumps(metrics))
    return cfg, run, metrics


def test_report_files_and_content(tmp_path, synthetic_root):
    cfg, run, metrics = _make_run(tmp_path, synthetic_root)
    (run.path / "stage1").mkdir(exist_ok=True)
    last_val = {"step": 300, "pseudo_miou": 0.6187, "decoder_miou": 0.4125, "pseudo_no_rfm_miou": 0.6074, "images": 60,
                "pseudo_miou_gt": 0.6402}
    (run.path / "stage1" / "val_metrics.jsonl").write_text(json.dumps(last_val) + "\n")
    index = build_report(cfg, run)
    out = run.report_dir
    assert index == out / "index.html"
    data = json.loads((out / "metrics.json").read_text())
    assert data["pseudo_masks"]["miou"] == pytest.approx(metrics["miou"])
    assert data["config_hash"] and data["env"]["packages"]["torch"]
    md = (out / "report.md").read_text()
    assert f"{100 * metrics['miou']:.1f}" in md
    # both mIoU definitions, labelled, and which one the papers use
    assert "| what | split | mIoU | mIoU, GT classes only | fwIoU |" in md and "WeCLIP and CLIP-ES evaluation" in md
    assert "| online pseudo label (CAM+RFM+PAR), last validation | val | 61.9 | 64.0 | n/a |" in md
    assert "| online pseudo label without RFM (same decoder; ablation) | val | 60.7 | n/a | n/a |" in md
    final = metrics["final"]
    assert (f"| {100 * final['miou']:.1f} | {100 * final['miou_gt']:.1f} | {100 * final['fwiou']:.1f} |") in md
    assert "CLIP `wsss-tiny-ViT-16` (random init)" in md
    for a in ANCHORS:
        assert a["protocol"] in md
    for fig in ("confusion.png", "per_class_iou.png", "overlays.png"):
        assert (out / fig).stat().st_size > 1000
    page = index.read_text()
    assert page.count("data:image/png;base64,") == 3 and "http://" not in page and "https://" not in page


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path, synthetic_root):
    if _chromium() is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
            subprocess.run(cmd, capture_output=True, timeout=900, env=env)
    browser = _chromium()
    if browser is None:
        pytest.skip("Debian chromium is not installed and could not be installed (needs root and the Debian mirror)")
    cfg, run, _ = _make_run(tmp_path, synthetic_root)
    index = build_report(cfg, run)
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1200,3000"]
    dom = subprocess.run(flags + ["--dump-dom", index.as_uri()], capture_output=True, text=True, timeout=120)
    assert 'data-images-loaded="3/3"' in dom.stdout, dom.stderr[-2000:]
    shot = run.report_dir / "screenshot.png"
    subprocess.run(flags + [f"--screenshot={shot}", index.as_uri()], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10000


def test_report_names_where_the_clip_weights_came_from():
    from pipelines.report import _clip_weights

    assert _clip_weights(default_config({"clip.pretrained": None})) == "random init"
    assert _clip_weights(default_config({"clip.pretrained": "openai"})) == "pretrained `openai`"
    world = default_config({"clip.model_name": "wsss-world-ViT-16", "clip.pretrained": None,
                            "clip.weights": "world:default"})
    assert _clip_weights(world) == "weights `world:default`"


def test_report_flags_figures_whose_shards_changed(tmp_path, synthetic_root):
    """Issue 17 case 11: each figure says when and from which shards it was computed; stale ones are flagged."""
    from stage1_cam.io.shards import shard_filename

    cfg, run, metrics = _make_run(tmp_path, synthetic_root)
    manifest = json.loads((run.shard_dir / "manifest.json").read_text())
    run.stage2_dir.mkdir(parents=True, exist_ok=True)
    (run.stage2_dir / "inputs.json").write_text(json.dumps({"shards": metrics["inputs"]["shards"]}))
    (run.stage2_dir / "metrics.json").write_text(json.dumps(
        {"checkpoint": "/x/iter_800.pth", "checkpoint_sha256": "ab" * 32, "computed_at": "2026-12-07T10:00:00Z",
         "single_scale": {"mIoU": 0.5, "per_class_iou": {}}}))
    build_report(cfg, run)
    md = (run.report_dir / "report.md").read_text()
    rows = {r.split(" | ")[0].lstrip("| "): r for r in md.splitlines() if r.startswith("| ")}
    sha = manifest["shards"][0]["sha256"]
    assert metrics["computed_at"] in rows["pseudo-mask metrics"] and sha[:8] in rows["pseudo-mask metrics"]
    assert rows["pseudo-mask metrics"].endswith("| current |")
    assert "iter_800.pth (sha256 abababab)" in rows["retrained model (stage 2)"]
    assert rows["retrained model (stage 2)"].endswith("| current |") and "STALE" not in md

    # The shard is re-dumped with other masks (e.g. after a damaged one was deleted): both figures are stale.
    shard = run.shard_dir / shard_filename(0, 1)
    shard.unlink()
    ds = build_dataset("synthetic", str(synthetic_root), cfg.data.dump_split)
    meta = ShardMeta(dataset="synthetic", split=ds.split, class_names=ds.class_names, palette=voc_palette(256),
                     config_hash="x")
    with ShardWriter(run.shard_dir, 0, 1, meta=meta) as w:
        for name in ds.names:
            gt = ds.load_gt(name)
            w.write(name, label=gt, confidence=np.ones(gt.shape, np.float32), image_labels=ds.image_labels(name))
        w.finalize()
    write_manifest(run.shard_dir, 1)
    build_report(cfg, run)
    md = (run.report_dir / "report.md").read_text()
    rows = {r.split(" | ")[0].lstrip("| "): r for r in md.splitlines() if r.startswith("| ")}
    for figure in ("pseudo-mask metrics", "retrained model (stage 2)"):
        assert f"STALE: inputs changed since ({shard.name} re-dumped or modified)" in rows[figure]
    assert any(k.startswith("dumped masks as written") and "STALE" in k for k in rows)
    assert any(k.startswith("retrained, single scale") and "STALE" in k for k in rows)
    data = json.loads((run.report_dir / "metrics.json").read_text())
    assert data["provenance"]["pseudo_masks"]["stale"] and data["provenance"]["stage2"]["stale"]
    assert "STALE" in (run.report_dir / "index.html").read_text()
