"""The command-line layer shared by every entry point: one argument layer and one mapping from user errors to exit 2.

Arguments: :func:`add_config_args` adds the config file, ``--run``, ``--overwrite`` and ``--cfg-options`` the same
way to every stage-1 command; :func:`config_overrides` turns them into the overrides ``load_config`` takes (this
module imports nothing from the package, as ``config.py`` imports it, so the loading stays with the caller).

Bad input (a config value, a missing or unreadable file, a full disk, a read-only folder) ends a
command with exit code 2 and one log line that names the file or value and the fix; anything else
is a bug and keeps its traceback. What counts as bad input:

- the project's own error classes, all derived from :class:`UserError` (:class:`BadInputError`,
  :class:`UnknownNameError`, ``ConfigError``, ``DatasetLayoutError``, ``ShardFormatError``, ``ShardLockedError``,
  ``RunDirError``, ``StageError``);
- ``OSError`` about a file: ``FileNotFoundError``, ``FileExistsError``, ``PermissionError``,
  ``IsADirectoryError``, ``NotADirectoryError``, and any ``OSError`` whose errno is no space, a quota,
  a permission or a read-only file system. A full disk reported without a file name (a failed ``write()``)
  is named by the file that was being written (:func:`describe_error`) or the command's output folder.

Command-line syntax (an option such as ``--cfg-options`` without ``key=value``, a negative count) is refused by
argparse itself: exit code 2 with the usage and one ``error:`` line naming the option and the expected form.

A bare ``ValueError`` or ``KeyError`` is *not* bad input here: library code raises
:class:`BadInputError` (a ``ValueError``) or :class:`UnknownNameError` (also a ``KeyError``) where the
user can fix the cause.

Usage::

    def main(argv=None) -> int:
        return run_main(_main, argv, logger=_logger)  # or: try ... except Exception as err: exit_on_user_error

    def _main(argv) -> int:
        p = argparse.ArgumentParser(prog="python -m stage1_cam.NAME")
        add_config_args(p)
        args = p.parse_args(argv)
        cfg = load_config(args.config, config_overrides(args))
        ...
"""

from __future__ import annotations

import argparse
import errno
import io
import logging
import os
import re
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Type, Union

EXIT_BAD_INPUT = 2


class UserError(Exception):
    """Base of the project's user-error classes (a config, a file, a lock held by another run): exit code 2.

    Defined here, in a module that imports nothing from the package, so that each module can declare its own
    error class (``ConfigError``, ``ShardFormatError``, ``RunDirError``, ...) without this mapping importing it.
    """


class BadInputError(UserError, ValueError):
    """A value, option or file content the user can fix; the message names it and says how."""


class UnknownNameError(BadInputError, KeyError):
    """An unknown name (dataset, preset, model, config key): bad input, and a ``KeyError`` for lookups."""

    def __str__(self) -> str:
        return ValueError.__str__(self)  # KeyError's str() would quote the message


# errno -> the fix named in the message. ENOENT and friends come with their own messages when we raise them.
# A full disk names no option (the commands write to run.root, --out, --work-dir, OUT_DIR, --root): the entry
# point adds its own (``output``), see describe_error.
_OS_FIXES: Dict[int, str] = {
    errno.ENOSPC: "free disk space there (df -h shows it) or write the output to another disk{where}, then run the "
                  "command again (finished work is kept)",
    errno.EDQUOT: "the disk quota is exhausted: free space or write the output to another disk{where}",
    errno.EACCES: "give yourself access (chmod/chown) or choose a location you can write to (run.root, data.root, "
                  "--out, $WSSS_CACHE)",
    errno.EPERM: "give yourself access (chmod/chown) or choose a location you can write to (run.root, data.root, "
                 "--out, $WSSS_CACHE)",
    errno.EROFS: "the file system is read-only: choose a writable location (run.root, data.root, --out, "
                 "$WSSS_CACHE)",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "the path is a folder, not a file: check the path",
    errno.EEXIST: "move the existing file away or choose another path",
}
_FILE_ERRORS: Tuple[Type[OSError], ...] = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                                           NotADirectoryError)


def project_error_types() -> Tuple[Type[BaseException], ...]:
    """The project's own user-error classes: every one derives from :class:`UserError`."""
    return (UserError,)


