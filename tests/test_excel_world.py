"""Quality gates of the ExCEL head on the synthetic world (the default world CLIP, `make world`), through the real
entry points: initial maps, online labels with and without LVC, dumped masks; and LVC given grouping features.

Measured on the shared 2-core CPU, 1 torch thread, 60 val images (docs/results.md has the full tables), with LVC's
attention added in every head (reference_spec 4.7; 2026-12-07 evening):
- initial maps (SVC, refined, bg=(1-max)^1; `python -m stage1_cam.cams`): 61.2;
- online labels without LVC (plain maps and attention mean; training-free, so the same for every run): 71.4;
- online labels with LVC at step 300: 67.8 (seed 1, this config), 66.5, 67.8, 67.6, 67.0 (seeds 2-5). The 60 val
  images are too few to rank LVC: a handful of images decide it;
- the same checkpoints on 400 held-out world images (another seed of the generator): with LVC 66.4, 66.8, 66.7, 67.6,
  67.1 (seeds 1-5) against 65.1 without: +1.3 to +2.5 (the RFM affinity alone gives +2.0 to +2.2). The LVC gate is
  on that set;
- dumped masks (msc+flip+CRF, val): 68.2 (seed 1) / 70.1 (seed 2), well above the initial maps;
- LVC with oracle features (ground-truth class fractions per patch) instead of the decoder's: 73.3 against 71.4:
  the calibration itself helps when the features group the right patches.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.world_gate import gate_cam_table, world_gate_run

CONFIG = "configs/stage1/excel_world-clip_synthetic-160x160_300i.py"
GATE_CAM = 0.55  # measured 61.2
GATE_NO_LVC = 0.65  # measured 71.4
GATE_LVC = 0.62  # measured 67.8 (66.5 to 67.8 with seeds 1-5)
GATE_LVC_LOSS = 0.07  # on the 60 val images, with LVC >= without - this; measured -3.6 (seed 1), -4.9 (seed 2)
GATE_LVC_GAIN = 0.006  # on 400 held-out images, with LVC >= without + this; measured +1.3 to +2.5 (seeds 1-5)
HELD_OUT = dict(num_train=240, num_val=400, seed=7)  # the held-out world images of the LVC gate
GATE_DUMP = 0.64  # measured 68.2 (70.1 with seed 2)
GATE_ORACLE_GAIN = 0.01  # LVC with oracle features - plain; measured +1.9


@pytest.fixture(scope="module")
def excel_world(tmp_path_factory):
    return world_gate_run(CONFIG, tmp_path_factory.mktemp("excel-world"))


def _held_out_figures(run, opts, tmp):
    """The trained head's validation figures (LVC, no LVC, decoder) on 400 held-out world images: the 60 val images
    are too few to rank LVC against the plain labels."""
    from stage1_cam.build import build_stage1
    from stage1_cam.config import load_config
    from stage1_cam.data.synthetic import generate_synthetic
    from stage1_cam.train import load_checkpoint, validate

    syn = load_config(CONFIG).data.synthetic
    root = generate_synthetic(tmp / "held-out", image_size=tuple(syn.image_size), max_objects=syn.max_objects,
                              **HELD_OUT)
    cfg = load_config(CONFIG, dict(o.split("=", 1) for o in [*opts, f"data.root={root}"]))
    stack = build_stage1(cfg, torch.device("cpu"))
    stack.head.load_trainable_state(load_checkpoint(run / "stage1" / "checkpoints" / "final.pth")["head"])
    return validate(stack, cfg, torch.device("cpu"))


@pytest.mark.slow
def test_excel_world_quality_gates(excel_world, tmp_path):
    from stage1_cam.dump import main as dump_main
    from stage1_cam.train import main as train_main

    run, opts = excel_world
    cam = gate_cam_table(CONFIG, run, opts)["bg=(1-max)^1"]
    assert cam >= GATE_CAM, cam
    assert train_main([CONFIG, "--run", "gate", "--cfg-options", *opts]) == 0
    val = [json.loads(line) for line in (run / "stage1" / "val_metrics.jsonl").read_text().splitlines()]
    last = val[-1]
    assert last["step"] == 300 and set(last["figures"]) == {"pseudo", "pseudo_no_lvc", "decoder"}
    assert last["pseudo_no_lvc_miou"] >= GATE_NO_LVC, last
    assert last["pseudo_miou"] >= GATE_LVC, last
    assert last["pseudo_miou"] >= last["pseudo_no_lvc_miou"] - GATE_LVC_LOSS, last
    held_out = _held_out_figures(run, opts, tmp_path)
    assert held_out["pseudo_miou"] >= held_out["pseudo_no_lvc_miou"] + GATE_LVC_GAIN, held_out
    assert dump_main([CONFIG, "--run", "gate", "--no-progress", "--cfg-options", *opts]) == 0
    assert dump_main([CONFIG, "--run", "gate", "--evaluate", "--cfg-options", *opts]) == 0
    dumped = json.loads((run / "pseudo_masks" / "metrics.json").read_text())["miou"]
    assert dumped >= GATE_DUMP and dumped > cam, (dumped, cam)


@pytest.mark.slow
def test_excel_world_lvc_with_grouping_features_improves_the_labels(excel_world):
    """LVC's mechanism on the world CLIP: calibrating the SVC attention with features that group the patches of
    one ground-truth class (their class fractions) gives better online labels than the plain maps (no training)."""
    from stage1_cam.build import build_stage1
    from stage1_cam.config import load_config
    from stage1_cam.data import build_dataset
    from stage1_cam.data.transforms import normalize
    from stage1_cam.heads.weclip import online_pseudo_labels
    from stage1_cam.metrics import ConfusionMatrix

    _, opts = excel_world
    cfg = load_config(CONFIG, dict(o.split("=", 1) for o in opts))
    stack = build_stage1(cfg, torch.device("cpu"))
    head, src = stack.head.eval(), stack.cam_source
    ds = build_dataset(cfg.data.dataset, cfg.data.root, cfg.data.val_split)
    n_cls, p = len(stack.class_names), stack.backbone.patch_size
    cms = {"plain": ConfusionMatrix(n_cls), "oracle": ConfusionMatrix(n_cls)}
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            img = torch.from_numpy(normalize(item["image"], stack.mean, stack.std)).permute(2, 0, 1)[None]
            h, w = img.shape[-2:]
            net = torch.nn.functional.interpolate(img, size=(h // p * p, w // p * p), mode="bilinear",
                                                  align_corners=False)
            plain = src(net, [item["labels"]], attn_layers=head.pseudo.attn_layers)
            gt = torch.from_numpy(item["gt"].astype(np.int64)).masked_fill(torch.from_numpy(item["gt"] == 255), 0)
            onehot = torch.nn.functional.one_hot(gt, n_cls).permute(2, 0, 1).float()[None]
            oracle = torch.nn.functional.adaptive_avg_pool2d(onehot, plain.grid)  # class fractions per patch
            calibrated = src(net, [item["labels"]], ex_feats=oracle, reuse=plain)
            for name, out in (("plain", plain), ("oracle", calibrated)):
                lab = online_pseudo_labels(out.cams, plain.keys, plain.attn, None, cfg=head.pseudo, par=head.par,
                                           images=img, out_size=(h, w))[0]
                cms[name].update(lab[0].numpy(), item["gt"])
    plain_miou, oracle_miou = (cms[k].compute()["miou"] for k in ("plain", "oracle"))
    assert plain_miou >= GATE_NO_LVC, plain_miou  # the training-free labels: the validation's pseudo_no_lvc
    assert oracle_miou >= plain_miou + GATE_ORACLE_GAIN, (oracle_miou, plain_miou)
