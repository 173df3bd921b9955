"""The head contract (stage1_cam/heads/base.py): a head defined here, and nowhere in the package, is configured,
trained, dumped and evaluated through the unchanged entry points (train, dump, dump --evaluate, pipelines)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Sequence, Tuple

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from stage1_cam.config import ConfigError, load_config
from stage1_cam.heads import HEADS, HeadConfig, Stage1Head, TrainBatch, register_head
from stage1_cam.io import ShardReader
from stage1_cam.utils.schema import POSITIVE, Range

TINY = "configs/stage1/weclip_tiny-clip_synthetic-160x160_300i.py"


@dataclass
class ToyHeadCfg(HeadConfig):
    """A patch classifier on the last block's tokens, trained with a multi-label loss on image-level labels."""

    type: str = "toy"
    temperature: float = 1.0  # divides the logits

    RANGES: ClassVar[Dict[str, Range]] = {"temperature": POSITIVE}


class ToyHead(Stage1Head):
    config_class = ToyHeadCfg
    FIGURES = {"patches": "toy head: patch classifier"}

    def __init__(self, *, backbone: nn.Module, num_classes: int, temperature: float) -> None:
        super().__init__()
        object.__setattr__(self, "backbone", backbone)  # frozen, held by reference: not in the state dict
        self.classifier = nn.Linear(backbone.width, num_classes)
        self.temperature = temperature

    @classmethod
    def from_config(cls, cfg: Any, *, backbone: nn.Module, cam_source: Any, num_classes: int,
                    run: Any = None) -> "ToyHead":
        return cls(backbone=backbone, num_classes=num_classes, temperature=cfg.head.temperature)

    def trainable_module(self) -> nn.Module:
        return self.classifier

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(images, with_attn=False)
        tokens = feats.tokens[-1][:, 1:].float()  # (B, hw, D) patches
        h, w = feats.grid
        logits = self.call_trainable(tokens) / self.temperature
        return logits.transpose(1, 2).reshape(images.shape[0], -1, h, w)

    def forward_train(self, batch: TrainBatch, step: int) -> Dict[str, torch.Tensor]:
        logits = self._logits(batch.images)
        target = torch.zeros(logits.shape[:2], device=logits.device)
        target[:, 0] = 1.0  # background is in every image
        for i, keys in enumerate(batch.labels):
            target[i, torch.as_tensor(keys, dtype=torch.long)] = 1.0
        loss = F.binary_cross_entropy_with_logits(logits.flatten(2).amax(-1), target)
        return {"loss": loss, "loss_multilabel": loss}

    @torch.no_grad()
    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self._logits(images).float()

    @torch.no_grad()
    def validation_figures(self, images: torch.Tensor, labels: Sequence[np.ndarray], *, out_size: Tuple[int, int],
                           full_images: torch.Tensor) -> Dict[str, torch.Tensor]:
        up = F.interpolate(self.predict_logits(images), size=tuple(out_size), mode="bilinear", align_corners=False)
        return {"patches": up.argmax(1)}


@pytest.fixture(scope="module", autouse=True)
def toy_registered():
    if "toy" not in HEADS:
        register_head("toy")(ToyHead)
    yield


def _config(tmp_path, **head) -> str:
    """A config file that swaps the tiny WeCLIP config's head for the toy one (``_delete_``: other keys)."""
    path = tmp_path / "toy.py"
    fields = ", ".join(f"{k}={v!r}" for k, v in head.items())
    path.write_text(f'_base_ = ["{(__import__("pathlib").Path(TINY).resolve())}"]\n'
                    f'head = dict(_delete_=True, type="toy"{", " + fields if fields else ""})\n')
    return str(path)


def test_toy_head_config_is_validated_by_its_own_schema(tmp_path):
    cfg = load_config(_config(tmp_path, temperature=2.0))
    assert dict(cfg.head) == {"type": "toy", "temperature": 2.0}
    with pytest.raises(ConfigError, match=r"head.temperature=0.0 is out of range"):
        load_config(_config(tmp_path, temperature=0.0))
    with pytest.raises(ConfigError,
                       match=r"unknown config key\(s\) head.rfm.*valid keys under head: type, temperature"):
        load_config(_config(tmp_path, rfm=dict(layers=2)))


def test_toy_head_trains_dumps_and_evaluates_through_the_entry_points(synthetic_root, tmp_path):
    from stage1_cam import dump, train

    conf = _config(tmp_path, temperature=1.0)
    runs = tmp_path / "runs"
    opts = [f"data.root={synthetic_root}", f"run.root={runs}", "data.crop_size=64", "data.num_workers=0",
            "train.batch_size=2", "train.max_iters=4", "train.log_interval=2", "train.val_interval=4",
            "train.val_max_images=3", "train.ckpt_interval=4", "dump.long_side=64", "dump.scales=(1.0,)",
            "dump.batch_size=2", "dump.num_shards=1", "dump.crf.enabled=False"]
    assert train.main([conf, "--run", "toy", "--cfg-options", *opts]) == 0
    run = runs / "synthetic" / "toy"
    ckpt = torch.load(run / "stage1" / "checkpoints" / "final.pth", weights_only=True)
    assert ckpt["head_type"] == "toy" and set(ckpt["head"]) == {"weight", "bias"}
    assert "(multilabel " in (run / "stage1" / "train.log").read_text()  # the head's own loss terms are logged
    val = [json.loads(line) for line in (run / "stage1" / "val_metrics.jsonl").read_text().splitlines()]
    assert val[-1]["figures"] == {"patches": "toy head: patch classifier"} and 0 <= val[-1]["patches_miou"] <= 1

    assert dump.main([conf, "--run", "toy", "--shard", "all", "--cfg-options", *opts]) == 0
    reader = ShardReader(run / "pseudo_masks")
    names = list(reader)
    assert len(names) == len(reader) > 0
    for name in names:  # label-constrained: background and the image's own classes only
        allowed = {0, *reader.image_labels(name).tolist(), 255}
        assert set(np.unique(reader.label(name)).tolist()) <= allowed
    assert dump.main([conf, "--run", "toy", "--evaluate", "--cfg-options", *opts]) == 0
    metrics = json.loads((run / "pseudo_masks" / "metrics.json").read_text())
    assert 0.0 <= metrics["final"]["miou"] <= 1.0


def test_pipelines_make_what_a_head_requires(tmp_path):
    """``pipelines`` asks the head (``Stage1Head.requires``) whether to make the initial CAMs first."""
    from pipelines.stages import needs_initial_cams
    from stage1_cam.heads import INITIAL_CAMS
    from stage1_cam.utils.run_dir import RunDir

    cfg = load_config(_config(tmp_path))
    run = RunDir(tmp_path / "run")
    assert not needs_initial_cams(cfg, run)
    ToyHead.requires = classmethod(lambda cls, c: (INITIAL_CAMS,))
    try:
        assert needs_initial_cams(cfg, run)
        (run.cams_dir).mkdir(parents=True)
        (run.cams_dir / "manifest.json").write_text("{}")
        assert not needs_initial_cams(cfg, run)  # already there
    finally:
        del ToyHead.requires
