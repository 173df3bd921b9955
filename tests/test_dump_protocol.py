"""The dump package's layout and its test-time protocols: ``dump.protocol="weclip"`` unchanged, ``"excel"``
(ExCEL's ``infer_seg_voc``: square inputs 320 s, flip fused per scale, parity quirk at s = 1, each scale upsampled
to the original size, averaged)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stage1_cam import dump as dump_mod
from stage1_cam.config import ConfigError, CrfCfg, DumpCfg, config_hash, load_config
from stage1_cam.data import build_dataset, normalize
from stage1_cam.io import ShardReader
from tests.numerics import assert_close_f32, dump_logit_terms, f16_probs_tolerance, f32_tolerance
# trained, trained_stack: module fixtures, trained once here
from tests.test_dump import CONFIG, _argv, _one_thread, trained, trained_stack  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ package
def test_package_imports_and_help():
    for name in ("main", "parse_args", "predict_probs", "OrderedPostprocessor", "make_crf_executor", "network_size",
                 "scaled_size", "allowed_classes", "logits_to_probs", "decode_probs", "Predictor", "dump_shard",
                 "evaluate_shards", "build_predictor", "run_dump", "excel_logits", "square_size"):
        assert callable(getattr(dump_mod, name)), name
    proc = subprocess.run([sys.executable, "-m", "stage1_cam.dump", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--training-free" in proc.stdout and "--from-probs" in proc.stdout, proc.stderr


# ------------------------------------------------------------------------------------------------ config
def test_protocol_setting_is_checked_and_hashed_only_when_not_the_default():
    with pytest.raises(ConfigError, match="dump.protocol='msc'.*valid: weclip, excel"):
        load_config(CONFIG, {"dump.protocol": "msc"})
    with pytest.raises(ConfigError, match="square_size"):
        load_config(CONFIG, {"dump.square_size": 0})
    cfg = load_config(CONFIG)
    # The new keys at their defaults leave the hash of the config as it was before they existed.
    old_layout = cfg.to_dict()
    for key in ("protocol", "square_size", "parity_no_flip_at_1"):
        del old_layout["dump"][key]
    from mmengine.config import ConfigDict

    assert config_hash(cfg) == config_hash(ConfigDict(old_layout))
    assert config_hash(load_config(CONFIG, {"dump.protocol": "excel"})) != config_hash(cfg)
    assert config_hash(load_config(CONFIG, {"dump.protocol": "excel", "dump.square_size": 336})) != \
        config_hash(load_config(CONFIG, {"dump.protocol": "excel"}))
    # Under the weclip protocol the excel protocol's settings decide nothing: changing them re-dumps nothing.
    assert config_hash(load_config(CONFIG, {"dump.square_size": 336, "dump.parity_no_flip_at_1": True})) == \
        config_hash(cfg)
    # Shard metadata: unchanged for WeCLIP shards; the protocol is recorded when it is not the default.
    assert set(DumpCfg().record()) == {"long_side", "scales", "flip", "label_constrained", "ignore_threshold",
                                       "save_probs", "crf", "ignore_index", "probs_dtype"}
    rec = DumpCfg(protocol="excel", parity_no_flip_at_1=True).record()
    assert (rec["protocol"], rec["square_size"], rec["parity_no_flip_at_1"]) == ("excel", 320, True)


def test_square_sizes():
    assert [dump_mod.square_size(s, 320, 16) for s in (0.7, 1.0, 1.2, 1.5)] == [(224, 224), (320, 320), (384, 384),
                                                                                (480, 480)]
    assert dump_mod.square_size(0.75, 100, 16) == (80, 80)  # 75 snapped to the patch
    s = DumpCfg(protocol="excel", square_size=320)
    assert dump_mod.batch_key(375, 500, s, 16) == dump_mod.batch_key(17, 900, s, 16) == (320, 320)
    assert dump_mod.batch_key(375, 500, DumpCfg(long_side=512), 16) == (384, 512)


# ------------------------------------------------------------------------------------------------ excel_logits
def _toy_predict(x: torch.Tensor) -> torch.Tensor:
    """A stride-16 "network" that is not flip-symmetric: patch means of the channels, plus a column ramp."""
    p = F.avg_pool2d(x, 16)  # (N, 3, h, w)
    ramp = torch.linspace(0, 1, p.shape[-1]).view(1, 1, 1, -1)
    return torch.cat([p, p[:, :1] * ramp, p.sum(1, keepdim=True) - 2 * ramp], 1)  # (N, 5, h, w)


def _excel_reference(image: torch.Tensor, scales, *, flip_at_1: bool) -> torch.Tensor:
    """One image, written out as reference_spec 4.9 says, scale by scale."""
    h, w = image.shape[-2:]
    outs = []
    for s in scales:
        n = int(320 * s)  # 224, 320, 384, 480: multiples of 16
        x = F.interpolate(image[None], size=(n, n), mode="bilinear", align_corners=False)
        a = _toy_predict(x)
        b = _toy_predict(x.flip(-1)).flip(-1)
        fused = a if (s == 1.0 and not flip_at_1) else (a + b) / 2
        outs.append(F.interpolate(fused, size=(h, w), mode="bilinear", align_corners=False)[0])
    total = outs[0]
    for o in outs[1:]:  # the mean over the scales, summed in scale order
        total = total + o
    return total / len(scales)


@pytest.mark.parametrize("parity", [False, True], ids=["flip-every-scale", "parity-no-flip-at-1"])
def test_excel_logits_match_a_per_image_reference(parity):
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 75, 100, generator=g), torch.randn(3, 131, 64, generator=g)]  # any sizes, one batch
    scales = (0.7, 1.0, 1.2, 1.5)
    got = dump_mod.excel_logits(_toy_predict, images, scales=scales, flip=True, side=320, patch_size=16,
                                no_flip_at_1=parity)
    for im, out in zip(images, got):
        assert out.shape == (5, *im.shape[-2:])  # every scale upsampled to the original size
        # The same float operations in the same order on every value: each image resized alone, the toy network
        # element-wise per image, (a + flip(b)) / 2, each scale upsampled alone, summed in scale order: exact.
        assert torch.equal(out, _excel_reference(im, scales, flip_at_1=not parity))
    other = dump_mod.excel_logits(_toy_predict, images, scales=scales, flip=True, side=320, patch_size=16,
                                  no_flip_at_1=not parity)
    assert not torch.allclose(got[0], other[0])  # the quirk matters for a network that is not flip-symmetric
    # Channels selected first (label-constrained) equal the selection of the full result (up to float rounding).
    keys = [torch.tensor([0, 3]), torch.tensor([1, 2, 4])]
    sel = dump_mod.excel_logits(_toy_predict, images, scales=scales, flip=True, side=320, patch_size=16,
                                no_flip_at_1=parity, keys=keys)
    for s, full, k in zip(sel, got, keys):
        # The same arithmetic on fewer channels (another kernel path): the roundings after the network, each at the
        # scale of the fused logits: flip average 2, upsampling 4 taps, mean over the 4 scales.
        assert_close_f32(s, full[k], terms=2 + 4 + len(scales), scale=full.abs().max())


def test_excel_protocol_matches_per_image_reference_on_the_trained_head(trained):  # noqa: F811
    """predict_probs under dump.protocol="excel", batched over images of different sizes, equals a per-image loop
    over the head the dump loads (as test_msc_flip_matches_per_image_reference does for WeCLIP's protocol)."""
    cfg = trained["cfg"]
    stack = trained_stack(trained)
    predictor = dump_mod.build_predictor(cfg, trained["ckpt"], torch.device("cpu"))
    ds = build_dataset("synthetic", cfg.data.root, "train_aug")
    full = ds.load_image(ds.names[0])
    images = [full, full[:-7, :-20].copy(), ds.load_image(ds.names[1])]
    keys = [dump_mod.allowed_classes(ds.image_labels(n), 21, label_constrained=True) for n in ds.names[:2]]
    keys = [keys[0], np.arange(21), keys[1]]
    for parity in (False, True):
        settings = DumpCfg(protocol="excel", square_size=64, scales=(0.75, 1.0, 1.5), parity_no_flip_at_1=parity,
                           crf=CrfCfg(enabled=False))
        got = dump_mod.predict_probs(predictor, images, keys, settings=settings)
        for im, k, out in zip(images, keys, got):
            x = torch.from_numpy(normalize(im, stack.mean, stack.std)).permute(2, 0, 1)[None]
            fused = []
            for n, s in ((48, 0.75), (64, 1.0), (96, 1.5)):
                xs = F.interpolate(x, size=(n, n), mode="bilinear", align_corners=False)
                a = stack.head.predict_logits(xs)
                b = stack.head.predict_logits(xs.flip(-1)).flip(-1)
                f = a if (parity and s == 1.0) else (a + b) / 2
                fused.append(F.interpolate(f, size=im.shape[:2], mode="bilinear", align_corners=False)[0])
            logits = torch.stack(fused).mean(0)[torch.as_tensor(k)]
            ref = logits.softmax(0)
            assert out.dtype == np.float16 and out.shape == (len(k),) + im.shape[:2]
            # Batched against one image at a time: the network's roundings in another order (37 tokens at the
            # 96x96 scale), the fusion (flip 2, upsampling 4, scale mean 3) and the softmax (K + 2), at the logits'
            # scale; then the float16 storage.
            terms = dump_logit_terms(backbone_blocks=stack.head.num_inputs, width=stack.backbone.width, tokens=37,
                                     decoder_layers=cfg.head.decoder_layers, embed_dim=cfg.head.embed_dim,
                                     fusion=2 + 4 + 3) + len(k) + 2
            tol = f16_probs_tolerance(ref, f32_tolerance(terms, logits.abs().max()))
            err = (torch.from_numpy(out.astype(np.float64)) - ref.double()).abs()
            assert bool((err <= tol).all()), f"{float((err - tol).max()):.3g} over the bound"


def test_weclip_protocol_is_the_fused_grid_path_bit_for_bit(trained):  # noqa: F811
    """The default protocol computes exactly what the dump computed before protocols existed: msc+flip fused on the
    scale-1 logit grid, then the allowed channels upsampled and soft-maxed (same ops, same order)."""
    cfg = trained["cfg"]
    predictor = dump_mod.build_predictor(cfg, trained["ckpt"], torch.device("cpu"))
    ds = build_dataset("synthetic", cfg.data.root, "train_aug")
    images = [ds.load_image(n) for n in ds.names[:3]]
    keys = [dump_mod.allowed_classes(ds.image_labels(n), 21, label_constrained=True) for n in ds.names[:3]]
    settings = DumpCfg(long_side=64, scales=(1.0, 0.75), crf=CrfCfg(enabled=False))
    assert settings.protocol == "weclip"
    got = dump_mod.predict_probs(predictor, images, keys, settings=settings)
    size = dump_mod.network_size(*images[0].shape[:2], long_side=64, patch=16)
    x = torch.stack([predictor.prepare(im, size) for im in images])
    logits = dump_mod.msc_flip_logits(predictor, x, scales=(1.0, 0.75), flip=True, patch_size=16)
    for b, im in enumerate(images):
        ref = dump_mod.logits_to_probs(logits[b], im.shape[:2], torch.as_tensor(keys[b])).to(torch.float16).numpy()
        np.testing.assert_array_equal(got[b], ref)


def test_excel_protocol_dump_records_its_settings(trained, tmp_path):  # noqa: F811
    out = tmp_path / "excel"
    opts = {**trained["opts"], "dump.protocol": "excel", "dump.square_size": 64, "dump.scales": [0.75, 1.0],
            "dump.crf.enabled": False}
    assert dump_mod.main([CONFIG, "--shard", "all", "--out", str(out), "--no-progress"] + _argv(opts)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["extra"]["protocol"] == "excel" and manifest["extra"]["square_size"] == 64
    ds = build_dataset("synthetic", trained["cfg"].data.root, "train_aug")
    with ShardReader(out) as r:
        for name in r.ids:
            assert r.label(name).shape == ds.load_image(name).shape[:2]
            assert set(np.unique(r.label(name)).tolist()) <= {0, *ds.image_labels(name).tolist()}
