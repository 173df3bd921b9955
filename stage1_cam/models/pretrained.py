"""CLIP weights: lookup and strict loading of an open_clip model (reference_spec 1.2).

Kept apart from the block-by-block image tower (:mod:`stage1_cam.models.clip_backbone`), as open_clip keeps its
``pretrained.py`` apart from its ``transformer.py``.

:func:`load_clip` builds an open_clip CLIP model and resolves its weights offline-first
(:func:`resolve_clip_weights`): an explicit file (``"world:<preset>"`` names the synthetic world's CLIP,
:mod:`stage1_cam.models.world_weights`), then ``$WSSS_CLIP_WEIGHTS``, then the open_clip / Hugging Face caches,
and only then a download (never when ``HF_HUB_OFFLINE`` is set). OpenAI TorchScript checkpoints (``ViT-B-16.pt``)
and open_clip state dicts are both accepted and loaded strictly; a file that cannot hold weights, or whose weights
do not fit the model, is refused with a message that names it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import warnings
import zipfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..constants import ENV_CLIP_WEIGHTS
from ..utils.cli import BadInputError
from ..utils.files import check_torch_file
from .model_configs import register_model_configs
from .world_weights import WORLD_SCHEME, resolve_world_weights

_logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
# Keys of OpenAI TorchScript checkpoints that are not parameters of the open_clip model.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_TRUE = {"1", "true", "yes", "on"}

RANDOM_INIT_SEED = 0  # seed of randomly initialised CLIPs (pretrained=None)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _hf_hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(hf_home).expanduser() / "hub"


def _url_cache_dir() -> Path:
    # open_clip's default for URL downloads (pretrained.download_pretrained_from_url).
    return Path("~/.cache/clip").expanduser()


def _sha256_prefix_from_url(url: str) -> str:
    """The checksum open_clip expects for a URL download ('' when the URL carries none)."""
    if "openaipublic" in url:
        return url.split("/")[-2]
    if "mlfoundations" in url:
        return os.path.splitext(os.path.basename(url))[0].split("-")[-1]
    return ""


def _sha256_matches(path: Path, prefix: str) -> bool:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest().startswith(prefix)


def _hf_candidates(hf_hub: str) -> List[Tuple[str, str]]:
    """(repo_id, filename) pairs open_clip would fetch for a pretrained config's ``hf_hub`` entry."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    # Same convention as open_clip: "org/repo/file.bin", or "org/repo/" for the default file name.
    repo_id, filename = os.path.split(hf_hub)
    filename = filename or HF_WEIGHTS_NAME
    names = []
    if filename == HF_WEIGHTS_NAME:
        names.append(HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        names.append(filename[:-4] + ".safetensors")
    names.append(filename)
    return [(repo_id, n) for n in names]


def _find_in_caches(pcfg: Dict[str, Any], cache_dir: Optional[str]) -> Tuple[Optional[str], List[str]]:
    """Look for a pretrained config's checkpoint in the local caches only (never touches the network).

    Returns:
        (path or None, human-readable list of the places looked at).
    """
    looked: List[str] = []
    if pcfg.get("file"):
        looked.append(str(pcfg["file"]))
        if os.path.isfile(pcfg["file"]):
            return str(pcfg["file"]), looked
    url = pcfg.get("url", "")
    if url:
        dirs = [Path(cache_dir).expanduser()] if cache_dir else []
        dirs.append(_url_cache_dir())
        sha = _sha256_prefix_from_url(url)
        for d in dirs:
            target = d / os.path.basename(url)
            looked.append(str(target))
            if target.is_file():
                if not sha or _sha256_matches(target, sha):
                    return str(target), looked
                _logger.warning("ignoring %s: its sha256 does not start with %s (truncated download?)", target, sha)
    hf_hub = pcfg.get("hf_hub", "")
    if hf_hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - huggingface_hub ships with open_clip
            try_to_load_from_cache = None
        hub_dirs = [Path(cache_dir).expanduser()] if cache_dir else []
        hub_dirs.append(_hf_hub_cache_dir())
        for d in hub_dirs:
            for repo_id, filename in _hf_candidates(hf_hub):
                looked.append(f"{d}/models--{repo_id.replace('/', '--')} ({filename})")
                if try_to_load_from_cache is None:
                    continue
                found = try_to_load_from_cache(repo_id, filename, cache_dir=str(d))
                if isinstance(found, str) and os.path.isfile(found):
                    return found, looked
    return None, looked


def _pretrained_cfg(model_name: str, tag: str) -> Dict[str, Any]:
    import open_clip

    pcfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not pcfg and model_name.endswith("-quickgelu"):
        pcfg = open_clip.get_pretrained_cfg(model_name[: -len("-quickgelu")], tag)
    return dict(pcfg or {})


def _missing_weights_error(model_name: str, tag: str, pcfg: Dict[str, Any], looked: Sequence[str],
                           reason: str) -> FileNotFoundError:
    url = pcfg.get("url", "")
    fname = os.path.basename(url) if url else (pcfg.get("hf_hub", "").rstrip("/").split("/")[-1] or "<weights file>")
    sha = _sha256_prefix_from_url(url) if url else ""
    what = f"{fname} (sha256 {sha[:8]}...)" if sha else fname
    if url:
        source = f" from {url}"
    elif pcfg.get("hf_hub"):
        source = f" from the Hugging Face hub repo {pcfg['hf_hub']}"
    else:
        source = ""
    return FileNotFoundError(
        f"No weights for CLIP {model_name!r} (pretrained={tag!r}): {reason}. Expected the checkpoint {what} in one of: "
        f"{'; '.join(looked) or '(no cache location known)'}. Download it{source} on a machine with network access "
        f"and set {ENV_CLIP_WEIGHTS}=/path/{fname} (or pass `weights=` / clip.weights in the config), or allow the "
        f"download here (network access and HF_HUB_OFFLINE unset)."
    )


def resolve_clip_weights(model_name: str, pretrained: Optional[str], weights: Optional[str] = None, *,
                         cache_dir: Optional[str] = None) -> Optional[str]:
    """Find the weights file for a CLIP model, offline-first.

    Order: ``weights`` (explicit), ``$WSSS_CLIP_WEIGHTS``, ``pretrained`` if it is a file path, the
    open_clip URL cache (``~/.cache/clip``) and the Hugging Face hub cache for the open_clip tag
    ``pretrained``, then a download through open_clip unless ``HF_HUB_OFFLINE`` is set.

    Args:
        model_name: open_clip architecture name (e.g. ``"ViT-B-16"``).
        pretrained: open_clip pretrained tag (e.g. ``"openai"``) or a file path; ``None`` means random
            initialisation (the environment variable is then ignored too).
        weights: explicit weights file; wins over everything else. ``"world:<preset>"`` names the
            synthetic world's CLIP trained by ``make world``
            (:func:`~stage1_cam.models.world_weights.resolve_world_weights`).
        cache_dir: extra cache folder searched first (and used for downloads).

    Returns:
        The weights path, or ``None`` for a random initialisation.

    Raises:
        FileNotFoundError: a named file does not exist, or no weights can be found or downloaded.
        ValueError: ``pretrained`` is neither a file nor a tag known to open_clip for this model.
    """
    if weights and str(weights).startswith(WORLD_SCHEME):
        # The synthetic world's CLIP trained in-repo (`make world`): "world:<preset>" names its cache entry.
        return resolve_world_weights(str(weights), model_name)
    if weights:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"CLIP weights file {weights!r} (the `weights` argument / clip.weights) does not "
                                    f"exist; fix the path or unset it to use ${ENV_CLIP_WEIGHTS} or the cache")
        return str(weights)
    if pretrained is None:
        return None
    env = os.environ.get(ENV_CLIP_WEIGHTS, "").strip()
    if env:
        if not os.path.isfile(env):
            raise FileNotFoundError(f"${ENV_CLIP_WEIGHTS}={env!r} does not point to a file; fix or unset it")
        return env
    if os.path.isfile(pretrained):
        return str(pretrained)
    import open_clip

    pcfg = _pretrained_cfg(model_name, pretrained)
    if not pcfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise BadInputError(f"pretrained={pretrained!r} is neither a file nor an open_clip tag for {model_name!r}; "
                            f"valid tags: {', '.join(tags) or '(none)'}; or set {ENV_CLIP_WEIGHTS}=/path/to/weights")
    found, looked = _find_in_caches(pcfg, cache_dir)
    if found:
        _logger.info("using cached CLIP weights %s", found)
        return found
    if _hub_offline():
        raise _missing_weights_error(model_name, pretrained, pcfg, looked, "not in any cache and HF_HUB_OFFLINE is set")
    from open_clip.pretrained import download_pretrained

    _logger.info("downloading CLIP weights for %s (%s)", model_name, pretrained)
    try:
        path = download_pretrained(pcfg, cache_dir=cache_dir)
    except Exception as e:  # network errors come in many types (URLError, HTTPError, hub errors, ...)
        raise _missing_weights_error(model_name, pretrained, pcfg, looked, f"download failed ({e})") from e
    if not path or not os.path.isfile(path):
        raise _missing_weights_error(model_name, pretrained, pcfg, looked, "open_clip returned no file")
    return str(path)


