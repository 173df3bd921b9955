"""Frozen open_clip image encoder run block by block (reference_spec 1.2, 7.1 item 11).

:func:`load_clip` builds an open_clip CLIP model and resolves its weights offline-first:
an explicit file, then ``$WSSS_CLIP_WEIGHTS``, then the open_clip / Hugging Face caches, and only then a
download (never when ``HF_HUB_OFFLINE`` is set). OpenAI TorchScript checkpoints (``ViT-B-16.pt``) and
open_clip state dicts are both accepted and loaded strictly.

:class:`FrozenClipBackbone` wraps the model's image tower. It re-implements the residual attention block
on top of the block's own weights, so that every block's tokens *and* head-averaged softmax attention
come out of one pass. Differences from the reference encoder (``WeCLIP/clip/model.py``), all deliberate:

- the number of blocks to run is an explicit argument (the reference chose 11 or 12 blocks with the
  ``x.shape[0] == 77`` test, which misfires for images with exactly 76 patches);
- tokens are batch-first ``(B, L, D)`` with the CLS token first;
- the positional embedding is interpolated bilinearly (align_corners=False) from the pretrained grid to
  ``(H // p, W // p)`` once per input size and cached, instead of on every forward;
- attention logits and the softmax are computed in float32 whatever the weight precision (the reference
  also ran its attention in fp32 and returned fp32 maps).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import warnings
import zipfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..constants import ENV_CLIP_WEIGHTS
from ..utils.cli import BadInputError
from .model_configs import MODEL_CONFIG_DIR, register_model_configs  # noqa: F401  (re-exported)
from .world_weights import WORLD_SCHEME, resolve_world_weights

_logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
# Keys of OpenAI TorchScript checkpoints that are not parameters of the open_clip model.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_TRUE = {"1", "true", "yes", "on"}
_POS_CACHE_SIZE = 16

RANDOM_INIT_SEED = 0  # seed of randomly initialised CLIPs (pretrained=None)


# ----------------------------------------------------------------------------------------------------
# Weight resolution
# ----------------------------------------------------------------------------------------------------


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


def _check_weights_file(path: str) -> None:
    """Refuse a file that cannot hold weights (empty, or neither a zip archive nor a pickle) before torch reads it.

    Raises:
        BadInputError: naming the file and the fix.
    """
    size = os.path.getsize(path)
    if size == 0:
        raise BadInputError(f"CLIP weights file {path} is empty (0 bytes; an interrupted download or copy?); "
                            f"{_WEIGHTS_FIX}")
    if zipfile.is_zipfile(path) or path.endswith((".safetensors", ".npz", ".npy")):
        return  # torch.save archives (and open_clip's other formats) are read by their own loaders
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] != b"\x80" and head != b"PK":  # a pickle (legacy torch.save) or a (damaged) zip archive
        raise BadInputError(f"CLIP weights file {path} ({size} bytes) is not a PyTorch checkpoint (neither a "
                            f"torch.save zip archive nor a pickle); {_WEIGHTS_FIX}")


def _load_weights(model: nn.Module, path: str, model_name: str) -> None:
    """Load a checkpoint strictly into an open_clip model (TorchScript or state dict).

    Raises:
        BadInputError: the file is empty, unreadable or truncated (not a checkpoint), or its weights do not fit
            ``model_name``; the message names the file.
    """
    import open_clip

    _check_weights_file(path)
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


# ----------------------------------------------------------------------------------------------------
# Block-by-block image tower
# ----------------------------------------------------------------------------------------------------


@dataclass
class ClipFeatures:
    """Per-block outputs of the image tower.

    Attributes:
        tokens: one ``(B, L, D)`` tensor per block run (L = 1 + h*w, CLS first).
        attn: one ``(B, L, L)`` float32 head-averaged softmax attention per block (rows sum to 1).
        grid: the patch grid ``(h, w)``.
    """

    tokens: List[torch.Tensor]
    attn: List[torch.Tensor]
    grid: Tuple[int, int]


class BlockOutput(NamedTuple):
    """Output of one residual attention block.

    Attributes:
        tokens: ``(B, L, D)`` block output.
        attn: ``(B, L, L)`` float32 head-averaged attention, or ``None`` when not requested.
        normed: ``(B, L, D)`` output of the block's ``ln_1`` (the normalised input to its attention;
            GradCAM's target layer).
        qkv: per-head queries, keys and values ``(B, H, L, D / H)`` projected from ``normed``.
    """

    tokens: torch.Tensor
    attn: Optional[torch.Tensor]
    normed: torch.Tensor
    qkv: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None


def qkv_heads(block: nn.Module, x_normed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project a block's normalised input to per-head queries, keys and values with its own in_proj.

    Args:
        block: an open_clip ``ResidualAttentionBlock`` (``nn.MultiheadAttention`` inside).
        x_normed: ``(B, L, D)`` output of ``block.ln_1``.

    Returns:
        q, k, v: each ``(B, H, L, D / H)``, in the weights' dtype.
    """
    mha = block.attn
    b, n, d = x_normed.shape
    heads = mha.num_heads
    qkv = F.linear(x_normed, mha.in_proj_weight, mha.in_proj_bias)
    qkv = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def qkv_mean_grads_to_input(block: nn.Module, means: Sequence[torch.Tensor]) -> torch.Tensor:
    """Token mean of the gradient w.r.t. a block's ``ln_1`` output, from the token means of the q, k, v gradients.

    ``q_i = W_q x_i + b_q`` (likewise k, v), so ``dx_i = W_q^T dq_i + W_k^T dk_i + W_v^T dv_i`` and the mean over
    tokens is ``W_q^T mean_i dq_i + ...``: three ``(B, D) x (D, D)`` products instead of the ``(B, L, 3D) x (3D, D)``
    input-gradient product. Same value up to float rounding.

    Args:
        means: token means of the gradients of ``q, k, v``, each ``(B, H, D / H)`` (heads as in :func:`qkv_heads`).

    Returns:
        ``(B, D)`` float32.
    """
    total = None
    for m, w in zip(means, block.attn.in_proj_weight.chunk(3)):
        b, h, hd = m.shape
        part = m.float().reshape(b, h * hd) @ w.float()  # heads concatenated as in qkv_heads
        total = part if total is None else total + part
    return total


