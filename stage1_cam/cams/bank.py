"""ExCEL's attribute bank for text semantic enrichment (TSE, reference_spec 4.4): build, cache, load, check.

``python -m stage1_cam.cams.bank CONFIG --descriptions FILE [--run NAME] [-k K] [--cfg-options ...]``

- ``FILE`` a class-descriptions JSON ``{class: [sentences]}`` (e.g. LLM-written, ExCEL's
  ``descriptors_*.json``): every sentence is encoded with the run's own CLIP text tower (``cfg.clip``),
  L2-normalised, and the embeddings are clustered by scikit-learn ``KMeans(k, random_state=0)``
  (``k = cam.num_attributes``: ExCEL 112 VOC / 224 COCO). The bank is cached in the run directory,
  ``runs/<dataset>/<run>/bank/attributes-k<k>-<hash>.pth`` (with a ``.json`` describing it), under a hash of the
  descriptions' content (classes in label order), the CLIP identity (``config_hash(cfg, ("clip",))``, which holds
  the trained world's hash for ``world:`` weights) and ``k``: a second call with the same inputs loads it,
  other inputs make another file; nothing is overwritten.
- ``FILE`` ExCEL's released ``*_embedding_bank.pth``: a list of two float32 tensors, the bank ``(E, k)`` and the
  class -> cluster membership ``(C, k)``, loaded with ``weights_only=True`` and checked against the CLIP's
  embedding size and the dataset's classes.
- ``--write-synthetic`` (synthetic dataset): first write the synthetic world's own descriptions
  (:func:`stage1_cam.data.descriptions.synthetic_descriptions`) to ``FILE``.

The class names of a JSON must be the dataset's foreground classes (``data/class_names.py``), compared without
case, spaces, ``_`` and ``-`` ("dining table" is "diningtable"); missing or extra classes are one error listing
them. A stage-1 run uses the bank through ``cam.descriptors = FILE`` (:func:`attribute_bank_for`).

The bank file is in ExCEL's released format, so it can be given as ``cam.descriptors`` elsewhere. Reading,
checking and clustering are the pure functions of :mod:`stage1_cam.cams.attributes` (re-exported here).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn as nn

from ..config import config_hash, load_config
from ..data.class_names import get_classes
from ..models.model_configs import model_config
from ..utils.cli import BadInputError, add_config_args, config_overrides, run_main
from ..utils.files import atomic_write, atomic_write_text
from ..utils.logging import setup_logging
from ..utils.run_dir import RunDir
from .attributes import (BANK_SUFFIXES, KMEANS_N_INIT, KMEANS_SEED, build_attribute_bank,  # noqa: F401 (re-exported)
                         is_bank_file, load_attribute_bank, load_bank_file, load_descriptions, match_classes)

_logger = logging.getLogger(__name__)

BANK_VERSION = 1  # bump when the clustering changes: cached banks are then rebuilt under new names
BANK_DIR = "bank"  # under the run directory


# ----------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class BankResult:
    """An attribute bank with where it came from.

    Attributes:
        bank: ``(E, k)`` float32, cluster centres as columns.
        membership: ``(C, k)`` float32 class -> cluster (None for a bare tensor file).
        path: the bank file (the cache entry, or the released file given).
        source: ``"built"`` (clustered now), ``"cache"`` (an earlier build of the same inputs) or ``"file"``.
    """

    bank: torch.Tensor
    membership: Optional[torch.Tensor]
    path: Path
    source: str


def clip_identity(cfg: Any) -> str:
    """What identifies the run's CLIP text tower for the cache: the hash of the ``clip`` config section."""
    return config_hash(cfg, sections=("clip",))


def bank_key(descriptions: Dict[str, List[str]], clip_id: str, k: int, seed: int = KMEANS_SEED) -> str:
    """Hex sha256 of everything a clustered bank depends on (descriptions in label order, CLIP, k, seed)."""
    payload = {"version": BANK_VERSION, "descriptions": [[c, list(s)] for c, s in descriptions.items()],
               "clip": clip_id, "k": int(k), "seed": int(seed)}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()


