"""Stage-1 configs: every file loads and validates, unknown keys are errors, hashes are stable."""

from pathlib import Path

import pytest

from stage1_cam.config import ConfigError, config_hash, default_config, load_config

CONFIGS = sorted(p for p in Path("configs/stage1").glob("*.py"))


def test_there_are_leaf_configs():
    names = {p.name for p in CONFIGS}
    assert "weclip_vit-b16_voc12aug-320x320_30k.py" in names
    assert "weclip_tiny-clip_synthetic-160x160_300i.py" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_stage1_config_loads(path):
    cfg = load_config(path)
    assert cfg.data.dataset in ("voc", "coco", "synthetic")
    assert cfg.head.type in ("weclip", "weakclip", "excel")
    assert len(config_hash(cfg)) == 12


def test_voc_config_matches_reference_settings():
    cfg = load_config("configs/stage1/weclip_vit-b16_voc12aug-320x320_30k.py")
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_iters, cfg.train.max_iters) == \
        (2e-3, 0.01, 50, 30000)
    assert (cfg.train.batch_size, cfg.data.crop_size, tuple(cfg.data.scale_range)) == (4, 320, (0.5, 2.0))
    assert cfg.data.normalization == "imagenet" and cfg.clip.template == "a clean origami {}."
    assert (cfg.cam.box_threshold, cfg.cam.attn_layers, cfg.head.rfm.layers, cfg.head.rfm.score) == \
        (0.4, 8, 6, "signed")
    assert tuple(cfg.dump.scales) == (1.0, 0.75) and cfg.dump.long_side == 512
    crf = cfg.dump.crf
    assert (crf.iterations, crf.pos_xy_std, crf.pos_w, crf.bi_xy_std, crf.bi_rgb_std, crf.bi_w) == (10, 3, 3, 64, 5, 4)
    # reference_spec 1.6-1.11: schedule shape, loss weights, decoder, RFM start (the documented step; 9144 is the
    # reference's effective one, 7.1 item 2), validation on VOC train every 2000 steps, seed 1
    assert (cfg.train.warmup_ratio, cfg.train.power, cfg.cam.bg_exponent, cfg.cam.par) == (1e-6, 1.0, 1.0, True)
    h = cfg.head
    assert (h.aff_loss_weight, h.aff_radius, h.dropout, h.embed_dim, h.decoder_layers, h.decoder_heads) == \
        (0.1, 8, 0.1, 256, 3, 8)
    assert (h.rfm.enabled, h.rfm.start_step) == (True, 15000)
    assert (cfg.data.train_split, cfg.data.val_split, cfg.train.val_interval, cfg.run.seed) == \
        ("train_aug", "train", 2000, 1)


def test_coco_config_matches_reference_settings():
    """reference_spec 1.12: COCO differs from VOC in the box threshold, the RFM layers and start, the length,
    validation (off) and the checkpoint interval; the rest is VOC's."""
    voc = load_config("configs/stage1/weclip_vit-b16_voc12aug-320x320_30k.py")
    cfg = load_config("configs/stage1/weclip_vit-b16_coco14-320x320_80k.py")
    assert (cfg.data.dataset, cfg.data.train_split, cfg.cam.box_threshold) == ("coco", "train", 0.7)
    assert (cfg.head.rfm.layers, cfg.head.rfm.start_step, cfg.head.rfm.score) == (10, 40000, "signed")
    assert (cfg.train.max_iters, cfg.train.val_interval, cfg.train.ckpt_interval) == (80000, 0, 10000)
    for section, keys in {"train": ("lr", "weight_decay", "warmup_iters", "warmup_ratio", "power", "batch_size"),
                          "data": ("crop_size", "scale_range", "normalization"),
                          "cam": ("source", "attn_layers", "bg_exponent", "par"),
                          "head": ("aff_loss_weight", "aff_radius", "dropout", "embed_dim", "decoder_layers",
                                   "decoder_heads")}.items():
        for k in keys:
            assert cfg[section][k] == voc[section][k], f"{section}.{k}"


def test_unknown_key_is_an_error_naming_the_file(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("train = dict(max_iter=5)\n")
    with pytest.raises(ConfigError, match=r"bad.py.*train\.max_iter.*valid keys under train.*max_iters"):
        load_config(f)


def test_unknown_override_is_an_error():
    with pytest.raises(ConfigError, match="head.rfm.start"):
        load_config("configs/stage1/weclip_tiny-clip_synthetic-160x160_300i.py", {"head.rfm.start": 3})


def test_wrong_type_is_an_error(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("train = dict(max_iters='many')\n")
    with pytest.raises(ConfigError, match="max_iters: expected an integer"):
        load_config(f)


def test_missing_file_message():
    with pytest.raises(FileNotFoundError, match="configs/stage1"):
        load_config("configs/stage1/nope.py")


def test_hash_ignores_run_name_but_not_settings():
    a = default_config()
    b = default_config()
    b.run.name = "other"
    assert config_hash(a) == config_hash(b)
    b.train.lr = 1e-3
    assert config_hash(a) != config_hash(b)


def test_defaults_filled_and_inheritance(tmp_path):
    base = tmp_path / "base.py"
    base.write_text("train = dict(max_iters=10)\n")
    leaf = tmp_path / "leaf.py"
    leaf.write_text("_base_ = ['./base.py']\ntrain = dict(batch_size=2)\n")
    cfg = load_config(leaf)
    assert (cfg.train.max_iters, cfg.train.batch_size, cfg.train.lr) == (10, 2, 2e-3)


def test_hash_follows_the_content_of_the_tse_descriptions_file(tmp_path):
    """cam.descriptors names a file whose content decides the CAMs: editing it in place changes the CAM stage's
    hash (outputs made with the old text are stale), moving it unchanged does not."""
    from stage1_cam.config import config_hash
    from stage1_cam.utils.run_dir import stage_hash

    desc = tmp_path / "d.json"
    desc.write_text('{"aeroplane": ["a clean origami aeroplane. It has wings."]}')
    cfg = load_config("configs/stage1/weclip_tiny-clip_synthetic-160x160_300i.py",
                      {"cam.source": "excel_svc", "cam.descriptors": str(desc)})
    before = (config_hash(cfg), stage_hash(cfg, "cams"))
    assert (config_hash(cfg), stage_hash(cfg, "cams")) == before  # deterministic
    desc.write_text('{"aeroplane": ["a clean origami aeroplane. It is grey."]}')
    after = (config_hash(cfg), stage_hash(cfg, "cams"))
    assert after[0] != before[0] and after[1] != before[1]
