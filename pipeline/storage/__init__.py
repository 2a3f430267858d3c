"""Where the pipeline's files live: local folders or object stores, through one fsspec layer.

- ``filesystem``: ``filesystem(url) -> (fs, path)`` for local paths, ``file://``, ``s3://`` (s3fs) and other
  fsspec URLs; ``arrow_filesystem`` wraps the same for Ray; credentials only from the environment.
- ``s3``: the S3 client's bounded timeouts and retries.
- ``objects``: whole-file reads and writes (atomic locally, one PUT on an object store), listings, moves.
- ``preflight``: a bounded check that an object store answers with our credentials, before work starts.
"""

from pipeline.storage.filesystem import (
    StorageError,
    absolute,
    arrow_filesystem,
    describe,
    filesystem,
    is_local,
    is_url,
    join,
)
from pipeline.storage.objects import (
    Entry,
    delete_tree,
    exists,
    is_dir,
    list_folder,
    move,
    open_read,
    put_bytes,
    put_file,
    read_bytes,
    sha256_of,
    size,
)
from pipeline.storage.preflight import check_all, check_reachable

__all__ = [
    "Entry",
    "StorageError",
    "absolute",
    "arrow_filesystem",
    "check_all",
    "check_reachable",
    "delete_tree",
    "describe",
    "exists",
    "filesystem",
    "is_dir",
    "is_local",
    "is_url",
    "join",
    "list_folder",
    "move",
    "open_read",
    "put_bytes",
    "put_file",
    "read_bytes",
    "sha256_of",
    "size",
]