def bank_dir(cfg: Any) -> Path:
    """``runs/<dataset>/<run>/bank``."""
    return RunDir.from_config(cfg).path / BANK_DIR


def bank_path(cfg: Any, k: int, key: str) -> Path:
    """The cache entry of a bank: ``<run>/bank/attributes-k<k>-<key[:16]>.pth``."""
    return bank_dir(cfg) / f"attributes-k{k}-{key[:16]}.pth"


def _embed_dim(cfg: Any) -> int:
    return int(model_config(cfg.clip.model_name)["embed_dim"])


def cached_attribute_bank(cfg: Any, clip_model: Optional[nn.Module], descriptions: Union[str, Path, None] = None
                          ) -> BankResult:
    """The attribute bank of ``descriptions`` (default ``cfg.cam.descriptors``) for the run of ``cfg``.

    A bank file (``.pth``/``.pt``) is loaded and checked. A descriptions JSON is matched against the dataset's
    classes and clustered with ``clip_model``'s text tower into ``cfg.cam.num_attributes`` attributes, once: the
    result is cached in the run directory (see the module docstring) and later calls load it.

    Args:
        cfg: the stage-1 config (``clip``, ``cam``, ``data.dataset``, ``run``).
        clip_model: the run's CLIP, built from ``cfg.clip`` (only used to cluster; may be None for a bank file).
        descriptions: the JSON or bank file.

    Raises:
        BadInputError, FileNotFoundError: see :func:`load_descriptions`, :func:`match_classes`,
            :func:`load_bank_file`.
    """
    source = descriptions if descriptions is not None else cfg.cam.descriptors
    if not source:
        raise BadInputError("no class descriptions: pass --descriptions FILE (a JSON {class: [sentences]} or "
                            "ExCEL's *_embedding_bank.pth) or set cam.descriptors in the config")
    source = Path(source)
    classes = get_classes(cfg.data.dataset)[1:]
    e = _embed_dim(cfg)
    if is_bank_file(source):
        bank, membership = load_bank_file(source, embed_dim=e, num_classes=len(classes))
        _logger.info("attribute bank %s: %d attributes of dimension %d", source, bank.shape[1], bank.shape[0])
        return BankResult(bank=bank, membership=membership, path=source, source="file")
    desc = match_classes(load_descriptions(source), classes, source)
    k = int(cfg.cam.num_attributes)
    n_sent = sum(len(v) for v in desc.values())
    if k > n_sent:
        raise BadInputError(f"{source} holds {n_sent} sentences, fewer than the {k} attributes to cluster "
                            f"(cam.num_attributes); lower it (-k) or add sentences")
    key = bank_key(desc, clip_identity(cfg), k)
    out = bank_path(cfg, k, key)
    meta_path = out.with_suffix(".json")
    if out.exists():
        try:
            bank, membership = load_bank_file(out, embed_dim=e, num_classes=len(classes), num_attributes=k)
        except BadInputError as err:
            raise BadInputError(f"{err} (the cached bank of {source}: delete it to cluster again)") from None
        if meta_path.is_file():
            try:
                recorded = json.loads(meta_path.read_text()).get("key")
            except (OSError, json.JSONDecodeError, AttributeError):
                recorded = None
            if recorded is not None and recorded != key:
                raise BadInputError(f"{out} was built from other inputs (its {meta_path.name} records key "
                                    f"{recorded[:16]}...); move both files away to cluster again")
        _logger.info("attribute bank: loaded the cached %s (k=%d, from %s)", out, k, source)
        return BankResult(bank=bank, membership=membership, path=out, source="cache")
    if clip_model is None:
        raise ValueError("clustering a descriptions JSON needs the run's CLIP model")
    from ..models.text import get_tokenizer  # lazy: open_clip is slow to import

    t0 = time.time()
    bank, membership = build_attribute_bank(desc, clip_model, get_tokenizer(cfg.clip.model_name), k,
                                            seed=KMEANS_SEED)
    with atomic_write(out) as tmp:
        torch.save([bank, membership], tmp)
    meta = {"key": key, "bank_version": BANK_VERSION, "descriptions": str(source), "k": k, "seed": KMEANS_SEED,
            "n_init": KMEANS_N_INIT,
            "clip": {"model_name": cfg.clip.model_name, "pretrained": cfg.clip.pretrained,
                     "weights": cfg.clip.weights, "precision": cfg.clip.precision, "config_hash": clip_identity(cfg)},
            "device": str(next(clip_model.parameters()).device), "dataset": cfg.data.dataset,
            "classes": list(classes), "sentences": n_sent, "shape": list(bank.shape),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        import sklearn

        meta["sklearn"] = sklearn.__version__
    except ImportError:  # pragma: no cover - build_attribute_bank needed it
        pass
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    _logger.info("attribute bank: clustered %d sentences of %d classes into %d attributes in %.1fs -> %s",
                 n_sent, len(classes), k, time.time() - t0, out)
    return BankResult(bank=bank, membership=membership, path=out, source="built")


def attribute_bank_for(cfg: Any, clip_model: nn.Module) -> torch.Tensor:
    """The ``(E, k)`` attribute bank that ``cfg.cam.descriptors`` names, for the CAM source (cache-aware).

    What ``build.py`` calls when ``cam.descriptors`` is set: a bank file is loaded and checked; a descriptions
    JSON is clustered once per (content, CLIP, k) and then read from ``runs/<dataset>/<run>/bank/``.
    """
    return cached_attribute_bank(cfg, clip_model).bank


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def _parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stage1_cam.cams.bank",
                                description="ExCEL's attribute bank (TSE): cluster class descriptions with the "
                                            "run's CLIP (cached in the run directory), or check a released bank")
    add_config_args(p, overwrite=False)  # uses clip, cam.num_attributes, data.dataset and run of the config
    p.add_argument("--descriptions", metavar="FILE",
                   help="class-descriptions JSON {class: [sentences]} or ExCEL's *_embedding_bank.pth "
                        "(default: cam.descriptors)")
    p.add_argument("-k", "--num-attributes", type=int, help="clusters (default: cam.num_attributes)")
    p.add_argument("--write-synthetic", action="store_true",
                   help="first write the synthetic world's descriptions to FILE (synthetic dataset only; an "
                        "existing different file is refused)")
    return p.parse_args(argv)


