"""The setting of the synthetic-world quality gates: the world CLIP (trained once, cached) and a fresh copy of a
config's synthetic dataset, scored on val."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple


def world_gate_run(config: str, tmp: Path) -> Tuple[Path, List[str]]:
    """Make sure the world CLIP exists (the `make world` cache; trained if missing), generate ``config``'s synthetic
    dataset under ``tmp``; return the run directory ``gate`` and the ``--cfg-options`` that point a run there (CAMs,
    dump and evaluation on val)."""
    from stage1_cam.config import load_config
    from stage1_cam.data.synthetic import generate_synthetic
    from stage1_cam.world_clip import train as world

    world.train_world_clip(world.WORLD_PRESETS["default"])
    syn = load_config(config).data.synthetic
    root = generate_synthetic(tmp / "synthetic", num_train=syn.num_train, num_val=syn.num_val,
                              image_size=tuple(syn.image_size), max_objects=syn.max_objects, seed=syn.seed)
    opts = [f"data.root={root}", f"run.root={tmp / 'runs'}", "data.eval_split=val", "data.dump_split=val"]
    return tmp / "runs" / "synthetic" / "gate", opts


def gate_cam_table(config: str, run: Path, opts: List[str]) -> Dict[str, float]:
    """Run ``python -m stage1_cam.cams`` for the gate run; return its evaluation table (bg rule -> mIoU)."""
    from stage1_cam.cams.__main__ import main as cams_main

    assert cams_main([config, "--run", "gate", "--cfg-options", *opts]) == 0
    return json.loads((run / "cams" / "metrics.json").read_text())["table"]
