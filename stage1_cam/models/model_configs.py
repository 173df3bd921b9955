"""The in-repo CLIP model configs (``stage1_cam/model_configs/*.json``: tiny and world ViTs), for open_clip."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from ..utils.cli import BadInputError

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
_registered = False


def register_model_configs() -> None:
    """Register the in-repo model configs with open_clip, once."""
    global _registered
    if _registered:
        return
    import open_clip  # slow to import: only where a model is built or hashed

    open_clip.add_model_config(MODEL_CONFIG_DIR)
    _registered = True


def model_config(model_name: str) -> Dict[str, Any]:
    """open_clip's architecture config of ``model_name`` (in-repo configs included); unknown names: BadInputError."""
    import open_clip

    register_model_configs()
    mc = open_clip.get_model_config(model_name)
    if mc is None:
        raise BadInputError(f"unknown CLIP model {model_name!r}; valid: {', '.join(open_clip.list_models())}"
                            f" (open_clip configs and stage1_cam/model_configs)")
    return mc
