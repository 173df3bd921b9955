"""Train an MMSegmentation model on stage-1 pseudo-masks (thin wrapper over mmengine's ``Runner``).

Usage::

    python -m stage2_seg.train CONFIG --shards RUN/pseudo_masks [--work-dir DIR] [--data-root ROOT]
        [--launcher none|pytorch|slurm] [--resume [CHECKPOINT]] [--amp] [--no-pretrained]
        [--cfg-options key=value ...]

The shard directory goes into the ``PseudoMaskSegDataset`` of ``train_dataloader``; the dataset root into
every dataset of the train/val/test loaders. The root is, in order: ``--data-root``, then
``$WSSS_DATA_ROOT/<last folder of the config's data_root>`` (e.g. ``$WSSS_DATA_ROOT/VOC2012``), then the
config's ``data_root``. The work dir is ``--work-dir`` or ``<RUN>/stage2/<config name>``.

Exit codes: 0 done; 2 bad input found before training (a config that cannot be parsed, missing manifest,
dataset or pretrained weights, unknown config key, a value the runner cannot use, damaged shards), a
pseudo-mask shard found damaged while training, or a full disk while writing to the work dir, with a
message saying what to do. Checkpoints are written to a temporary file and renamed, so a full disk or a
killed process never leaves a truncated ``iter_N.pth``.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import inspect
import logging
import os
import os.path as osp
from typing import Any, Callable, Collection, Dict, Iterator, List, Optional, Set

from stage1_cam.config import read_config_file
from stage1_cam.constants import ENV_DATA_ROOT
from stage1_cam.utils.cli import BadInputError, UnknownNameError, add_cfg_options, run_main
from stage1_cam.utils.dist import import_before_process_group, shutdown_distributed
from stage1_cam.utils.files import DiskFullError, atomic_write, disk_full_error, is_disk_full
from stage1_cam.utils.logging import setup_logging
from stage1_cam.utils.schema import COUNT, COUNT0, ConfigError, Range, check_ranges, check_type

from .checkpoint import safe_checkpoint_loading
from .datasets import require_manifest
from .pretrained import check_pretrained_available, disable_pretrained

_logger = logging.getLogger(__name__)

PSEUDO_DATASET_TYPES = ("PseudoMaskSegDataset",)
_LOADERS = ("train_dataloader", "val_dataloader", "test_dataloader")

#: Values the runner counts with or divides by, checked before it is built: a bad one otherwise fails deep inside
#: mmengine with a traceback, or (a negative ``max_iters``) trains nothing and exits 0 without a checkpoint.
RUNNER_VALUES: Dict[str, Range] = {
    "train_cfg.max_iters": COUNT, "train_cfg.max_epochs": COUNT, "train_cfg.val_interval": COUNT,
    "train_cfg.val_begin": COUNT0, "default_hooks.checkpoint.interval": COUNT, "default_hooks.logger.interval": COUNT,
    **{f"{loader}.batch_size": COUNT for loader in _LOADERS},
    **{f"{loader}.num_workers": COUNT0 for loader in _LOADERS},
}

# Keys of the config dicts that the runner unpacks into a call without a ``type`` (every dict with a ``type`` is
# checked against the registered class's constructor instead).
_LOADER_KEYS = ("dataset", "sampler", "batch_sampler", "collate_fn", "worker_init_fn", "num_batch_per_epoch")

_DISK_FULL_FIX = "pass --work-dir on a disk with room"
_DISK_FULL_THEN = "add --resume to continue from the last complete checkpoint in the work dir"


def _iter_datasets(node: Any) -> Iterator[Any]:
    """Every dataset config under a dataloader's ``dataset`` (through ``ConcatDataset``/``RepeatDataset``)."""
    if node is None:
        return
    if isinstance(node, (list, tuple)):
        for n in node:
            yield from _iter_datasets(n)
        return
    yield node
    if isinstance(node, dict):
        yield from _iter_datasets(node.get("dataset"))
        yield from _iter_datasets(node.get("datasets"))


def resolve_data_root(cfg: Any, data_root: Optional[str]) -> Optional[str]:
    """The dataset root to use: ``data_root`` > ``$WSSS_DATA_ROOT/<basename(cfg.data_root)>`` > config.

    Args:
        cfg: an mmengine ``Config``.
        data_root: the ``--data-root`` value, if any.
    """
    if data_root:
        return data_root
    env = os.environ.get(ENV_DATA_ROOT)
    cfg_root = cfg.get("data_root")
    if env and cfg_root:
        return osp.join(env, osp.basename(osp.normpath(cfg_root)))
    return cfg_root


