"""Stage 1 of the WSSS pipeline: frozen CLIP, initial CAMs, refinement heads, pseudo-mask shards.

Importing this package has no side effects (no model loading, no logging configuration).
"""

__version__ = "0.1.0"
