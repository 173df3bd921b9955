"""Attribute-bank files and clustering for ExCEL's TSE (reference_spec 4.4): pure functions, no config, no cache.

- :func:`load_descriptions` / :func:`match_classes`: a class-descriptions JSON ``{class: [sentences]}`` keyed by the
  dataset's class names;
- :func:`load_bank_file`: ExCEL's released ``*_embedding_bank.pth`` (``[bank (E, k), membership (C, k)]``), checked;
- :func:`build_attribute_bank`: KMeans over the sentences' CLIP text embeddings.

The run-directory cache and the command (``python -m stage1_cam.cams.bank``) are in :mod:`stage1_cam.cams.bank`.
Every error the user can fix is a :class:`~stage1_cam.utils.cli.BadInputError` naming the file.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils.cli import BadInputError

_logger = logging.getLogger(__name__)

BANK_SUFFIXES = (".pth", ".pt")  # cam.descriptors with these suffixes is a bank file, anything else a JSON
KMEANS_SEED = 0  # ExCEL's random_state
# One k-means++ run: scikit-learn's default since 1.4 (setup.cfg needs >= 1.4), written out so that a later default
# cannot change the banks. The reference's era defaulted to 10 runs, so a bank rebuilt from ExCEL's descriptions can
# differ from its released *_embedding_bank.pth: load that file for parity.
KMEANS_N_INIT = 1


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------


def is_bank_file(path: Union[str, Path]) -> bool:
    """Whether ``cam.descriptors`` names a bank file (``.pth``/``.pt``) rather than a descriptions JSON."""
    return str(path).lower().endswith(BANK_SUFFIXES)


def load_descriptions(path: Union[str, Path]) -> Dict[str, List[str]]:
    """Read a descriptions JSON ``{class name: [sentence, ...]}`` (ExCEL's GPT-4 descriptors format).

    Raises:
        FileNotFoundError: no such file.
        BadInputError: not JSON, or not an object of non-empty lists of non-empty strings.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class descriptions file {path} not found (a JSON {{class: [sentences]}}, or "
                                f"ExCEL's *_embedding_bank.pth); check cam.descriptors / --descriptions")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path} is not a JSON file ({e}); expected {{class: [sentences]}}") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(s, str) for s in v)
                                             for v in data.values()):
        raise BadInputError(f"{path}: expected a JSON object mapping class names to lists of sentences, "
                            f'e.g. {{"cat": ["a clean origami cat. it has whiskers.", ...], ...}}')
    empty = [k for k, v in data.items() if not v or not all(s.strip() for s in v)]
    if empty:
        raise BadInputError(f"{path}: classes without sentences or with empty sentences: {', '.join(empty)}; "
                            f"give every class at least one non-empty sentence")
    return {str(k): list(v) for k, v in data.items()}


def _norm_name(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.lower())


def match_classes(descriptions: Dict[str, List[str]], classes: Sequence[str], source: Union[str, Path]
                  ) -> Dict[str, List[str]]:
    """The descriptions keyed by the dataset's class names, in label order.

    Args:
        descriptions: ``{class: [sentences]}`` as read.
        classes: the dataset's foreground class names (label order, background excluded).
        source: the file, for messages.

    Raises:
        BadInputError: classes missing, extra, or given twice (names compared without case, spaces, ``_``, ``-``).
    """
    by_norm: Dict[str, str] = {}
    twice = []
    for key in descriptions:
        n = _norm_name(key)
        if n in by_norm:
            twice.append(f"{by_norm[n]!r}/{key!r}")
        by_norm[n] = key
    wanted = {_norm_name(c): c for c in classes}
    missing = [c for n, c in wanted.items() if n not in by_norm]
    extra = [k for n, k in by_norm.items() if n not in wanted]
    if missing or extra or twice:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                ([f"not classes of the dataset: {', '.join(extra)}"] if extra else []) + \
                ([f"given twice: {', '.join(twice)}"] if twice else [])
        raise BadInputError(f"{source}: the class names do not match the dataset's {len(classes)} foreground "
                            f"classes ({'; '.join(parts)}). Use exactly these keys: {', '.join(classes)}")
    return {c: list(descriptions[by_norm[n]]) for n, c in wanted.items()}