def _main(args: argparse.Namespace) -> int:
    extra: Dict[str, Any] = {}
    if args.num_attributes is not None:
        extra["cam.num_attributes"] = args.num_attributes
    if args.descriptions:
        extra["cam.descriptors"] = args.descriptions
    cfg = load_config(args.config, config_overrides(args, extra))
    source = cfg.cam.descriptors
    if args.write_synthetic:
        if not source or is_bank_file(source):
            raise BadInputError("--write-synthetic writes a JSON: give --descriptions FILE.json")
        if cfg.data.dataset != "synthetic":
            raise BadInputError(f"--write-synthetic describes the synthetic world, but {args.config} has "
                                f"data.dataset={cfg.data.dataset!r}; drop the flag and give your own descriptions")
        from ..data.descriptions import write_synthetic_descriptions

        write_synthetic_descriptions(source, template=cfg.clip.template)
        _logger.info("synthetic descriptions in %s", source)
    clip_model = None
    if source and not is_bank_file(source):
        # the file's own errors come before the CLIP is built
        match_classes(load_descriptions(source), get_classes(cfg.data.dataset)[1:], source)
        from ..models import load_clip  # lazy: open_clip is slow to import

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        clip_model = load_clip(cfg.clip.model_name, pretrained=cfg.clip.pretrained, weights=cfg.clip.weights,
                               precision=cfg.clip.precision, device=device)
    result = cached_attribute_bank(cfg, clip_model)
    print(f"attribute bank ({result.source}): {result.path} {tuple(result.bank.shape)}")
    _logger.info("use it: --cfg-options cam.source=excel_svc cam.descriptors=%s", source)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: 0 on success, 2 on bad input (one line naming the file and the fix)."""
    args = _parse_args(argv)
    setup_logging()
    return run_main(_main, args, logger=_logger)


if __name__ == "__main__":  # as the package's module, whose logger is named after it (not "__main__")
    from stage1_cam.cams.bank import main as package_main

    raise SystemExit(package_main())
