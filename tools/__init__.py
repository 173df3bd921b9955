"""Developer tools beside the pipeline: benchmarks (``python -m tools.bench``), the GPU consistency check
(``python -m tools.gpu_check``), the GPU session script and the environment setup script (``make setup``).

Run from the repository root; they may import ``stage1_cam``, ``stage2_seg`` and ``pipelines``, and nothing
imports them. Not installed with the package.
"""
