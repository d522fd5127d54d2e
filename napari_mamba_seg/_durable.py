"""Durable file writes and file hashes shared by bundles, training checkpoints and exporters (standard library
only)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["file_sha256", "fsync_directory", "write_durably"]

_HASH_CHUNK_BYTES = 1 << 20


def write_durably(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist) with ``data``, flushed to the disk before returning."""
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_directory(path: Path) -> None:
    """Persist a folder's entries, e.g. after a rename (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
