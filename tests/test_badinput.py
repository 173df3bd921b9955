"""Bad input gets one clear error (issue 17, cases 2, 3, 10): exit code 2 and a message naming the file or value.

Every entry point maps user errors through ``stage1_cam.utils.cli.exit_on_user_error``; bugs keep their traceback.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import shutil
from pathlib import Path
from typing import Union, get_args, get_origin, get_type_hints

import numpy as np
import pytest
from PIL import Image

from stage1_cam.config import SECTIONS, ConfigError, all_ranges, head_config_class, load_config
from stage1_cam.utils.cli import BadInputError, UnknownNameError, exit_on_user_error
from stage1_cam.utils.files import disk_full_error
from tests.cli_errors import error_lines

TINY = "configs/stage1/weclip_tiny-clip_synthetic-160x160_300i.py"
VOC = "configs/stage1/weclip_vit-b16_voc12aug-320x320_30k.py"


def _argv(opts: dict) -> list:
    return [f"{k}={v}" for k, v in opts.items()]


# --------------------------------------------------------------------------------------------------- case 3
BAD_VALUES = [
    ("train.max_iters", -5), ("train.max_iters", 0), ("train.batch_size", 0), ("train.lr", 0.0),
    ("train.lr", -1e-3), ("train.lr", float("nan")), ("train.weight_decay", -0.1), ("train.warmup_iters", -1),
    ("train.warmup_ratio", 1.5), ("train.ckpt_interval", 0), ("train.log_interval", 0), ("train.val_interval", -1),
    ("data.crop_size", 0), ("data.scale_range", (0.0, 2.0)), ("data.num_workers", -1),
    ("data.synthetic.num_train", 0), ("data.synthetic.image_size", (16, 160)),
    ("cam.box_threshold", 1.5), ("cam.attn_layers", 0), ("cam.topk", 0.0), ("cam.batch_size", 0),
    ("cam.bg_exponent", 0.0), ("head.dropout", 1.0), ("head.aff_radius", 0), ("head.rfm.layers", 0),
    ("head.rfm.start_step", -1), ("head.embed_dim", 0),
    ("dump.scales", (1.0, -0.5)), ("dump.long_side", 0), ("dump.batch_size", 0), ("dump.ignore_threshold", -0.1),
    ("dump.num_shards", 0), ("dump.crf.iterations", 0), ("dump.crf.bi_rgb_std", 0.0), ("dump.crf.pos_xy_std", -3.0),
    ("dump.crf.bi_w", -1.0), ("dump.crf.workers", -1), ("run.seed", -1),
]


@pytest.mark.parametrize("key,value", BAD_VALUES, ids=lambda v: str(v))
def test_out_of_range_value_is_a_config_error_naming_key_value_and_range(key, value):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, {key: value})
    msg = str(info.value)
    assert TINY in msg and f"{key}={value!r}" in msg and "out of range" in msg and "must be in" in msg, msg
    assert str(all_ranges("weclip")[key]) in msg


BAD_NAMES = [("head.type", "nonexistent", "excel, none, weakclip, weclip"),
             ("cam.source", "nope", "clip_es_gradcam, excel_svc"),
             ("data.dataset", "pascal", "coco, synthetic, voc"), ("train.amp", "fp8", "auto, bf16, fp16, none"),
             ("clip.precision", "fp64", "fp32, fp16, bf16"), ("data.normalization", "none", "imagenet, clip"),
             ("head.rfm.score", "square", "signed, abs")]


@pytest.mark.parametrize("key,value,valid", BAD_NAMES, ids=lambda v: str(v))
def test_unknown_name_is_refused_at_config_load_listing_the_valid_ones(key, value, valid):
    with pytest.raises(ConfigError, match=rf"{key}='{value}' is not valid; valid: {valid}"):
        load_config(TINY, {key: value})


@pytest.mark.parametrize("opts,match", [
    ({"data.scale_range": (2.0, 0.5)}, "low <= high"), ({"dump.scales": ()}, "dump.scales is empty"),
    ({"clip.template": "a photo"}, r"clip.template='a photo' must contain '\{\}'"),
    ({"head.embed_dim": 100, "head.decoder_heads": 8}, "not divisible by head.decoder_heads=8"),
])
def test_inconsistent_values_are_config_errors(opts, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, opts)


def _numeric_keys(schema: type, prefix: str = "") -> list:
    keys = []
    hints = get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            keys += _numeric_keys(tp, key + ".")
            continue
        inner = get_args(tp) if get_origin(tp) in (tuple, Union) else (tp,)  # Tuple[...] / Optional[...]
        if any(t in (int, float) for t in inner):
            keys.append(key)
    return keys


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_numeric_field_has_a_range(section):
    schema = SECTIONS[section]
    assert sorted(schema.RANGES) == sorted(_numeric_keys(schema))


@pytest.mark.parametrize("head", ["weclip", "weakclip", "excel"])
def test_every_numeric_head_field_has_a_range(head):
    schema = head_config_class(head)
    assert sorted(schema.RANGES) == sorted(_numeric_keys(schema))


def test_every_shipped_config_is_in_range():
    for path in sorted(Path("configs/stage1").glob("*.py")):
        load_config(path)  # raises on a value out of range


@pytest.mark.parametrize("option,key", [("train.max_iters=-5", "train.max_iters=-5"),
                                        ("train.batch_size=0", "train.batch_size=0")])
def test_train_main_refuses_a_bad_value_before_making_the_run_dir(option, key, synthetic_root, tmp_path, caplog,
                                                                  capfd):
    from stage1_cam.train import main as train_main

    runs = tmp_path / "runs"
    rc = train_main([TINY, "--run", "r", "--cfg-options", f"data.root={synthetic_root}", f"run.root={runs}", option])
    assert rc == 2
    assert not runs.exists()  # nothing created for a failed start
    (msg,) = error_lines(caplog, capfd)
    assert key in msg and "out of range" in msg and "[1, inf)" in msg


def test_pipelines_head_nonexistent_lists_the_heads_before_anything_is_built(tmp_path, caplog, capfd):
    from pipelines.__main__ import main

    runs = tmp_path / "runs"
    rc = main(["pseudo-labels", "--config", TINY, "--run", "h", "--head", "nonexistent",
               "--cfg-options", f"run.root={runs}"])
    assert rc == 2 and not runs.exists()
    (msg,) = error_lines(caplog, capfd)
    assert "head.type='nonexistent'" in msg and "excel, none, weakclip, weclip" in msg


# --------------------------------------------------------------------------------------------------- case 2
@pytest.fixture()
def bad_gt_root(synthetic_root, tmp_path):
    """A copy of the synthetic set whose first val ground-truth mask holds the id 50 (aug masks untouched)."""
    root = tmp_path / "synthetic"
    shutil.copytree(synthetic_root, root)
    name = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    path = root / "SegmentationClass" / f"{name}.png"
    with Image.open(path) as im:
        mask = np.array(im)
        palette = im.getpalette()
    mask[:3, :3] = 50
    out = Image.fromarray(mask)
    out.putpalette(palette)
    out.save(path)
    return root, name, path


def test_ground_truth_out_of_label_space_names_file_and_value(bad_gt_root):
    from stage1_cam.data import SegDataset

    root, name, path = bad_gt_root
    ds = SegDataset(root=root, dataset="synthetic", split="val")  # labels come from the (valid) aug masks
    with pytest.raises(BadInputError, match=rf"{path}.*\[50\]"):
        ds.load_gt(name)
    with pytest.raises(BadInputError, match=r"\[50\]"):  # training validation reads items
        ds[ds.names.index(name)]
    other = next(n for n in ds.names if n != name)
    assert ds.load_gt(other) is not None  # 255 (ignore) and class ids stay valid


def test_dump_evaluate_refuses_bad_ground_truth(bad_gt_root, tmp_path, caplog, capfd):
    from stage1_cam import dump as dump_mod
    from stage1_cam.data import SegDataset, voc_palette
    from stage1_cam.io.shards import ShardMeta, ShardWriter

    root, name, path = bad_gt_root
    ds = SegDataset(root=root, dataset="synthetic", split="val")
    out = tmp_path / "shards"
    meta = ShardMeta(dataset="synthetic", split="val", class_names=ds.class_names, palette=voc_palette(256))
    with ShardWriter(out, 0, 1, meta=meta) as w:
        for n in ds.names:
            gt = ds.load_gt(n) if n != name else np.zeros((96, 128), np.uint8)
            label = np.where(gt == 255, 0, gt).astype(np.uint8)
            w.write(n, label=label, confidence=np.ones(label.shape, np.float32),
                    image_labels=ds.image_labels(n).tolist())
        w.finalize()
    opts = {"data.root": str(root), "data.eval_split": "val", "dump.num_shards": 1, "run.root": str(tmp_path)}
    assert dump_mod.main([TINY, "--evaluate", "--out", str(out), "--cfg-options", *_argv(opts)]) == 2
    (msg,) = error_lines(caplog, capfd)
    assert str(path) in msg and "[50]" in msg
    assert not (out / "metrics.json").exists()


def test_cams_entry_point_refuses_bad_ground_truth(bad_gt_root, tmp_path, caplog, capfd):
    from stage1_cam.cams.__main__ import main as cams_main

    root, _, path = bad_gt_root
    rc = cams_main([TINY, "--run", "c", "--cfg-options", f"data.root={root}", f"run.root={tmp_path / 'runs'}",
                    "data.eval_split=val"])
    assert rc == 2
    (msg,) = error_lines(caplog, capfd)
    assert str(path) in msg and "[50]" in msg


# -------------------------------------------------------------------------------------------------- case 10
@pytest.mark.parametrize("kind,match", [("empty", "is empty"), ("text", "is not a PyTorch checkpoint"),
                                        ("truncated", "could not read CLIP weights .* truncated or damaged")])
def test_unusable_weights_file_is_named(kind, match, tmp_path, tiny_clip):
    import io

    import torch

    from stage1_cam.models.pretrained import load_clip

    path = tmp_path / "weights.pt"
    if kind == "truncated":  # an interrupted copy of a real state dict
        buf = io.BytesIO()
        torch.save(tiny_clip.state_dict(), buf)
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    else:
        path.write_bytes(b"" if kind == "empty" else b"101\n102\n")
    with pytest.raises(BadInputError, match=rf"{match}") as info:
        load_clip("wsss-tiny-ViT-16", pretrained=None, weights=str(path))
    assert str(path) in str(info.value)
    assert "do not fit" not in str(info.value)


def test_weights_of_another_model_do_not_fit(tmp_path, tiny_clip):
    import torch

    from stage1_cam.models.pretrained import load_clip

    path = tmp_path / "other.pt"
    state = tiny_clip.state_dict()
    state.pop("logit_scale")
    torch.save(state, path)
    with pytest.raises(BadInputError, match=rf"{path} do not fit model 'wsss-tiny-ViT-16'"):
        load_clip("wsss-tiny-ViT-16", pretrained=None, weights=str(path))


@pytest.mark.parametrize("content,expected", [(b"", "is empty"),
                                              (b"not a checkpoint\n" * 4, "is not a PyTorch checkpoint")])
def test_unusable_weights_file_exits_2_from_train(synthetic_root, tmp_path, caplog, capfd, content, expected):
    from stage1_cam.train import main as train_main

    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    rc = train_main([TINY, "--run", "w", "--cfg-options", f"data.root={synthetic_root}",
                     f"run.root={tmp_path / 'runs'}", f"clip.weights={path}"])
    assert rc == 2
    (msg,) = error_lines(caplog, capfd)
    assert str(path) in msg and expected in msg


def _refuse_mkdir_under(monkeypatch, root, error, code, text):
    """Path.mkdir under ``root`` raises ``error(code, text)`` (a read-only or forbidden folder, simulated: the tests
    may run as root, who may write anywhere)."""
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if str(self).startswith(str(root)):
            raise error(code, text, str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)


def test_unwritable_run_dir_exits_2_naming_it(synthetic_root, tmp_path, caplog, capfd, monkeypatch):
    """A read-only run folder (simulated: the tests may run as root, who may write anywhere)."""
    from stage1_cam.train import main as train_main

    runs = tmp_path / "runs"
    _refuse_mkdir_under(monkeypatch, runs, PermissionError, errno.EACCES, "Permission denied")
    rc = train_main([TINY, "--run", "ro", "--cfg-options", f"data.root={synthetic_root}", f"run.root={runs}"])
    assert rc == 2
    msgs = error_lines(caplog, capfd)
    assert len(msgs) == 1 and str(runs) in msgs[0] and "Permission denied" in msgs[0] and "run.root" in msgs[0]


def test_read_only_data_root_exits_2(tmp_path, caplog, capfd, monkeypatch):
    from stage1_cam.data.__main__ import main as data_main

    root = tmp_path / "ro"
    _refuse_mkdir_under(monkeypatch, root, OSError, errno.EROFS, "Read-only file system")
    assert data_main(["--dataset", "synthetic", "--root", str(root)]) == 2
    (msg,) = error_lines(caplog, capfd)
    assert str(root) in msg and "read-only" in msg.lower()


def test_retrain_refuses_stage1_options_it_would_ignore(tmp_path, monkeypatch, caplog, capfd):
    from pipelines.__main__ import main

    monkeypatch.setenv("WSSS_DATA_ROOT", str(tmp_path / "nodata"))
    runs = f"run.root={tmp_path / 'runs'}"
    main(["pseudo-labels", "--config", VOC, "--run", "o", "--cfg-options", runs])  # fails on data; run dir made
    caplog.clear()
    capfd.readouterr()
    assert main(["retrain", "--config", VOC, "--run", "o", "--cfg-options", runs, "train.lr=0.1"]) == 2
    (msg,) = error_lines(caplog, capfd)
    assert "train.lr=0.1" in msg and "config.py" in msg and "S2_OPTIONS" in msg and "pseudo-labels" in msg
    caplog.clear()
    capfd.readouterr()
    # The options the run was made with are fine (make demo passes OPTIONS to every target): the next error is
    # the real one, the missing pseudo-masks.
    assert main(["retrain", "--config", VOC, "--run", "o", "--cfg-options", runs]) == 2
    (msg,) = error_lines(caplog, capfd)
    assert "manifest" in msg and "OPTIONS" not in msg


# ------------------------------------------------------------------------------------------ the one mapping
def test_mapping_user_errors_and_bugs(caplog, capfd):
    log = logging.getLogger("stage1_cam.test")
    assert exit_on_user_error(OSError(errno.ENOSPC, "No space left on device", "/runs/x/shard.h5"), log) == 2
    assert exit_on_user_error(UnknownNameError("unknown dataset 'x'; valid: voc"), log) == 2
    own = disk_full_error("/", needed=2 ** 60, what="shard 0/4", fix="write the shards elsewhere (--out DIR)")
    assert exit_on_user_error(own, log) == 2
    msgs = error_lines(caplog, capfd)
    assert msgs[0].startswith("/runs/x/shard.h5: No space left on device; free disk space")
    assert msgs[1] == "unknown dataset 'x'; valid: voc"
    assert msgs[2] == str(own)  # our own message as it is: the generic fix is not appended a second time
    for bug in (ValueError("shapes differ"), KeyError("k"), ZeroDivisionError(), OSError(errno.EIO, "I/O error")):
        with pytest.raises(type(bug)):
            exit_on_user_error(bug, log)


def test_stage2_test_refuses_bad_ground_truth(bad_gt_root, tmp_path, caplog, capfd):
    pytest.importorskip("mmseg")
    import torch
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    import stage2_seg  # noqa: F401  (registers the mmseg plug-ins)
    from stage2_seg.test import main as test_main

    root, name, _ = bad_gt_root
    aug = root / "SegmentationClassAug" / f"{name}.png"  # stage 2 reads the aug masks first
    shutil.copy(root / "SegmentationClass" / f"{name}.png", aug)
    config = Path("configs/stage2/fcn_r18-c16-d8_1xb8-800i_synthetic-pseudo-128x128.py")
    init_default_scope("mmseg")
    cfg = Config.fromfile(str(config))
    model = MODELS.build(cfg.model)
    ckpt = tmp_path / "random.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {"iter": 0}}, ckpt)
    assert test_main([str(config), str(ckpt), "--data-root", str(root), "--device", "cpu"]) == 2
    (msg,) = error_lines(caplog, capfd)
    assert str(aug) in msg and "[50]" in msg
    assert not (tmp_path / "metrics.json").exists()