def is_user_error(err: BaseException, extra: Sequence[Type[BaseException]] = ()) -> bool:
    """Whether ``err`` is bad input (exit code 2) rather than a bug (traceback)."""
    if isinstance(err, project_error_types() + tuple(extra)):
        return True
    if isinstance(err, OSError):
        return err.errno in _OS_FIXES or isinstance(err, _FILE_ERRORS)
    return False


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# utils/files.temp_name: ".<stem>.<pid>.<random>.tmp<suffix>", the temporary file of an atomic write of <stem><suffix>
_TEMP_NAME = re.compile(r"^\.(?P<stem>.+)\.\d+\.[0-9a-f]+\.tmp(?P<suffix>[^/]*)$")


def _file_being_written(err: BaseException) -> Optional[str]:
    """The file a full disk stopped: an ``OSError`` from ``write()`` carries no file name, but the file object
    it wrote to is a local variable of a frame it passed through (``Path.write_bytes``'s ``f``, PIL's ``fp``).
    The innermost open-for-writing file object found there (for an atomic write's temporary file: the file it
    stands for), or None."""
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in list(frame.f_locals.values()):
            if isinstance(value, io.IOBase):
                name, mode = getattr(value, "name", None), getattr(value, "mode", "")
                if isinstance(name, str) and name and isinstance(mode, str) and any(c in mode for c in "wax+"):
                    folder, base = os.path.split(os.path.abspath(name))
                    temp = _TEMP_NAME.match(base)
                    return os.path.join(folder, temp["stem"] + temp["suffix"]) if temp else os.path.join(folder, base)
    return None


def describe_error(err: BaseException, *, output: Optional[Tuple[str, str]] = None) -> str:
    """One line for the user: the message, or for a system error the file, what went wrong and the fix.

    A user error that a DataLoader worker raised comes back from torch with the worker's traceback in its
    message; only the original message is kept.

    Args:
        output: the command's output argument and its value (e.g. ``("OUT_DIR", "masks_png")``): a full disk
            suggests writing it to another disk, and names it when neither the error nor the traceback names the
            file (:func:`_file_being_written`).
    """
    if isinstance(err, UserError):  # our own messages already name the file and the fix
        text = ValueError.__str__(err) if isinstance(err, KeyError) else str(err)
        marker = f"{type(err).__name__}: "
        if "Original Traceback" in text and marker in text:
            text = text.rsplit(marker, 1)[1].strip()
        return text
    if isinstance(err, OSError) and err.errno is not None:
        what = err.strerror or errno.errorcode.get(err.errno, str(err.errno))
        files = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        fix = _OS_FIXES.get(err.errno, "check the path and its permissions")
        if err.errno in _DISK_FULL:
            fix = fix.format(where=f" ({output[0]})" if output else "")
            files = files or _file_being_written(err) or ""
            if not files:
                return f"{what} while writing the output{f' {output[1]}' if output else ''}; {fix}"
        return f"{files}: {what}; {fix}" if files else f"{err}; {fix}"
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])  # str(KeyError) adds quotes around the message
    return str(err)


def exit_on_user_error(err: BaseException, logger: Union[str, logging.Logger], *,
                       extra: Sequence[Type[BaseException]] = (), output: Optional[Tuple[str, str]] = None) -> int:
    """Map an exception caught in a ``main()`` to its exit code: bad input logs one line and gives 2.

    Anything that is not bad input (a bug) is re-raised with its traceback. An error whose ``already_reported``
    attribute is true (a stage command that exited 2 has printed its one line) is logged at debug level only.

    Args:
        err: the exception caught by ``except Exception as err``.
        logger: logger (or its name) that reports the error.
        extra: further exception classes that are bad input for this entry point (e.g. ``StageError``).
        output: the command's output argument and its value (``("OUT_DIR", "masks_png")``; see
            :func:`describe_error`).
    """
    if not is_user_error(err, extra):
        raise err
    log = logging.getLogger(logger) if isinstance(logger, str) else logger
    if getattr(err, "already_reported", False):  # e.g. a child process printed the one line: not repeated
        log.debug("%s", describe_error(err, output=output))
    else:
        log.error("%s", describe_error(err, output=output))
    return EXIT_BAD_INPUT


def run_main(body: Callable[..., int], *args: Any, logger: Union[str, logging.Logger],
             extra: Sequence[Type[BaseException]] = (), output: Optional[Tuple[str, str]] = None) -> int:
    """Run an entry point's body and map what it raises: bad input -> exit 2 with one line; bugs keep their traceback.

    Example::

        def main(argv=None) -> int:
            return run_main(_main, argv, logger=_logger)
    """
    try:
        return body(*args)
    except Exception as err:
        return exit_on_user_error(err, logger, extra=extra, output=output)


