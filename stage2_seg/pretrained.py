"""ImageNet-pretrained backbone weights: find them in a model config, check them early, or switch them off.

mmseg configs name pretrained weights in two ways: ``model.pretrained = 'open-mmlab://resnet101_v1c'`` (moved
into ``backbone.init_cfg`` by ``EncoderDecoder``) and ``backbone.init_cfg = dict(type='Pretrained',
checkpoint=...)`` (SegFormer's MiT). mmengine resolves the name at ``init_weights`` time, after the model and
data loaders are built: ``open-mmlab://``/``openmmlab://`` through ``mmengine/hub/openmmlab.json``,
``mmcls://`` through ``hub/mmcls.json``, ``torchvision://`` through torchvision's weight enums, and URLs are
downloaded into ``torch.hub.get_dir()/checkpoints/<file name>`` unless already there.

Offline, that download fails late with a socket error. :func:`check_pretrained_available` does the same
resolution up front and raises a ``FileNotFoundError`` that names the expected cache file, the URL, and how
to train without pretrained weights instead.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple
from urllib.parse import urlparse

import torch

from stage1_cam.utils.cli import UnknownNameError

_logger = logging.getLogger(__name__)

_URL_PREFIXES = ("http://", "https://")


@dataclass(frozen=True)
class PretrainedSource:
    """Where one pretrained checkpoint comes from.

    Attributes:
        name: the string found in the config (``open-mmlab://resnet101_v1c``, a URL, or a local path).
        key: dotted config path it was found at (e.g. ``model.pretrained``).
        url: the download URL, or ``None`` for a local file.
        local_path: where the file is (or will be cached, for a URL).
    """

    name: str
    key: str
    url: Optional[str]
    local_path: str


def _walk_pretrained(node: Any, key: str) -> Iterator[Tuple[str, str]]:
    """Yield ``(dotted_key, checkpoint_name)`` for every pretrained reference under ``node``."""
    if isinstance(node, dict):
        for k, v in node.items():
            sub = f"{key}.{k}"
            if k == "pretrained" and isinstance(v, str):
                yield sub, v
            elif k == "init_cfg":
                cfgs = v if isinstance(v, (list, tuple)) else [v]
                for i, c in enumerate(cfgs):
                    if isinstance(c, dict) and c.get("type") == "Pretrained" and c.get("checkpoint"):
                        yield (f"{sub}[{i}]" if isinstance(v, (list, tuple)) else sub), str(c["checkpoint"])
            else:
                yield from _walk_pretrained(v, sub)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _walk_pretrained(v, f"{key}[{i}]")


def _mmengine_home() -> str:
    """mmengine's cache home (``$MMENGINE_HOME`` or ``$XDG_CACHE_HOME/mmengine``), as mmengine computes it."""
    return os.path.expanduser(os.getenv("MMENGINE_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"),
                                                                      "mmengine")))


def resolve_pretrained(name: str, *, key: str = "") -> PretrainedSource:
    """Map a checkpoint name from a config to its URL and local (cache) path, the way mmengine does.

    Args:
        name: ``open-mmlab://x``, ``openmmlab://x``, ``mmcls://x``, ``torchvision://x``, a URL or a path.
        key: the config key it came from (only used in messages).

    Raises:
        KeyError: an ``open-mmlab://``/``mmcls://``/``torchvision://`` name mmengine does not know.
    """
    from mmengine.runner import checkpoint as ckpt

    url: Optional[str]
    if name.startswith(("open-mmlab://", "openmmlab://")):
        model_name = name.split("://", 1)[1]
        model_name = ckpt.get_deprecated_model_names().get(model_name, model_name)
        urls = ckpt.get_external_models()
        if model_name not in urls:
            raise UnknownNameError(f"{key or 'pretrained'}: unknown open-mmlab model {name!r}; "
                                   f"known: {', '.join(sorted(urls))}")
        target = urls[model_name]
        if target.startswith(_URL_PREFIXES):
            url = target
        else:
            return PretrainedSource(name, key, None, os.path.join(_mmengine_home(), target))
    elif name.startswith("mmcls://"):
        urls = ckpt.get_mmcls_models()
        model_name = name[len("mmcls://"):]
        if model_name not in urls:
            raise UnknownNameError(f"{key or 'pretrained'}: unknown mmcls model {name!r}; "
                                   f"known: {', '.join(sorted(urls))}")
        url = urls[model_name]
    elif name.startswith(("torchvision://", "modelzoo://")):
        urls = ckpt.get_torchvision_models()
        model_name = name.split("://", 1)[1]
        if model_name not in urls:
            raise UnknownNameError(f"{key or 'pretrained'}: unknown torchvision model {name!r}")
        url = urls[model_name]
    elif name.startswith(_URL_PREFIXES):
        url = name
    else:
        return PretrainedSource(name, key, None, os.path.expanduser(name))
    cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
    return PretrainedSource(name, key, url, cache)


