"""``python -m stage1_cam.io.verify SHARD_DIR [--quick]``: check a pseudo-mask shard directory.

Checks ``manifest.json`` against the shard files, rebuilds it from the finished shards when it is missing,
unreadable or out of date, and compares every shard's sha256 with the one recorded when it was written
(``--quick``: only the shards whose size or mtime changed). Exit codes: 0 all shards intact (the set may be
incomplete: the missing shards are listed), 2 damaged shards or bad input, with one message naming the files
and the fix.
"""

from __future__ import annotations

import argparse
import logging
from typing import List, Optional

from ..utils.cli import parse_and_run
from .shards import check_num_shards, verify_shards

_logger = logging.getLogger(__name__)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the process exit code."""
    p = argparse.ArgumentParser(prog="python -m stage1_cam.io.verify", description=__doc__.splitlines()[0])
    p.add_argument("shard_dir", help="pseudo-mask directory (runs/<dataset>/<run>/pseudo_masks)")
    p.add_argument("--num-shards", type=int, default=None, help="number of shards (default: the manifest's)")
    p.add_argument("--quick", action="store_true", help="hash only shards whose size or mtime changed")
    return parse_and_run(p, _verify, argv, logger=_logger)


def _verify(args: argparse.Namespace) -> int:
    if args.num_shards is not None:
        check_num_shards(args.num_shards, what="--num-shards")
    m = verify_shards(args.shard_dir, args.num_shards, quick=args.quick)
    _logger.info("%s: %d images in %d/%d finished shards, %s%s", args.shard_dir, m["num_images"], len(m["shards"]),
                 m["num_shards"], "checksums verified" if not args.quick else "changed shards verified",
                 "" if m["complete"] else f"; missing shards {m['missing_shards']}, unfinished "
                 f"{m['incomplete_shards']}")
    return 0


if __name__ == "__main__":  # as the package's module, whose logger is named after it (not "__main__")
    from stage1_cam.io.verify import main as package_main

    raise SystemExit(package_main())