def _is_torchscript_archive(path: str) -> bool:
    """OpenAI's released checkpoints are TorchScript zip archives (they hold a ``constants.pkl`` record)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in zf.namelist())


@contextmanager
def drop_open_clip_random_init_warning() -> Iterator[None]:
    """Hide open_clip's "initialized randomly" warning while building a model we load right after."""

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    flt = _Filter()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


_WEIGHTS_FIX = ("point clip.weights / ${env} at an OpenAI .pt or an open_clip state dict, or delete the file and "
                "download it again").format(env=ENV_CLIP_WEIGHTS)


def _load_weights(model: nn.Module, path: str, model_name: str) -> None:
    """Load a checkpoint strictly into an open_clip model (TorchScript or state dict).

    Raises:
        BadInputError: the file is empty, unreadable or truncated (not a checkpoint), or its weights do not fit
            ``model_name``; the message names the file.
    """
    import open_clip

    # empty or foreign files refused up front; open_clip's other formats are read by their own loaders
    check_torch_file(path, what="CLIP weights file", fix=_WEIGHTS_FIX,
                     magic=not (zipfile.is_zipfile(path) or path.endswith((".safetensors", ".npz", ".npy"))))
    try:
        if _is_torchscript_archive(path):
            # torch.load(weights_only=True) refuses TorchScript archives; jit.load reads them without pickle.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning)  # "torch.jit.load is deprecated"
                scripted = torch.jit.load(path, map_location="cpu")
            # Traced/scripted archives also store non-persistent buffers (e.g. the text attn_mask).
            skip = set(_OPENAI_EXTRA_KEYS) | ({n for n, _ in model.named_buffers()} - set(model.state_dict()))
            state = {k: v for k, v in scripted.state_dict().items() if k not in skip}
            if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
                state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
            model.load_state_dict(state, strict=True)
        else:
            open_clip.load_checkpoint(model, path, strict=True, weights_only=True, device="cpu")
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as e:
        raise BadInputError(f"could not read CLIP weights {path} (expected an OpenAI .pt or an open_clip state dict "
                            f"loadable with weights_only=True; a truncated file?): {e}; {_WEIGHTS_FIX}") from e
    except (RuntimeError, KeyError) as e:
        if _is_read_error(e):
            raise BadInputError(f"could not read CLIP weights {path} (a truncated or damaged file?): {e}; "
                                f"{_WEIGHTS_FIX}") from e
        raise BadInputError(f"CLIP weights {path} do not fit model {model_name!r} (strict loading): {e}; use the "
                            f"weights of clip.model_name={model_name!r} or set clip.model_name to theirs") from e