class AttentionForGrads(NamedTuple):
    """A softmax attention evaluated without autograd, with what :func:`attention_qkv_grad_means` needs.

    Attributes:
        probs: ``(B, H, L, L)`` float32 probabilities.
        out: ``(B, H, L, hd)`` float32 output ``probs @ v``.
        out_skip: ``(B, H, L, hd)`` float32 ``probs[..., skip:] @ v[:, :, skip:]`` (the output without the
            leading ``skip`` key tokens; ``out`` is it plus their rank-``skip`` term).
        skip: number of leading tokens (1: CLS).
    """

    probs: torch.Tensor
    out: torch.Tensor
    out_skip: torch.Tensor
    skip: int


@torch.no_grad()
def attention_for_grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, skip: int = 1) -> AttentionForGrads:
    """Softmax attention (float32, no autograd) keeping probabilities and the output without the CLS keys.

    On a CPU it runs one image at a time (the ``(H, L, L)`` probabilities stay in cache, as in
    :func:`attention_with_maps`).

    Args:
        q, k, v: ``(B, H, L, hd)``.
        skip: leading tokens whose keys are split off in ``out_skip`` (1: CLS).
    """
    step = 1 if q.device.type == "cpu" else max(1, q.shape[0])
    b, h, n, hd = q.shape
    probs = q.new_empty((b, h, n, n), dtype=torch.float32)
    out = q.new_empty((b, h, n, hd), dtype=torch.float32)
    out_skip = torch.empty_like(out)
    for i in range(0, b, step):
        sl = slice(i, i + step)
        p = softmax_attention(q[sl], k[sl])
        vf = v[sl].float()
        part = p[..., skip:] @ vf[:, :, skip:]
        out_skip[sl] = part
        out[sl] = part + p[..., :skip] @ vf[:, :, :skip]
        probs[sl] = p
    return AttentionForGrads(probs, out, out_skip, skip)


