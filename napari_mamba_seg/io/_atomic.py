"""Safe file writing for the exporters: a temporary name in the target folder, then one atomic rename.

No half-written file ever carries the final name, and an existing file is never replaced unless the caller
passes ``overwrite=True``. Only the standard library is imported.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["WRITABLE_DTYPES", "atomic_output", "check_writable_dtype", "refuse_existing"]

# Dtypes every supported format stores and common tools read back (NIfTI and TIFF alike).
WRITABLE_DTYPES = tuple(
    np.dtype(name) for name in ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")
)


def refuse_existing(path: Path, overwrite: bool) -> None:
    """Raise FileExistsError when ``path`` exists and ``overwrite`` is False; refuse a folder always.

    Args:
        path: The target file.
        overwrite: Whether an existing file may be replaced.
    """
    if path.is_dir():
        raise IsADirectoryError(f"Cannot write {path}: it is a folder. Name a file in it instead.")
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} already exists; refusing to overwrite it. Choose another name, or pass overwrite=True "
            "(--overwrite on the command line) to replace it."
        )


def integer_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    """``labels`` as an integer array (bool becomes uint8); ValueError naming ``path`` for any other dtype."""
    labels = np.asarray(labels)
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if labels.dtype.kind not in "iu":
        raise ValueError(
            f"Cannot write {path}: labels must be integers, got dtype {labels.dtype}. Convert them first, e.g. "
            "np.rint(labels).astype(np.uint16) (or argmax over class probabilities)."
        )
    return labels


def check_writable_dtype(array: np.ndarray, path: Path) -> None:
    """Raise ValueError unless ``array``'s dtype is one the writers store (see :data:`WRITABLE_DTYPES`)."""
    if array.dtype.newbyteorder("=") not in WRITABLE_DTYPES:
        valid = ", ".join(str(dtype) for dtype in WRITABLE_DTYPES)
        raise ValueError(
            f"Cannot write {path}: arrays of dtype {array.dtype} are not supported (valid: {valid}). "
            "Convert it first, e.g. array.astype(np.float32) for an image or np.uint16 for labels."
        )
    if array.size == 0:
        raise ValueError(f"Cannot write {path}: the array is empty (shape {array.shape}).")


def _temporary_name(path: Path, suffix: str) -> Path:
    """A hidden name beside ``path`` that keeps ``suffix`` (libraries pick the format from the suffix)."""
    stem = path.name[: -len(suffix)] if suffix and path.name.endswith(suffix) else path.name
    return path.with_name(f".{stem}.tmp-{uuid.uuid4().hex[:12]}{suffix}")


@contextlib.contextmanager
def atomic_output(path: str | Path, *, overwrite: bool = False, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write to; on success it is renamed to ``path``, on failure it is removed.

    The temporary file lies in ``path``'s folder (created when missing), so the final ``os.replace`` is one atomic
    rename on the same file system. Without ``overwrite``, the file is linked into place with ``os.link``, which fails
    if another process created ``path`` meanwhile (where links are not supported: checked, then renamed).

    Args:
        path: The final file name.
        overwrite: Whether an existing ``path`` may be replaced.
        suffix: The suffix the temporary name keeps, e.g. ``".nii.gz"`` (nibabel compresses by suffix).

    Yields:
        The temporary path to write the whole file to.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False (checked before and after writing).
    """
    path = Path(path)
    refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_name(path, suffix)
    try:
        yield temporary
        if not temporary.is_file():
            raise RuntimeError(f"the writer for {path} produced no file")
        _flush_to_disk(temporary)
        _move_into_place(temporary, path, overwrite)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def _flush_to_disk(path: Path) -> None:
    """fsync the finished file, so a crash after the rename cannot leave an empty file under the final name."""
    with path.open("r+b") as file:
        os.fsync(file.fileno())


def _move_into_place(temporary: Path, path: Path, overwrite: bool) -> None:
    """Rename ``temporary`` to ``path``; without ``overwrite`` never replace a file that appeared meanwhile."""
    if overwrite:
        os.replace(temporary, path)
        return
    try:
        os.link(temporary, path)  # atomic and fails when path exists
    except FileExistsError:
        refuse_existing(path, overwrite=False)
        raise
    except OSError:  # the file system has no hard links (FAT, some network shares)
        refuse_existing(path, overwrite=False)
        os.replace(temporary, path)
