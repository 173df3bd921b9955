"""One command-line layer: ``python -m stage1_cam COMMAND``, the shared config arguments, console scripts, one
error-to-exit-code mapping in every ``main``, and module loggers named ``__name__`` that still log under ``-m``."""

from __future__ import annotations

import argparse
import ast
import configparser
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stage1_cam.__main__ import COMMANDS
from stage1_cam.__main__ import main as stage1_main
from stage1_cam.utils.cli import UserError, add_config_args, config_overrides, describe_error

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("stage1_cam", "stage2_seg", "pipelines", "tools")
TINY = "configs/stage1/weclip_tiny-clip_synthetic-160x160_300i.py"


def _modules():
    return [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]


# ------------------------------------------------------------------------------------------ python -m stage1_cam
def test_help_lists_every_command(capsys):
    assert stage1_main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "dump", "cams", "data", "world", "export"):
        assert re.search(rf"^\s+{name}\s+\S", out, re.M), out


@pytest.mark.parametrize("argv", [["nope"], []], ids=["unknown", "missing"])
def test_an_unknown_or_missing_command_exits_2_with_one_line_naming_the_commands(argv, capsys):
    assert stage1_main(argv) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert ("'nope'" in line) == bool(argv) and all(name in line for name in COMMANDS) and not captured.out


def test_every_command_is_a_modules_main():
    for name, (module, _) in COMMANDS.items():
        assert callable(importlib.import_module(module).main), name


def test_a_command_gets_its_arguments_and_the_shared_mapping(tmp_path, capfd):
    with pytest.raises(SystemExit) as info:
        stage1_main(["train", "--help"])
    assert info.value.code == 0
    usage = capfd.readouterr().out
    assert all(flag in usage for flag in ("config", "--run", "--overwrite", "--cfg-options", "--resume"))
    assert stage1_main(["verify", str(tmp_path / "nope")]) == 2
    err = capfd.readouterr().err
    assert str(tmp_path / "nope") in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------- shared config arguments
def test_config_arguments_and_overrides():
    p = argparse.ArgumentParser()
    add_config_args(p)
    args = p.parse_args(["c.py", "--run", "r", "--overwrite", "--cfg-options", "a.b=1", "run.name=x"])
    assert args.config == "c.py" and args.overwrite
    # --run wins over --cfg-options run.name; the command's own options come last
    assert config_overrides(args, {"dump.num_shards": 4}) == {"a.b": 1, "run.name": "r", "dump.num_shards": 4}
    assert config_overrides(p.parse_args(["c.py"])) == {}

    p = argparse.ArgumentParser()
    add_config_args(p, positional=False, overwrite=False, run_default="default")
    args = p.parse_args(["--config", "c.py"])
    assert args.run == "default" and not hasattr(args, "overwrite") and args.cfg_options == {}
    with pytest.raises(SystemExit):
        p.parse_args([])  # --config is required


def test_entry_points_keep_their_flags():
    from pipelines.__main__ import build_parser
    from stage1_cam.dump import parse_args as dump_args
    from stage1_cam.train import parse_args as train_args

    a = train_args(["c.py", "--run", "r", "--resume", "--overwrite", "--cfg-options", "x=1"])
    assert (a.config, a.run, a.resume, a.overwrite, a.cfg_options) == ("c.py", "r", "latest", True, {"x": 1})
    a = dump_args(["c.py", "--run", "r", "--shard", "0", "--num-shards", "2", "--cfg-options", "x=1"])
    assert (a.run, a.shard, a.num_shards, a.cfg_options) == ("r", "0", 2, {"x": 1}) and not hasattr(a, "overwrite")
    a = build_parser().parse_args(["pseudo-labels", "--config", "c.py", "--overwrite", "--shards", "2"])
    assert (a.run, a.overwrite, a.shards, a.cfg_options, a.scheduler) == ("default", True, 2, {}, "local")


def test_a_user_error_raised_in_a_dataloader_worker_is_one_line():
    class SomeError(UserError, ValueError):
        pass

    wrapped = SomeError("Caught SomeError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 1, in f\ntests.SomeError: shard s.h5 is damaged; delete it")
    assert describe_error(wrapped) == "shard s.h5 is damaged; delete it"


# ------------------------------------------------------------------------------------------------ console scripts
def test_console_scripts_resolve_to_callables():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    scripts = dict(line.split("=", 1) for line in cfg["options.entry_points"]["console_scripts"].split("\n") if line)
    scripts = {k.strip(): v.strip() for k, v in scripts.items()}
    assert {"wsss-stage1", "wsss-pipeline", "wsss-stage2-train", "wsss-stage2-test"} <= set(scripts)
    assert scripts["wsss-stage1"] == "stage1_cam.__main__:main"
    assert scripts["wsss-pipeline"] == "pipelines.__main__:main"
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name


