"""On-disk formats: the HDF5 pseudo-mask shards (stage 1 -> stage 2 contract) and their PNG export."""

from .shards import (FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, ShardFormatError, ShardLockedError, ShardMeta,
                     ShardReader, ShardWriter, assign_shards, checksum_path, shard_filename, user_message,
                     verify_shards, write_manifest)

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_NAME", "ShardFormatError", "ShardLockedError", "ShardMeta",
    "ShardReader", "ShardWriter", "assign_shards", "checksum_path", "shard_filename", "user_message",
    "verify_shards", "write_manifest",
]