def _is_read_error(err: BaseException) -> bool:
    """Whether a RuntimeError from torch.load means the file is damaged (not that its weights do not fit)."""
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("PytorchStreamReader", "failed finding central directory", "invalid header",
                            "archive is corrupt", "unexpected EOF", "Invalid magic number",
                            "file not found in archive"))


def load_clip(model_name: str = "ViT-B-16", *, pretrained: Optional[str] = "openai", weights: Optional[str] = None,
              precision: str = "fp32", device: Union[str, torch.device] = "cpu",
              cache_dir: Optional[str] = None) -> nn.Module:
    """Build an open_clip CLIP model with frozen weights, in eval mode.

    Args:
        model_name: open_clip architecture (``"ViT-B-16"``) or an in-repo config name
            (``stage1_cam/model_configs``, e.g. ``"wsss-tiny-ViT-16"``).
        pretrained: open_clip pretrained tag or file; ``None`` gives a random initialisation (tests, demo).
        weights: explicit weights file (wins over ``$WSSS_CLIP_WEIGHTS`` and the caches).
        precision: ``fp32`` | ``fp16`` | ``bf16``; low precision casts the weights the way OpenAI does
            (linear/conv weights and projections; LayerNorm computes in fp32). Meant for GPUs.
        device: device for the weights.
        cache_dir: extra cache folder (see :func:`resolve_clip_weights`).

    Returns:
        The open_clip ``CLIP`` model, ``eval()``, all parameters ``requires_grad=False``.

    Raises:
        BadInputError: unknown model name / precision / tag, or a weights file that is not readable or does not
            fit the model (the message names it).
        FileNotFoundError: weights are needed but none can be found (the message says how to get them).
    """
    import open_clip

    register_model_configs()
    if precision not in PRECISIONS:
        raise BadInputError(f"unknown CLIP precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if open_clip.get_model_config(model_name) is None:
        raise BadInputError(f"unknown CLIP model {model_name!r}; valid: {', '.join(open_clip.list_models())}")
    path = resolve_clip_weights(model_name, pretrained, weights, cache_dir=cache_dir)
    # OpenAI checkpoints were trained with QuickGELU; open_clip's plain "ViT-B-16" config uses nn.GELU.
    quick_gelu = bool(pretrained and _pretrained_cfg(model_name, pretrained).get("quick_gelu", False))
    if path is not None and _is_torchscript_archive(path):
        quick_gelu = True
    ctx = drop_open_clip_random_init_warning() if path is not None else nullcontext()
    # A randomly initialised CLIP (tests, demo) must be the same model in every process that builds it
    # (training, dump, CAMs, every DDP rank): initialise it from a fixed seed without touching global RNGs.
    with ctx, torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = open_clip.create_model(model_name, pretrained=None, precision=precision, device=device,
                                       force_quick_gelu=quick_gelu)
    if path is not None:
        _load_weights(model, path, model_name)
        _logger.info("loaded CLIP %s weights from %s (quick_gelu=%s, %s)", model_name, path, quick_gelu, precision)
    else:
        _logger.info("CLIP %s randomly initialised (pretrained=None)", model_name)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