# argument names (dest) of a command's output folder, for the full-disk message (parse_and_run)
_OUTPUT_DESTS = ("out_dir", "out", "work_dir")


def _output_argument(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Optional[Tuple[str, str]]:
    """The command's output argument and its value (``("OUT_DIR", "masks_png")``), or None when it has none."""
    for action in parser._actions:
        if action.dest in _OUTPUT_DESTS and getattr(args, action.dest, None) is not None:
            name = action.option_strings[0] if action.option_strings else (action.metavar or action.dest.upper())
            return str(name), str(getattr(args, action.dest))
    return None


def parse_and_run(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int],
                  argv: Optional[Sequence[str]], *, logger: logging.Logger) -> int:
    """The tail of a small entry point: parse ``argv``, configure logging, run ``body(args)`` through
    :func:`run_main` (bad input -> exit 2 with one line; a full disk names the command's output argument)."""
    from .logging import setup_logging

    args = parser.parse_args(argv)
    setup_logging()
    return run_main(body, args, logger=logger, output=_output_argument(parser, args))


# ------------------------------------------------------------------------------------------- the argument layer
def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for a count that must be >= ``minimum`` (``--threads``, ``--gpus``): anything else is
    refused by argparse itself (exit 2, one ``error:`` line naming the option)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


positive_int = whole_number(1)


def _cfg_options_action() -> Type[argparse.Action]:
    """mmengine's ``DictAction`` whose syntax errors (an item without ``=``, unbalanced brackets) are argparse
    errors naming the item and the ``key=value`` form, instead of a traceback from inside argparse."""
    from mmengine.config import DictAction  # imported on use: this module stays free of heavy imports

    class CfgOptionsAction(DictAction):
        def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                     option_string: Optional[str] = None) -> None:
            form = "key=value, e.g. train.max_iters=100, lists as key=[1,2] or key=1,2"
            for item in values or ():
                key, sep, _ = str(item).partition("=")
                if not sep or not key.strip():
                    raise argparse.ArgumentError(self, f"{item!r} is not of the form {form}")
                try:
                    super().__call__(parser, namespace, [item], option_string)
                except (AssertionError, ValueError, IndexError, RecursionError) as e:
                    raise argparse.ArgumentError(
                        self, f"cannot read the value of {item!r} ({e}); the form is {form} (balanced brackets; "
                              f"quote it for the shell)") from None

    return CfgOptionsAction


def add_cfg_options(parser: argparse.ArgumentParser, *, help: str = "override config keys: a.b=v",
                    flag: str = "--cfg-options") -> None:
    """``--cfg-options a.b=v ...`` (mmengine's ``DictAction`` syntax): a dict of overrides, empty when absent.

    An item that is not ``key=value`` (or whose value has unbalanced brackets) exits 2 with argparse's one
    ``error:`` line naming it. ``flag`` names another option of the same form (``--s2-options``).
    """
    parser.add_argument(flag, nargs="+", action=_cfg_options_action(), default={}, help=help)


def add_config_args(parser: argparse.ArgumentParser, *, positional: bool = True, overwrite: bool = True,
                    run_default: Optional[str] = None, run_help: str = "run name (default: run.name in the config)",
                    cfg_options_help: str = "override config keys: a.b=v") -> None:
    """The arguments every stage-1 command shares: the config, ``--run``, ``--overwrite``, ``--cfg-options``.

    Args:
        positional: the config is the first positional argument (``CONFIG``); otherwise a required ``--config``.
        overwrite: add ``--overwrite`` (accept a config that differs from the run's saved one).
        run_default, run_help: ``--run``'s default and help.
        cfg_options_help: ``--cfg-options``' help.
    """
    config_help = "stage-1 config file (configs/stage1/...)"
    if positional:
        parser.add_argument("config", help=config_help)
    else:
        parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("--run", default=run_default, help=run_help)
    if overwrite:
        parser.add_argument("--overwrite", action="store_true",
                            help="accept a config that differs from the run's saved one")
    add_cfg_options(parser, help=cfg_options_help)


def config_overrides(args: argparse.Namespace, extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The config overrides of a command line from :func:`add_config_args`: ``--cfg-options``, then ``--run`` as
    ``run.name``, then ``extra`` (the command's own options, e.g. ``{"dump.num_shards": 4}``); for ``load_config``."""
    opts = dict(getattr(args, "cfg_options", None) or {})
    if getattr(args, "run", None) is not None:  # --run "" too: refused by the run-name rule, not ignored
        opts["run.name"] = args.run
    opts.update(extra or {})
    return opts