def attention_qkv_grad_means(att: AttentionForGrads, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             grad_out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token means (tokens ``>= skip``) of the gradients of q, k, v, from the gradient of the attention output.

    With ``P`` the probabilities, ``dO`` the output gradient, ``s = hd^-0.5``, ``I = J = {skip..L-1}`` and
    ``n = L - skip``, the softmax backward gives ``dS_ij = P_ij (dO_i . v_j - d_i)`` with ``d_i = dO_i . O_i``, and

    - ``mean_J dv = 1/n sum_i c_i dO_i`` with ``c_i = sum_J P_ij``;
    - ``mean_J dk = s/n sum_i (dO_i . O^J_i - d_i c_i) q_i`` with ``O^J_i = sum_J P_ij v_j`` (``att.out_skip``);
    - ``mean_I dq = s/n sum_j (v_j . G_j - e_j) k_j`` with ``G = P_I^T dO_I`` and ``e = P_I^T d_I``.

    Only ``G`` and ``e`` touch the ``L x L`` probabilities: one ``(L, n) x (n, hd + 1)`` product per head, for all
    gradients at once, where autograd's attention backward takes four ``L x L x hd`` products per gradient. Same
    values up to float rounding.

    Args:
        att: the forward from :func:`attention_for_grads`.
        q, k, v: ``(B, H, L, hd)`` of that forward.
        grad_out: ``(S, B, H, L, hd)`` gradients of the output, ``S`` of them (e.g. one per GradCAM class slot).

    Returns:
        ``(mean dq, mean dk, mean dv)``, each ``(S, B, H, hd)`` float32.
    """
    probs, out, out_skip, skip = att
    n_sets, b, h, length, hd = grad_out.shape
    count = length - skip
    scale = hd ** -0.5
    qf, kf, vf = q.float(), k.float(), v.float()
    d_o = grad_out.float()
    delta = (d_o * out).sum(dim=-1)  # (S, B, H, L)
    c = probs[..., skip:].sum(dim=-1)  # (B, H, L)
    mean_v = torch.einsum("bhl,sbhld->sbhd", c, d_o) / count
    row = (d_o * out_skip).sum(dim=-1) - delta * c  # (S, B, H, L): sum_J dS_ij
    mean_k = torch.einsum("sbhl,bhld->sbhd", row, qf) * (scale / count)
    # G and e for every gradient set in one product: P_I^T [dO_I | d_I] over the sets' columns.
    rhs = torch.cat([d_o[..., skip:, :], delta[..., skip:, None]], dim=-1)  # (S, B, H, L - skip, hd + 1)
    rhs = rhs.permute(1, 2, 3, 0, 4).reshape(b, h, count, n_sets * (hd + 1))
    ge = (probs[:, :, skip:].transpose(-2, -1) @ rhs).reshape(b, h, length, n_sets, hd + 1).permute(3, 0, 1, 2, 4)
    col = (vf * ge[..., :hd]).sum(dim=-1) - ge[..., hd]  # (S, B, H, L): sum_I dS_ij
    mean_q = torch.einsum("sbhl,bhld->sbhd", col, kf) * (scale / count)
    return mean_q, mean_k, mean_v


def merge_heads(block: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """Concatenate per-head attention outputs and apply the block's out_proj.

    Args:
        out: ``(B, H, L, D / H)`` (or ``(B, 1, L, D / H)`` broadcast already applied by the caller).

    Returns:
        ``(B, L, D)``.
    """
    b, h, n, hd = out.shape
    out = out.transpose(1, 2).reshape(b, n, h * hd)
    return F.linear(out, block.attn.out_proj.weight, block.attn.out_proj.bias)


def softmax_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention probabilities computed in float32.

    Args:
        q, k: ``(B, H, L, hd)``.

    Returns:
        ``(B, H, L, L)`` float32, rows sum to 1.
    """
    scale = q.shape[-1] ** -0.5
    return torch.softmax((q.float() * scale) @ k.float().transpose(-2, -1), dim=-1)


def attention_with_maps(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the head-averaged attention map.

    Same values as ``softmax_attention`` followed by ``probs @ v`` and a mean over heads. On a CPU it runs
    one image at a time, so the ``(H, L, L)`` probabilities stay in cache (about twice as fast there as one
    ``(B, H, L, L)`` pass, measured at ViT-B/16, 320x320); on a GPU the whole batch goes at once.

    Args:
        q, k, v: ``(B, H, L, hd)``.

    Returns:
        ``(B, H, L, hd)`` attention output in ``v``'s dtype and ``(B, L, L)`` float32 head-averaged probabilities.
    """
    step = 1 if q.device.type == "cpu" else max(1, q.shape[0])
    outs, maps = [], []
    for b in range(0, q.shape[0], step):
        probs = softmax_attention(q[b:b + step], k[b:b + step])  # (step, H, L, L) float32
        outs.append(probs.to(v.dtype) @ v[b:b + step])
        maps.append(probs.mean(dim=1))
    if len(outs) <= 1:  # one pass (a GPU, a single image, or an empty batch)
        if not outs:
            probs = softmax_attention(q, k)
            return probs.to(v.dtype) @ v, probs.mean(dim=1)
        return outs[0], maps[0]
    return torch.cat(outs), torch.cat(maps)


def block_mlp(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP half of a residual block: ``x + ls_2(mlp(ln_2(x)))``; ``x`` is ``(B, L, D)``."""
    return x + block.ls_2(block.mlp(block.ln_2(x)))


class FrozenClipBackbone(nn.Module):
    """The image tower of an open_clip CLIP model, frozen, run block by block.

    It has no trainable parameters and stays in eval mode (``train()`` is a no-op). The wrapped model is
    a registered submodule, so ``.to(device)`` moves it.

    Args:
        clip_model: an open_clip ``CLIP`` whose image tower is a ``VisionTransformer`` with standard
            ``ResidualAttentionBlock`` s (every OpenAI / LAION ViT CLIP).
    """

    def __init__(self, clip_model: nn.Module) -> None:
        super().__init__()
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        visual = getattr(clip_model, "visual", None)
        if not isinstance(visual, VisionTransformer):
            raise ValueError(f"FrozenClipBackbone needs an open_clip ViT image tower, got {type(visual).__name__}")
        if getattr(visual, "attn_pool", None) is not None or visual.proj is None:
            raise ValueError("CLIP image towers with attentional pooling or without a projection are not supported")
        for i, blk in enumerate(visual.transformer.resblocks):
            if not isinstance(blk, ResidualAttentionBlock) or not isinstance(blk.attn, nn.MultiheadAttention) \
                    or not blk.attn._qkv_same_embed_dim or blk.attn.in_proj_weight is None:
                raise ValueError(f"block {i} of the CLIP image tower is not a standard ResidualAttentionBlock with a "
                                 f"packed nn.MultiheadAttention (custom blocks such as qk-norm are not supported)")
        ph, pw = visual.patch_size
        if ph != pw:
            raise ValueError(f"non-square patches {visual.patch_size} are not supported")
        self.clip = clip_model
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.clip.eval()
        self.training = False
        self._pos_cache: Dict[Tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}

    # -- properties -------------------------------------------------------------------------------

    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def blocks(self) -> nn.ModuleList:
        return self.clip.visual.transformer.resblocks

    @property
    def width(self) -> int:
        """Token width D of the image tower."""
        return int(self.visual.conv1.out_channels)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_heads(self) -> int:
        return int(self.blocks[0].attn.num_heads)

    @property
    def patch_size(self) -> int:
        return int(self.visual.patch_size[0])

    @property
    def embed_dim(self) -> int:
        """Dimension E of the joint image-text space (``visual.proj`` columns)."""
        return int(self.visual.proj.shape[1])

    @property
    def logit_scale(self) -> float:
        """``exp(logit_scale)`` of the CLIP model (100 for OpenAI ViT-B/16)."""
        return float(self.clip.logit_scale.detach().float().exp())

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    # -- mode / device bookkeeping ------------------------------------------------------------------

    def train(self, mode: bool = True) -> "FrozenClipBackbone":
        """Always stays in eval mode (the encoder is frozen; dropout/patch-dropout stay off)."""
        return super().train(False)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "FrozenClipBackbone":
        self._pos_cache.clear()  # cached positional embeddings follow the weights' device/dtype
        return super()._apply(fn, *args, **kwargs)

    # -- pieces -------------------------------------------------------------------------------------

    def positional_embedding(self, h: int, w: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The positional embedding for an ``h x w`` patch grid.

        The pretrained grid is resized bilinearly (align_corners=False); the CLS position is kept.

        Returns:
            ``(1 + h*w, D)`` in ``dtype`` (cached per ``(h, w, device, dtype)``).
        """
        key = (h, w, torch.device(device), dtype)
        cached = self._pos_cache.get(key)
        if cached is not None:
            return cached
        pos = self.visual.positional_embedding.detach()
        gh, gw = self.visual.grid_size
        if (h, w) == (gh, gw):
            out = pos
        else:
            grid = pos[1:].float().reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
            out = torch.cat([pos[:1].float(), grid.permute(0, 2, 3, 1).reshape(h * w, -1)], dim=0)
        out = out.to(device=device, dtype=dtype)
        if len(self._pos_cache) >= _POS_CACHE_SIZE:
            self._pos_cache.pop(next(iter(self._pos_cache)))
        self._pos_cache[key] = out
        return out

    def embed(self, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Patch embedding + CLS + positional embedding + ln_pre.

        Args:
            images: ``(B, 3, H, W)`` normalised images; remainder pixels beyond a multiple of the patch
                size are dropped by the stride-p convolution (as in the reference).

        Returns:
            tokens ``(B, 1 + h*w, D)`` and the grid ``(h, w)``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        p = self.patch_size
        if images.shape[2] < p or images.shape[3] < p:
            raise ValueError(f"images of size {tuple(images.shape[2:])} are smaller than one {p}x{p} patch")
        v = self.visual
        x = v.conv1(images.to(dtype=self.dtype))  # (B, D, h, w)
        b, d, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).reshape(1, 1, d).expand(b, 1, d)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding(h, w, device=x.device, dtype=x.dtype)
        return v.ln_pre(x), (h, w)

    def run_block(self, index: int, tokens: torch.Tensor, *, with_attn: bool = True) -> BlockOutput:
        """Run block ``index`` on ``tokens`` with the block's own weights.

        Autograd follows the caller's grad mode (the weights are frozen, so a graph exists only when
        ``tokens`` require grad).

        Args:
            index: block index in ``[0, num_blocks)``; negative indices count from the end.
            tokens: ``(B, L, D)``.
            with_attn: also return the head-averaged attention (otherwise a fused kernel is used).

        Returns:
            :class:`BlockOutput` with ``tokens (B, L, D)``, ``attn (B, L, L)`` or ``None``, ``normed (B, L, D)``
            and the per-head ``qkv``.
        """
        blk = self.blocks[index]
        xn = blk.ln_1(tokens)
        q, k, v = qkv_heads(blk, xn)
        if with_attn:
            out, attn = attention_with_maps(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
            attn = None
        x = tokens + blk.ls_1(merge_heads(blk, out))
        return BlockOutput(block_mlp(blk, x), attn, xn, (q, k, v))

    # -- public forward passes -----------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, images: torch.Tensor, *, num_blocks: Optional[int] = None, with_attn: bool = True,
                attn_from: int = 0) -> ClipFeatures:
        """Run blocks ``0 .. num_blocks - 1`` without gradients.

        Args:
            images: ``(B, 3, H, W)`` normalised images (any size >= one patch; non-square is fine).
            num_blocks: how many blocks to run (default: all).
            with_attn: return the attention maps; False uses the fused attention kernel and returns an
                empty ``attn`` list (the decoder-only dump path needs tokens only).
            attn_from: with ``with_attn``, only blocks ``attn_from ..`` return maps; earlier blocks use the
                fused kernel (callers that read only the last few maps).

        Returns:
            :class:`ClipFeatures` with ``num_blocks`` token maps ``(B, 1 + h*w, D)`` and the attention maps
            ``(B, 1 + h*w, 1 + h*w)`` of blocks ``attn_from .. num_blocks - 1``.
        """
        n = self.num_blocks if num_blocks is None else int(num_blocks)
        if not 1 <= n <= self.num_blocks:
            raise ValueError(f"num_blocks must be in [1, {self.num_blocks}], got {num_blocks}")
        x, grid = self.embed(images)
        tokens, attns = [], []
        for i in range(n):
            maps = with_attn and i >= attn_from
            x, a = self.run_block(i, x, with_attn=maps)[:2]
            tokens.append(x)
            if maps:
                attns.append(a)
        return ClipFeatures(tokens=tokens, attn=attns, grid=grid)

    def last_block(self, tokens: torch.Tensor, *, with_attn: bool = True
                   ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Run the final block, with autograd enabled when ``tokens`` require grad (GradCAM).

        Args:
            tokens: ``(B, L, D)`` output of block ``num_blocks - 2``.

        Returns:
            tokens ``(B, L, D)`` and the head-averaged attention ``(B, L, L)`` (``None`` if not requested).
        """
        ctx = torch.enable_grad() if tokens.requires_grad else nullcontext()
        with ctx:
            out = self.run_block(self.num_blocks - 1, tokens, with_attn=with_attn)
        return out.tokens, out.attn

    def pool_project(self, tokens: torch.Tensor) -> torch.Tensor:
        """ln_post, mean over the patch tokens (not CLS), then ``@ proj`` (reference 1.2).

        Args:
            tokens: ``(B, L, D)`` output of the last block.

        Returns:
            ``(B, embed_dim)`` (not normalised).
        """
        v = self.visual
        return v.ln_post(tokens[:, 1:]).mean(dim=1) @ v.proj

    @torch.no_grad()
    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Text tower: ``(T, context_length)`` token ids -> ``(T, embed_dim)`` (not normalised)."""
        device = self.visual.conv1.weight.device
        return self.clip.encode_text(token_ids.to(device))