def find_pretrained(model_cfg: Any) -> List[PretrainedSource]:
    """All pretrained checkpoints a model config would load in ``init_weights``.

    Args:
        model_cfg: the ``model`` dict (or ``ConfigDict``) of an mmseg config.
    """
    return [resolve_pretrained(name, key=key) for key, name in _walk_pretrained(model_cfg, "model")]


def _reachable(url: str, timeout: float) -> bool:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def check_pretrained_available(model_cfg: Any, *, timeout: float = 3.0) -> List[PretrainedSource]:
    """Fail early, with a useful message, when pretrained weights can neither be found nor downloaded.

    A source is fine when its file exists (local path, mmengine home, or torch hub cache) or when its
    download host accepts a TCP connection within ``timeout`` seconds.

    Args:
        model_cfg: the ``model`` dict of an mmseg config.
        timeout: seconds to wait for the download host.

    Returns:
        The sources found (empty when the config loads no pretrained weights).

    Raises:
        FileNotFoundError: a local checkpoint is missing, or a URL is neither cached nor reachable.
    """
    sources = find_pretrained(model_cfg)
    for src in sources:
        if os.path.isfile(src.local_path):
            _logger.info("pretrained weights for %s: %s", src.key, src.local_path)
            continue
        how_to_skip = ("or train from scratch with --no-pretrained (sets model.pretrained=None and drops "
                       "backbone init_cfg Pretrained entries)")
        if src.url is None:
            raise FileNotFoundError(f"{src.key} = {src.name!r}: checkpoint file {src.local_path} does not exist; "
                                    f"fix the path {how_to_skip}")
        if not _reachable(src.url, timeout):
            raise FileNotFoundError(
                f"{src.key} = {src.name!r}: pretrained weights are not in the torch hub cache ({src.local_path}) "
                f"and {urlparse(src.url).hostname} cannot be reached (offline?). Download {src.url} on a machine "
                f"with network access and copy it to {src.local_path} (the cache follows $TORCH_HOME), "
                f"{how_to_skip}")
        _logger.info("pretrained weights for %s will be downloaded from %s", src.key, src.url)
    return sources


def disable_pretrained(model_cfg: Any) -> List[str]:
    """Switch off every pretrained checkpoint in a model config, in place.

    Sets ``pretrained`` entries to ``None`` and removes ``init_cfg`` entries of type ``Pretrained`` (an
    ``init_cfg`` that held only that entry becomes ``None``), so ``init_weights`` uses random initialisation.

    Args:
        model_cfg: the ``model`` dict (or ``ConfigDict``) of an mmseg config; modified in place.

    Returns:
        The dotted keys that were changed.
    """
    changed: List[str] = []

    def visit(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k in list(node.keys()):
                v, sub = node[k], f"{key}.{k}"
                if k == "pretrained" and isinstance(v, str):
                    node[k] = None
                    changed.append(sub)
                elif k == "init_cfg" and v is not None:
                    cfgs = list(v) if isinstance(v, (list, tuple)) else [v]
                    kept = [c for c in cfgs if not (isinstance(c, dict) and c.get("type") == "Pretrained")]
                    if len(kept) != len(cfgs):
                        node[k] = (kept if kept else None) if isinstance(v, (list, tuple)) else None
                        changed.append(sub)
                else:
                    visit(v, sub)
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                visit(v, f"{key}[{i}]")

    visit(model_cfg, "model")
    if changed:
        _logger.info("pretrained weights switched off at: %s", ", ".join(changed))
    return changed