def apply_data_root(cfg: Any, data_root: Optional[str]) -> None:
    """Set ``data_root`` on every dataset of the train/val/test loaders (in place)."""
    if data_root is None:
        return
    cfg.data_root = data_root
    for loader in _LOADERS:
        for ds in _iter_datasets((cfg.get(loader) or {}).get("dataset")):
            if isinstance(ds, dict) and "data_root" in ds:
                ds["data_root"] = data_root


def apply_shard_dir(cfg: Any, shard_dir: str) -> None:
    """Point the training set's ``PseudoMaskSegDataset`` to ``shard_dir`` (in place).

    Raises:
        ValueError: ``train_dataloader`` has no pseudo-mask dataset.
    """
    found = [ds for ds in _iter_datasets((cfg.get("train_dataloader") or {}).get("dataset"))
             if isinstance(ds, dict) and ds.get("type") in PSEUDO_DATASET_TYPES]
    if not found:
        raise BadInputError(f"train_dataloader of this config has no {'/'.join(PSEUDO_DATASET_TYPES)}; inherit "
                            f"configs/stage2/_base_/datasets/*_pseudo.py to train on pseudo-mask shards")
    for ds in found:
        ds["shard_dir"] = shard_dir


def enable_amp(cfg: Any) -> None:
    """Switch ``optim_wrapper`` to ``AmpOptimWrapper`` with a dynamic loss scale (in place).

    Raises:
        ValueError: the config uses an optimizer wrapper other than ``OptimWrapper``.
    """
    kind = cfg.optim_wrapper.get("type", "OptimWrapper")
    if kind == "AmpOptimWrapper":
        _logger.warning("AMP is already enabled in the config")
        return
    if kind != "OptimWrapper":
        raise BadInputError(f"--amp needs optim_wrapper.type == 'OptimWrapper', got {kind!r}")
    cfg.optim_wrapper.type = "AmpOptimWrapper"
    cfg.optim_wrapper.loss_scale = "dynamic"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stage2_seg.train", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="stage-2 config (configs/stage2/*.py)")
    p.add_argument("--shards", required=True, help="pseudo-mask directory with manifest.json (RUN/pseudo_masks)")
    p.add_argument("--work-dir", help="output folder (default: <RUN>/stage2/<config name>)")
    p.add_argument("--data-root", help=f"dataset root with JPEGImages/ (default: ${ENV_DATA_ROOT}/<name> or config)")
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm"], default="none",
                   help="distributed launcher (torchrun: pytorch; srun: slurm)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="resume from CHECKPOINT, or (no value) from the latest checkpoint in the work dir")
    p.add_argument("--amp", action="store_true", help="automatic mixed precision")
    p.add_argument("--no-pretrained", action="store_true",
                   help="random initialisation: drop model.pretrained and init_cfg Pretrained entries")
    add_cfg_options(p, help="override config keys, e.g. train_cfg.max_iters=1000 (existing keys only)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def load_stage2_config(path: str, sections: Collection[str] = ("model",)) -> Any:
    """Parse a stage-2 (MMSegmentation) config file the user named (``stage1_cam.config.read_config_file``: its
    parse errors are bad input) and check that it is one.

    Args:
        path: an existing config file.
        sections: top-level keys the command needs (a stage-1 config has none of mmseg's).

    Raises:
        ConfigError: the file cannot be parsed, a file it inherits (``_base_``) is missing, or it lacks ``sections``.
    """
    cfg = read_config_file(path, examples="configs/stage2/")
    missing = [key for key in sections if cfg.get(key) is None]
    if missing:
        raise ConfigError(f"{path} is not a stage-2 (MMSegmentation) config: it has no {', '.join(missing)}; "
                          "pass one of configs/stage2/*.py (stage-1 configs are for python -m stage1_cam)")
    return cfg


def build_config(args: argparse.Namespace) -> Any:
    """Load the config and apply the command line to it.

    Raises:
        FileNotFoundError: config, manifest or pretrained weights missing.
        ConfigError: the config cannot be parsed, or a value the runner needs is out of range.
        ValueError/KeyError: unknown override keys, no pseudo-mask dataset in the config, bad AMP setting.
    """
    if not osp.isfile(args.config):
        raise FileNotFoundError(f"config {args.config} does not exist; see configs/stage2/")
    require_manifest(args.shards)
    if args.resume not in (None, "auto") and not osp.isfile(args.resume):
        raise FileNotFoundError(f"--resume checkpoint {args.resume} does not exist")
    cfg = load_stage2_config(args.config, sections=("model", "train_dataloader"))
    if args.cfg_options:
        check_override_keys(cfg, args.cfg_options)
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or osp.join(osp.dirname(osp.abspath(osp.normpath(args.shards))), "stage2",
                                             osp.splitext(osp.basename(args.config))[0])
    apply_shard_dir(cfg, osp.abspath(args.shards))
    apply_data_root(cfg, resolve_data_root(cfg, args.data_root))
    if args.no_pretrained:
        disable_pretrained(cfg.model)
    else:
        check_pretrained_available(cfg.model)
    if args.amp:
        enable_amp(cfg)
    if args.resume is not None:
        cfg.resume = True
        cfg.load_from = None if args.resume == "auto" else args.resume
    check_runner_values(cfg, args.config)
    return cfg


def check_runner_values(cfg: Any, source: str) -> None:
    """Refuse values of :data:`RUNNER_VALUES` that are not integers in range (from the file or ``--cfg-options``).

    Raises:
        ConfigError: names the file, the key, the value and the valid range.
    """
    tree = cfg.to_dict() if hasattr(cfg, "to_dict") else cfg
    for key, rng in RUNNER_VALUES.items():
        node: Any = tree
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:  # not in this config (e.g. max_epochs of an iteration-based loop)
            continue
        value = check_type(node, int, f"{source}: {key}")
        check_ranges({key: value}, {key: rng}, prefix="", source=source)


def check_override_keys(cfg: Any, options: dict) -> None:
    """Refuse ``--cfg-options`` keys that are not in the config (typos), naming the key and close matches.

    A missing intermediate section is always an error. A new leaf key is refused under a dict with a ``type``
    (a registered class: the key must be one of its constructor's arguments), under a ``*_dataloader`` (the
    DataLoader's arguments) and under ``log_processor``/``randomness``; elsewhere (e.g. ``model.test_cfg``, which
    mmseg reads with optional keys) it is added, with a warning.

    Raises:
        UnknownNameError: (a ``KeyError``) the key is not in the config and not accepted where it would go.
    """
    tree = cfg.to_dict() if hasattr(cfg, "to_dict") else cfg
    source = getattr(cfg, "filename", None)
    lead = f"{source}: " if source else ""
    for key in options:
        parts = key.split(".")
        node: Any = tree
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            elif not last or not isinstance(node, dict):
                siblings = [str(k) for k in node] if isinstance(node, dict) else []
                raise UnknownNameError(f"{lead}--cfg-options {key}: {'.'.join(parts[:i + 1])!r} is not in the "
                                       f"config{_did_you_mean(part, siblings, parts[:i])}")
            else:
                _check_new_leaf(key, node, tree.get("default_scope") or "mmseg", lead)


def _did_you_mean(name: str, candidates: Collection[str], parents: List[str]) -> str:
    """``"; did you mean a.b?"`` for the close matches of ``name`` among ``candidates`` (keys under ``parents``)."""
    close = difflib.get_close_matches(name, sorted(candidates), n=3, cutoff=0.8)
    return f"; did you mean {' or '.join('.'.join(parents + [c]) for c in close)}?" if close else ""


def _check_new_leaf(key: str, parent: dict, scope: str, lead: str) -> None:
    """Refuse the new leaf of ``key`` where the object built from ``parent`` does not take it (see
    :func:`check_override_keys`); warn where nothing says which keys are valid."""
    parents, leaf = key.split(".")[:-1], key.split(".")[-1]
    accepted = _accepted_keys(".".join(parents), parent, scope)
    if accepted is None:
        _logger.warning("--cfg-options %s: %r is not in the config; adding it", key, leaf)
        return
    if leaf in accepted:
        return
    valid = sorted(k for k in set(accepted) | {str(k) for k in parent} if k not in ("type", "runner")
                   and not k.startswith("_"))  # set by the config system / the runner itself
    what = f" ({parent['type']})" if isinstance(parent.get("type"), str) else ""
    raise UnknownNameError(f"{lead}--cfg-options {key}: {leaf!r} is not a key of {'.'.join(parents)}{what}"
                           f"{_did_you_mean(leaf, valid, parents) or ';'} valid keys there: {', '.join(valid)}")


def _accepted_keys(path: str, node: dict, scope: str) -> Optional[Set[str]]:
    """The keys the runner can pass on from the config dict at ``path``; None where that is not known."""
    from mmengine.runner.utils import set_random_seed
    from torch.utils.data import DataLoader

    if "type" in node:
        return _constructor_args(_registered(node["type"], scope))
    if path in _LOADERS:
        return (_constructor_args(DataLoader) or set()) | set(_LOADER_KEYS)
    if path == "randomness":
        return _constructor_args(set_random_seed)
    if path == "log_processor":
        return _constructor_args(_registered("LogProcessor", scope))
    return None


def _registered(kind: Any, scope: str) -> Optional[Callable[..., Any]]:
    """The class (or function) that a config ``type`` names, looked up in every mmseg registry; None if unknown."""
    if callable(kind):
        return kind
    if not isinstance(kind, str):
        return None
    from mmengine.registry import Registry, init_default_scope
    from mmseg import registry as mmseg_registry

    init_default_scope(scope)
    for name in sorted(dir(mmseg_registry)):
        reg = getattr(mmseg_registry, name)
        if isinstance(reg, Registry):
            try:
                found = reg.get(kind)
            except (KeyError, ImportError):  # an optional package a registry would import is missing
                found = None
            if found is not None:
                return found
    return None


def _constructor_args(obj: Optional[Callable[..., Any]]) -> Optional[Set[str]]:
    """The keyword arguments ``obj`` accepts, following ``**kwargs`` up the class hierarchy; None if any."""
    import torch

    if obj is None:
        return None
    inits = ([c.__dict__["__init__"] for c in inspect.getmro(obj)
              if "__init__" in c.__dict__ and c not in (object, torch.nn.Module)] if inspect.isclass(obj) else [obj])
    names: Set[str] = set()
    for init in inits:
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):  # a builtin without a signature: cannot tell
            return None
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names
    return names if inspect.isclass(obj) else None  # **kwargs up to object/nn.Module, which take none


def preflight(cfg: Any) -> None:
    """Build the train and val datasets once, so that bad input fails before the runner starts.

    This lists the pseudo-mask manifest against the images on disk and the val split against its masks
    (no image is decoded); the runner builds its own copies afterwards.

    Raises:
        FileNotFoundError: missing images, masks, split files or dataset root.
        ValueError: class list, palette, ignore index or dataset of the shards differ from the config.
    """
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS

    init_default_scope(cfg.get("default_scope", "mmseg"))
    for loader in ("train_dataloader", "val_dataloader"):
        ds_cfg = (cfg.get(loader) or {}).get("dataset")
        if ds_cfg is not None:
            ds = DATASETS.build(ds_cfg)
            _logger.info("%s: %d samples", loader, len(ds))


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the process exit code (2 for bad input, with one message naming the file)."""
    return run_main(lambda: _main(parse_args(argv)), logger=_logger)


def _main(args: argparse.Namespace) -> int:
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    setup_logging(rank=int(os.environ.get("RANK", "0")))
    from mmengine.runner import Runner

    cfg = build_config(args)
    preflight(cfg)
    _logger.info("training %s on %s -> %s", args.config, args.shards, cfg.work_dir)
    if args.launcher != "none":
        import_before_process_group()  # mmengine's Runner creates the group; see stage1_cam/utils/dist.py
    ok = False
    try:
        with safe_checkpoint_loading(), _naming_full_disk(cfg.work_dir):
            runner = Runner.from_cfg(cfg)
            save_checkpoints_atomically(runner)
            runner.train()  # a shard damaged while training raises ShardFormatError: one line through run_main
        del runner  # its DDP-wrapped model holds the process group
        ok = True
    finally:
        shutdown_distributed(ok)  # no process group (--launcher none): nothing to do
    return 0


def save_checkpoints_atomically(runner: Any) -> None:
    """Make ``runner.save_checkpoint`` write a temporary file next to the checkpoint and rename it when complete.

    mmengine writes ``iter_N.pth`` in place: a full disk (or a kill) leaves a truncated checkpoint that ``--resume``
    would pick. Only this runner instance is changed; a write that fails removes its temporary file, and a full
    disk becomes one :class:`DiskFullError` naming the checkpoint and the work dir.
    """
    from mmengine.dist import is_main_process

    save = runner.save_checkpoint

    def save_atomically(out_dir: str, filename: str, *args: Any, **kwargs: Any) -> None:
        if "://" in str(out_dir) or not is_main_process():  # a remote backend / a rank that writes nothing
            save(out_dir, filename, *args, **kwargs)
            return
        final = osp.join(out_dir, filename)
        with _naming_full_disk(out_dir, what=f"checkpoint {final}"), atomic_write(final, fsync=True) as tmp:
            save(out_dir, tmp.name, *args, **kwargs)

    runner.save_checkpoint = save_atomically


@contextlib.contextmanager
def _naming_full_disk(work_dir: str, what: str = "the training outputs (logs, checkpoints)") -> Iterator[None]:
    """A full disk while the runner writes ``what`` becomes one :class:`DiskFullError` naming ``work_dir`` and the
    fixes this command has (mmengine's writes raise ``ENOSPC`` without a file name)."""
    try:
        yield
    except Exception as e:
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            raise disk_full_error(work_dir, what=what, fix=_DISK_FULL_FIX, then=_DISK_FULL_THEN) from e
        raise


if __name__ == "__main__":  # as the package's module, whose logger is named after it (not "__main__")
    from stage2_seg.train import main as package_main

    raise SystemExit(package_main())
