"""Safe file writing for the exporters: a temporary name in the target folder, then one atomic rename.

No half-written file ever carries the final name, and an existing file is never replaced unless the caller
passes ``overwrite=True``. :func:`atomic_output` writes one file; :class:`StagedFiles` writes several, all or none.
Imports numpy and the standard library only (through :mod:`napari_mamba_seg._durable`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from napari_mamba_seg._durable import fsync_directory

__all__ = ["WRITABLE_DTYPES", "StagedFiles", "atomic_output", "check_writable_dtype", "keep_copy", "refuse_existing"]

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


def keep_copy(path: Path, backup: Path) -> None:
    """A hard link of ``path`` at ``backup`` (a copy where the file system has no links)."""
    try:
        os.link(path, backup)
    except OSError:
        shutil.copy2(path, backup)


class StagedFiles:
    """Write files into a hidden staging folder, then move them all into place, or none.

    ``stage(final)`` returns the path to write ``final``'s content to. ``commit(overwrite=..., remove=...)`` moves the
    staged files into place in order (put a shared index such as ``dataset.json`` last), never over a file that
    appeared meanwhile unless ``overwrite``, then deletes the files in ``remove``; a file replaced or deleted is kept
    (hard link) in the staging folder until the end. Leaving the block with an exception (KeyboardInterrupt included),
    before or during the commit, removes what was moved in, restores what was replaced or deleted and removes the
    folders the block created (when empty). A file that cannot be restored keeps its earlier version in the staging
    folder, which is then left in place: the only copy of a user's file is never deleted.

    Args:
        folder: Where the staging folder goes; on the same file system as every final path, so moves are renames.
        prefix: The staging folder's name prefix, e.g. ``".nnunet-export-"`` (a leading dot hides it).
        create: Folders to create on entry (with missing parents, ``folder`` included when listed); those that did
            not exist are removed again, when empty, if the block fails.
    """

    def __init__(self, folder: Path, *, prefix: str, create: Sequence[Path] = ()) -> None:
        self.folder = folder
        self.staging = folder / f"{prefix}{uuid.uuid4().hex[:12]}"
        self.create = list(create)
        self.created: list[Path] = []
        self.staged: list[tuple[Path, Path]] = []
        self.moved: list[Path] = []
        self.kept: list[tuple[Path, Path]] = []

    def __enter__(self) -> StagedFiles:
        for path in self.create:
            self._make_folder(path)
        self.staging.mkdir()
        return self

    def _make_folder(self, path: Path) -> None:
        missing = list(itertools.takewhile(lambda parent: not parent.exists(), (path, *path.parents)))
        path.mkdir(parents=True, exist_ok=True)
        self.created.extend(reversed(missing))

    def stage(self, final: Path) -> Path:
        """A path in the staging folder for ``final``'s content (it ends with ``final``'s name, so its suffix)."""
        staged = self.staging / f"{len(self.staged):03d}-{final.name}"
        self.staged.append((staged, final))
        return staged

    def commit(self, *, overwrite: bool, remove: Sequence[Path] = ()) -> None:
        """Move the staged files into place and delete ``remove``; all or nothing.

        Raises:
            FileExistsError: A final path exists and ``overwrite`` is False (everything moved is then rolled back).
        """
        for index, (staged, final) in enumerate(self.staged):
            if final.exists():
                if not overwrite:
                    raise FileExistsError(f"{final} appeared during the export; refusing to overwrite it")
                self._keep(final, index)
            _move_into_place(staged, final, overwrite)
            self.moved.append(final)
        for index, path in enumerate(remove, start=len(self.staged)):
            self._keep(path, index)
            path.unlink()
        for folder in dict.fromkeys(path.parent for path in [*self.moved, *remove]):
            fsync_directory(folder)

    def _keep(self, path: Path, index: int) -> None:
        backup = self.staging / f"kept-{index:03d}-{path.name}"
        keep_copy(path, backup)
        self.kept.append((backup, path))

    def __exit__(self, exc_type: object, *rest: object) -> None:
        unrestored = self._roll_back() if exc_type is not None else []
        if unrestored:  # never delete the only copy of a user's file
            raise OSError(
                f"The export to {self.folder} failed and could not restore {', '.join(map(str, unrestored))}; the "
                f"earlier version(s) are kept in {self.staging}. Move them back by hand."
            )
        shutil.rmtree(self.staging, ignore_errors=True)
        if exc_type is not None:
            for path in reversed(self.created):
                with contextlib.suppress(OSError):
                    path.rmdir()  # only when empty

    def _roll_back(self) -> list[Path]:
        """Remove what was moved in, put back what was replaced or deleted; the files that could not be restored."""
        restored = {path for _, path in self.kept}
        for path in self.moved:
            if path not in restored:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        unrestored = []
        for backup, path in self.kept:
            try:
                os.replace(backup, path)
            except OSError:
                unrestored.append(path)
        return unrestored
