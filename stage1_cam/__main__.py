"""``python -m stage1_cam COMMAND [ARGS]`` (console script ``wsss-stage1``): every stage-1 command in one place.

Each command is the ``main(argv)`` of its module, which also runs on its own (``python -m stage1_cam.train ...``,
as the Makefile, the pipeline and the SLURM job scripts call it); ``python -m stage1_cam COMMAND --help`` shows a
command's arguments. Only the chosen command's module is imported.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Dict, List, Optional, Tuple

from .utils.cli import EXIT_BAD_INPUT

PROG = "python -m stage1_cam"

# command -> (module with main(argv), one line for --help)
COMMANDS: Dict[str, Tuple[str, str]] = {
    "train": ("stage1_cam.train", "train the refinement head (stage1/checkpoints/final.pth)"),
    "dump": ("stage1_cam.dump", "dump pseudo-masks into HDF5 shards; --evaluate scores them"),
    "cams": ("stage1_cam.cams.__main__", "initial CLIP CAMs for a split and their evaluation table"),
    "bank": ("stage1_cam.cams.bank", "ExCEL's attribute bank (TSE) from class descriptions, cached in the run"),
    "data": ("stage1_cam.data.__main__", "generate (synthetic) or check (voc, coco) a dataset"),
    "world": ("stage1_cam.world_clip.train", "train (or find cached) the synthetic world's CLIP"),
    "export": ("stage1_cam.io.export", "export pseudo-mask shards to a folder of PNGs"),
    "verify": ("stage1_cam.io.verify", "check a shard directory against its recorded checksums"),
}


def build_parser() -> argparse.ArgumentParser:
    """The parser behind ``--help`` (the command's own arguments are parsed by its module)."""
    p = argparse.ArgumentParser(
        prog=PROG, epilog=f"{PROG} COMMAND --help: the command's arguments",
        description="Stage 1: frozen CLIP, initial CAMs, refinement heads, pseudo-mask shards. Each command also runs "
                    "as its module (python -m stage1_cam.train).")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")
    for name, (_, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``COMMAND`` with the rest of ``argv``; an unknown or missing command exits 2 with one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        build_parser().print_help()
        return 0
    if not argv or argv[0] not in COMMANDS:
        what = f"unknown command {argv[0]!r}" if argv else "no command given"
        sys.stderr.write(f"{PROG}: {what}; choose one of: {', '.join(COMMANDS)} (--help describes them)\n")
        return EXIT_BAD_INPUT
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