# ------------------------------------------------------------------------------------ one mapping, module loggers
def _calls(tree: ast.AST, name: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == name) or (isinstance(f, ast.Name) and f.id == name):
                yield node


def test_every_logger_is_named_after_its_module():
    """``getLogger(__name__)`` at module level; no logger named by a string anywhere (a literal name, or one chosen
    by ``if __name__ == "__main__"``); no string logger name handed to the exit-code mapping."""
    wrong = set()
    for path in _modules():
        tree = ast.parse(path.read_text(), str(path))
        where = lambda n: f"{path.relative_to(REPO)}:{n.lineno}"  # noqa: E731
        for node in _calls(tree, "getLogger"):
            if any(isinstance(c, ast.Constant) and isinstance(c.value, str) for a in node.args for c in ast.walk(a)):
                wrong.add(f"{where(node)}: {ast.unparse(node)}")
        for stmt in tree.body:  # module-level loggers
            for node in _calls(stmt, "getLogger") if isinstance(stmt, (ast.Assign, ast.AnnAssign)) else ():
                if not (len(node.args) == 1 and isinstance(node.args[0], ast.Name) and node.args[0].id == "__name__"):
                    wrong.add(f"{where(node)}: {ast.unparse(node)}")
        for name in ("exit_on_user_error", "run_main", "parse_and_run"):
            for node in _calls(tree, name):
                positional = node.args[1:2] if name == "exit_on_user_error" else []
                given = [k.value for k in node.keywords if k.arg == "logger"] + positional
                if any(isinstance(g, ast.Constant) for g in given):
                    wrong.add(f"{where(node)}: {ast.unparse(node)}")
    assert not wrong, "loggers not named __name__:\n" + "\n".join(sorted(wrong))


def test_every_main_maps_errors_through_utils_cli():
    """Each module with a ``main`` uses ``exit_on_user_error``/``run_main`` (or ``parse_and_run``, which calls it);
    none returns exit code 2 by itself."""
    dispatcher = REPO / "stage1_cam" / "__main__.py"  # hands over to a module's main before anything can fail
    wrong = []
    for path in _modules():
        tree = ast.parse(path.read_text(), str(path))
        if path == dispatcher or not any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            continue
        if not any(True for name in ("exit_on_user_error", "run_main", "parse_and_run") for _ in _calls(tree, name)):
            wrong.append(f"{path.relative_to(REPO)}: main() without exit_on_user_error/run_main")
        for node in ast.walk(tree):
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Constant) and node.value.value == 2:
                wrong.append(f"{path.relative_to(REPO)}:{node.lineno}: returns 2 itself")
            if isinstance(node, ast.Name) and node.id == "EXIT_BAD_INPUT":
                wrong.append(f"{path.relative_to(REPO)}:{node.lineno}: uses EXIT_BAD_INPUT itself")
    assert not wrong, "\n".join(wrong)


def _run(*args, **kw):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, **kw)


@pytest.mark.parametrize("how", ["module", "command"])
def test_logs_appear_under_python_m(how, tmp_path):
    """Run as ``python -m stage1_cam.data`` (``__name__`` is "__main__") and as ``python -m stage1_cam data``: the
    module's INFO lines come out under its package name, formatted by ``setup_logging``."""
    args = ["--dataset", "synthetic", "--root", str(tmp_path / "data")]
    proc = _run(*(["stage1_cam.data"] if how == "module" else ["stage1_cam", "data"]), *args)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^\d\d:\d\d:\d\d I stage1_cam\.data\.__main__: synthetic at ", proc.stderr, re.M), proc.stderr


def test_errors_of_pipelines_and_verify_come_from_their_module_loggers(tmp_path):
    proc = _run("pipelines", "status", "--config", TINY, "--run", "none", "--cfg-options", f"run.root={tmp_path}")
    assert proc.returncode == 2 and re.search(r"^\d\d:\d\d:\d\d E pipelines\.__main__: .*no resolved config",
                                              proc.stderr, re.M), proc.stderr
    proc = _run("stage1_cam.io.verify", str(tmp_path / "nope"))
    assert proc.returncode == 2 and re.search(r"^\d\d:\d\d:\d\d E stage1_cam\.io\.verify: ", proc.stderr, re.M), \
        proc.stderr