def load_bank_file(path: Union[str, Path], *, embed_dim: Optional[int] = None, num_classes: Optional[int] = None,
                   num_attributes: Optional[int] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Load and check an attribute bank file: ExCEL's ``*_embedding_bank.pth`` or a bare ``(E, k)`` tensor.

    ExCEL's format is a list of two float32 tensors ``[bank (E, k), membership (C, k)]`` (VOC: ``(512, 112)``
    and ``(20, 112)``); read with ``torch.load(weights_only=True)``.

    Args:
        path: the file.
        embed_dim: the CLIP embedding size ``E`` the bank must have (checked when given).
        num_classes: the number of foreground classes ``C`` of the membership (checked when given).
        num_attributes: the number of clusters ``k`` (checked when given).

    Returns:
        bank ``(E, k)`` float32 and membership ``(C, k)`` float32 (None for a bare tensor).

    Raises:
        FileNotFoundError: no such file.
        BadInputError: unreadable, another structure, wrong shapes or non-finite values (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"attribute bank {path} not found; build one from a descriptions JSON with "
                                f"`python -m stage1_cam.cams.bank CONFIG --descriptions FILE.json`, or point "
                                f"cam.descriptors at an existing file")
    fmt = "ExCEL's *_embedding_bank.pth format: a list of two float tensors [bank (E, k), membership (C, k)]"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # not a torch file, or objects weights_only refuses
        raise BadInputError(f"{path} cannot be read by torch.load(weights_only=True) ({type(e).__name__}: not a "
                            f"torch file, or it holds more than tensors); expected {fmt}") from None
    if isinstance(obj, torch.Tensor):
        bank, membership = obj, None
    elif isinstance(obj, (list, tuple)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj):
        bank, membership = obj
    else:
        what = f"a {type(obj).__name__}" + (f" of {len(obj)}" if isinstance(obj, (list, tuple, dict)) else "")
        raise BadInputError(f"{path} holds {what}; expected {fmt}")
    if bank.ndim != 2 or not bank.is_floating_point():
        raise BadInputError(f"{path}: the bank is a {bank.dtype} tensor of shape {tuple(bank.shape)}; expected {fmt}")
    if not torch.isfinite(bank).all():
        raise BadInputError(f"{path}: the bank holds NaN or infinite values; rebuild it")
    if embed_dim is not None and bank.shape[0] != embed_dim:
        hint = " (it looks transposed: ExCEL stores the centres as columns)" if bank.shape[1] == embed_dim else ""
        raise BadInputError(f"{path}: the bank is {tuple(bank.shape)} but the CLIP model's embeddings have "
                            f"E={embed_dim} dimensions{hint}; use a bank made with this CLIP (clip.model_name), "
                            f"or build one from a descriptions JSON")
    k = bank.shape[1]
    if num_attributes is not None and k != num_attributes:
        raise BadInputError(f"{path}: the bank has k={k} attributes, expected {num_attributes}")
    if membership is not None:
        if membership.ndim != 2 or membership.shape[1] != k or not membership.is_floating_point():
            raise BadInputError(f"{path}: the membership is a {membership.dtype} tensor of shape "
                                f"{tuple(membership.shape)}, expected (C, {k}) float to go with the bank "
                                f"{tuple(bank.shape)}; {fmt}")
        if num_classes is not None and membership.shape[0] != num_classes:
            raise BadInputError(f"{path}: the membership has {membership.shape[0]} class rows but the dataset has "
                                f"{num_classes} foreground classes; use the bank of this dataset (ExCEL: VOC "
                                f"(20, 112), COCO (80, 224))")
        membership = membership.float()
    return bank.float(), membership


def load_attribute_bank(path: Union[str, Path], *, embed_dim: Optional[int] = None,
                        num_classes: Optional[int] = None) -> torch.Tensor:
    """The bank ``(E, k)`` of a bank file (see :func:`load_bank_file`)."""
    return load_bank_file(path, embed_dim=embed_dim, num_classes=num_classes)[0]


# ----------------------------------------------------------------------------------------------------
# Clustering
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def build_attribute_bank(descriptions: Dict[str, Sequence[str]], clip_model: nn.Module,
                         tokenizer: Callable[..., torch.Tensor], n_attr: int, seed: int = KMEANS_SEED,
                         batch_size: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cluster the L2-normalised CLIP text embeddings of class descriptions into an attribute bank.

    ``sklearn.cluster.KMeans(n_clusters=n_attr, random_state=seed)`` on all sentences (ExCEL's
    ``attr_clustering``; the reference used ``random_state=0``). Not cached: see :func:`cached_attribute_bank`.

    Args:
        descriptions: class name -> description sentences (class order = dict order).
        clip_model: open_clip CLIP model (text tower used, no gradients).
        tokenizer: its tokenizer.
        n_attr: number of clusters (ExCEL: 112 for VOC, 224 for COCO).
        seed: KMeans random state.
        batch_size: sentences per text-tower batch.

    Returns:
        bank ``(E, n_attr)`` float32 (cluster centres as columns) and membership ``(C, n_attr)`` float32
        (one-hot: the class holding most of each cluster's sentences).
    """
    try:
        from sklearn.cluster import KMeans
    except ImportError as e:
        raise ImportError("build_attribute_bank needs scikit-learn (pip install 'scikit-learn>=1.4')") from e
    sentences: List[str] = []
    owner: List[int] = []
    for ci, sents in enumerate(descriptions.values()):
        sentences.extend(str(s) for s in sents)
        owner.extend([ci] * len(sents))
    if n_attr < 1 or n_attr > len(sentences):
        raise BadInputError(f"n_attr={n_attr} clusters need between 1 and {len(sentences)} (the number of "
                            f"sentences); lower cam.num_attributes (-k) or add sentences")
    device = next(clip_model.parameters()).device
    chunks = []
    truncated = 0
    for i in range(0, len(sentences), batch_size):
        ids = tokenizer(sentences[i:i + batch_size]).to(device)
        truncated += int((ids[:, -1] != 0).sum())  # open_clip puts the end token last when it cuts a sentence
        chunks.append(F.normalize(clip_model.encode_text(ids).float(), dim=-1).cpu())
    if truncated:
        _logger.warning("%d of %d sentences are longer than the text tower's context (%d tokens) and were cut",
                        truncated, len(sentences), ids.shape[1])
    emb = torch.cat(chunks).numpy().astype(np.float64)
    km = KMeans(n_clusters=n_attr, random_state=seed, n_init=KMEANS_N_INIT).fit(emb)
    bank = torch.from_numpy(km.cluster_centers_.T.copy()).float()
    owner_arr = np.asarray(owner)
    membership = torch.zeros((len(descriptions), n_attr), dtype=torch.float32)
    for c in range(n_attr):
        members = owner_arr[km.labels_ == c]
        membership[int(np.bincount(members, minlength=len(descriptions)).argmax()), c] = 1.0
    return bank, membership
