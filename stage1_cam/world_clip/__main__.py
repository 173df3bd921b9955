"""``python -m stage1_cam.world_clip`` (``make world``): train (or find cached) the synthetic world's CLIP."""

import sys

from .train import main

if __name__ == "__main__":
    sys.exit(main())
