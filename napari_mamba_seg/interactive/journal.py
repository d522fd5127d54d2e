"""Crash-safe journal of the corrections of one label array (numpy + standard library only).

A :class:`CorrectionJournal` keeps, in a recovery folder, a full snapshot of the labels (the *base*) and one file per
correction made since: :class:`~napari_mamba_seg.interactive.edits.Edit` records of the correction tools, voxel
changes of napari's brush, and :class:`~napari_mamba_seg.interactive.review.ReviewState` updates. Every ``record_*``
call returns only once its record is on the disk (file and folder fsynced), so a crash (power cut, killed process)
never loses a correction the call acknowledged. After a crash, :meth:`CorrectionJournal.find` says what can be
restored and :meth:`CorrectionJournal.restore` rebuilds the labels and the review state.

Folder layout (``root / key``; one folder per labels layer, see :func:`journal_key`)::

    napari-mamba-seg-journal.json   marker: the folder belongs to a journal (never touched without it)
    CURRENT.json                    {"generation": "gen-000003"}, replaced atomically
    gen-000003/
        base.npz  base.json         the labels snapshot and its metadata (review state, counts, description)
        index.jsonl                 one JSON line per committed record: seq, kind, file, sha256, bytes, time
        00000001.edit.npz ...       the records, numbered from 1 in this generation

A record is written to a temporary name, fsynced and renamed, then committed by appending its line (with the
record's sha256) to ``index.jsonl`` and fsyncing it. On restore, a record whose line is torn, whose file is missing
or whose checksum differs is skipped, and so are the records after it (they were made on top of it). A new
generation (a new base) is written completely and made durable before ``CURRENT.json`` switches to it, so
:meth:`CorrectionJournal.start` on an existing key, :meth:`CorrectionJournal.record_snapshot` and compaction (every
``compact_after_records`` records or ``compact_after_bytes`` bytes) never leave a moment without a complete journal.

Example:
    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> labels = np.zeros((4, 8, 8), np.uint8)
    >>> journal = CorrectionJournal.start(root, "case1", labels, description={"image": "case1.nii.gz"})
    >>> new = labels.copy(); new[1, 2:4, 2:4] = 2
    >>> edit = Edit.between(labels, new, "paint"); edit.apply(labels)
    >>> journal.record_edit(edit)
    1
    >>> restored = CorrectionJournal.restore(root, "case1")
    >>> bool(np.array_equal(restored.labels, labels)), restored.num_records
    (True, 1)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import threading
import time
import uuid
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from napari_mamba_seg._durable import fsync_directory, write_durably
from napari_mamba_seg.interactive.edits import Edit
from napari_mamba_seg.interactive.review import ReviewState

__all__ = [
    "DEFAULT_COMPACT_AFTER_BYTES",
    "DEFAULT_COMPACT_AFTER_RECORDS",
    "RECOVERY_ROOT_ENV",
    "CorrectionJournal",
    "JournalError",
    "JournalInfo",
    "RestoredCorrections",
    "default_recovery_root",
    "discard_journal",
    "journal_key",
]

RECOVERY_ROOT_ENV = "NAPARI_MAMBA_SEG_RECOVERY"
"""Environment variable that overrides :func:`default_recovery_root`."""

DEFAULT_COMPACT_AFTER_RECORDS = 200
"""A journal folds its records into a new base snapshot after this many records."""

DEFAULT_COMPACT_AFTER_BYTES = 64 * 2**20
"""... or once its record files hold this many bytes."""

MARKER_NAME = "napari-mamba-seg-journal.json"
_CURRENT_NAME = "CURRENT.json"
_BASE_NAME = "base.npz"
_BASE_META_NAME = "base.json"
_INDEX_NAME = "index.jsonl"
_FORMAT = "napari-mamba-seg correction journal"
_FORMAT_VERSION = 1
_KEY_PATTERN = re.compile(r"[0-9A-Za-z][0-9A-Za-z_-]{0,127}")
_GENERATION_PATTERN = re.compile(r"gen-(\d{6,})")
_RECORD_PATTERN = re.compile(r"(\d{8,})\.(edit|voxels|region|review)\.(npz|json)")
_LABEL_KINDS = ("edit", "voxels", "region")


class JournalError(RuntimeError):
    """A recovery folder that is not a journal's, or a journal that cannot be read or written."""


def journal_key(source: str | os.PathLike[str] | None, shape: Sequence[int], affine: Any, layer_name: str) -> str:
    """A stable id of "this image's labels layer": the folder name of its journal under the recovery root.

    Reopening the same image file (under any spelling of its path) and naming the labels layer the same gives the
    same key, so the journal is found again. Images built in memory (no source) are identified by the layer name,
    the shape and the affine.

    Args:
        source: Path of the image file or DICOM folder the labels belong to (resolved, so relative paths and
            symbolic links give the same key), or None for an image built in memory.
        shape: Shape of the labels, e.g. ``(z, y, x)``.
        affine: ``(ndim + 1, ndim + 1)`` voxel-to-world affine of the labels, or None (rounded to 1e-6, so
            float noise from reading the header again does not change the key).
        layer_name: Name of the labels layer (an image may carry several labels layers).

    Returns:
        24 lower-case hex digits (the start of a sha256).

    Raises:
        ValueError: A shape that is not a sequence of non-negative integers, or an affine that is not a finite 2D
            array.
    """
    try:
        dims = [int(size) for size in shape]
    except (TypeError, ValueError) as error:
        raise ValueError(f"journal_key: shape must be a sequence of integers, got {shape!r}") from error
    if any(size < 0 for size in dims):
        raise ValueError(f"journal_key: shape must hold non-negative sizes, got {shape!r}")
    matrix = None
    if affine is not None:
        array = np.asarray(affine, dtype=np.float64)
        if array.ndim != 2 or not np.all(np.isfinite(array)):
            raise ValueError(f"journal_key: affine must be a finite 2D matrix, got shape {array.shape}")
        matrix = (np.round(array, 6) + 0.0).tolist()  # + 0.0 turns -0.0 into 0.0
    resolved = None if source is None else str(Path(os.fspath(source)).expanduser().resolve())
    identity = {"source": resolved, "shape": dims, "affine": matrix, "layer": str(layer_name)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:24]


def default_recovery_root() -> Path:
    """The folder holding the journals: ``$NAPARI_MAMBA_SEG_RECOVERY`` if set, else ``<user data dir>/recovery``.

    The user data dir is platformdirs' ``user_data_dir("napari-mamba-seg")`` (e.g. ``~/.local/share/napari-mamba-seg``
    on Linux). The folder is not created here.
    """
    override = os.environ.get(RECOVERY_ROOT_ENV, "").strip()
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("napari-mamba-seg", appauthor=False)) / "recovery"


@dataclass(frozen=True)
class JournalInfo:
    """What a journal holds, for the "restore unsaved corrections?" question on reopening an image.

    Attributes:
        key: The journal's key (see :func:`journal_key`).
        folder: The journal's folder (``root / key``).
        description: The ``description`` given to :meth:`CorrectionJournal.start` (e.g. image path, layer name).
        created: When the journal was started (local time zone).
        last_change: When its newest complete record (or base snapshot) was written.
        num_edits: Number of label changes recorded since the start (edits, voxel changes, snapshots).
        num_records: Number of records of any kind since the start (label changes and review updates).
        has_review: True when a review state was recorded.
        shape: Shape of the journalled labels.
        dtype: Name of their dtype (e.g. ``"uint8"``).
    """

    key: str
    folder: Path
    description: dict[str, Any]
    created: datetime
    last_change: datetime
    num_edits: int
    num_records: int
    has_review: bool
    shape: tuple[int, ...]
    dtype: str


@dataclass
class RestoredCorrections:
    """The labels and review state rebuilt from a journal.

    Attributes:
        labels: ``shape`` integer labels: the base snapshot with every complete record replayed in order.
        review: The newest recorded review state, or None when none was recorded.
        num_records: Number of records replayed since the journal was started (including those folded into the
            base by compaction): the acknowledged ``record_*`` calls that are in ``labels`` and ``review``.
        num_edits: The label-changing ones among them.
        skipped: One message per record that was found but not replayed (torn by a crash, or after such a
            record); empty when the journal was complete.
    """

    labels: np.ndarray
    review: ReviewState | None
    num_records: int
    num_edits: int
    skipped: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------------------------
# Files


def _write_file_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name (fsync, rename, fsync of the folder)."""
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        write_durably(temporary, data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def _json_bytes(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True).encode("utf-8")


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An ``.npz`` archive of ``arrays`` (deflate level 1: fast; label arrays compress well anyway)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def _load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _append_durably(path: Path, line: bytes) -> None:
    """Append ``line`` to ``path`` and fsync it; on failure the file is cut back to its old length."""
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        old_size = os.fstat(descriptor).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(descriptor, view) :]
            os.fsync(descriptor)
        except BaseException:
            os.ftruncate(descriptor, old_size)
            os.fsync(descriptor)
            raise
    finally:
        os.close(descriptor)


def _remove_tree(path: Path) -> None:
    """Remove ``path`` (a file, a link or a folder) without following links."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
        raise ValueError(
            f"journal key must be 1 to 128 letters, digits, '-' or '_' (not starting with '-' or '_'), got {key!r}; "
            "use journal_key(...)"
        )
    return key


def _marker_record(key: str) -> dict[str, Any]:
    return {"format": _FORMAT, "version": _FORMAT_VERSION, "key": key}


def _journal_folder(root: str | os.PathLike[str], key: str) -> Path | None:
    """``root / key`` when it is a journal's folder, None when it does not exist.

    Raises:
        JournalError: ``root / key`` is a link, not a folder, or a folder without the journal marker (made by
            something else): it is never used, changed or deleted.
    """
    folder = Path(root).expanduser() / _check_key(key)
    if folder.is_symlink():
        raise JournalError(
            f"{folder} is a symbolic link; a correction journal never follows links. Remove the link or choose "
            f"another recovery folder (${RECOVERY_ROOT_ENV})"
        )
    if not folder.exists():
        return None
    marker = folder / MARKER_NAME
    problem = None
    if not folder.is_dir():
        problem = "is not a folder"
    elif marker.is_symlink() or not marker.is_file():
        problem = f"has no {MARKER_NAME} marker"
    else:
        try:
            record = json.loads(marker.read_bytes())
        except (OSError, ValueError) as error:
            problem = f"has an unreadable {MARKER_NAME} ({error})"
        else:
            if not isinstance(record, dict) or record.get("format") != _FORMAT or record.get("key") != key:
                problem = f"has a {MARKER_NAME} that is not a correction journal's for key {key!r}"
    if problem is not None:
        raise JournalError(
            f"{folder} {problem}: it was not made by a correction journal, so it is left alone. Move it away or "
            f"choose another recovery folder (${RECOVERY_ROOT_ENV})"
        )
    return folder


def _current_generation(folder: Path) -> Path | None:
    """The folder of the current generation, or None when the journal holds none (e.g. a discard was cut short)."""
    pointer = folder / _CURRENT_NAME
    if not pointer.exists() and not pointer.is_symlink():
        return None
    try:
        if pointer.is_symlink():
            raise ValueError("it is a symbolic link")
        name = json.loads(pointer.read_bytes())["generation"]
        if not isinstance(name, str) or not _GENERATION_PATTERN.fullmatch(name):
            raise ValueError(f"bad generation name {name!r}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise JournalError(
            f"correction journal {folder}: {_CURRENT_NAME} is unreadable ({error}); discard the journal "
            "(discard_journal)"
        ) from error
    generation = folder / name
    if generation.is_symlink() or not generation.is_dir():
        raise JournalError(
            f"correction journal {folder}: its current generation {name} is missing; discard the journal "
            "(discard_journal)"
        )
    return generation


def _generation_number(path: Path) -> int | None:
    match = _GENERATION_PATTERN.fullmatch(path.name)
    return int(match.group(1)) if match else None


def _read_base_meta(generation: Path) -> dict[str, Any]:
    try:
        meta = json.loads((generation / _BASE_META_NAME).read_bytes())
        for name in ("shape", "dtype", "sha256", "created", "time", "description", "folded_records", "folded_edits"):
            if name not in meta:
                raise ValueError(f"it lacks {name!r}")
    except (OSError, ValueError, TypeError) as error:
        raise JournalError(
            f"correction journal {generation}: {_BASE_META_NAME} is unreadable ({error}); discard the journal "
            "(discard_journal)"
        ) from error
    return meta


def _read_base_labels(generation: Path, meta: Mapping[str, Any]) -> np.ndarray:
    path = generation / _BASE_NAME
    try:
        data = path.read_bytes()
        if _sha256(data) != meta["sha256"]:
            raise ValueError("its checksum does not match base.json")
        labels = _load_npz(data)["labels"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise JournalError(
            f"correction journal {generation}: the base snapshot {path.name} is damaged ({error}); nothing can be "
            "restored; discard the journal (discard_journal)"
        ) from error
    return np.array(labels, copy=True)


@dataclass(frozen=True)
class _IndexEntry:
    """One committed record line of ``index.jsonl``."""

    seq: int
    kind: str
    file: str
    sha256: str
    nbytes: int
    time: float
    description: str


def _read_index(generation: Path) -> tuple[list[_IndexEntry], list[str]]:
    """The committed entries of a generation's index in order, and messages about the lines that are not used.

    Entries must be numbered 1, 2, 3, ...: a torn or unparsable line is skipped (a crash while appending, whose
    record was never acknowledged); a line numbered beyond the next expected one (a record lost before it) ends
    the list, since the later records were made on top of the lost one.
    """
    try:
        data = (generation / _INDEX_NAME).read_bytes()
    except OSError as error:
        raise JournalError(
            f"correction journal {generation}: {_INDEX_NAME} is unreadable ({error}); discard the journal "
            "(discard_journal)"
        ) from error
    lines = data.split(b"\n")
    entries: list[_IndexEntry] = []
    skipped: list[str] = []
    if lines[-1]:
        skipped.append(f"{_INDEX_NAME}: a torn last line ({len(lines[-1])} bytes, a crash while writing it)")
    for number, line in enumerate(lines[:-1], start=1):
        entry = _parse_index_line(line)
        expected = len(entries) + 1
        if entry is None:
            skipped.append(f"{_INDEX_NAME} line {number}: unreadable, skipped")
        elif entry.seq < expected:
            skipped.append(f"{_INDEX_NAME} line {number}: record {entry.seq} repeated, skipped")
        elif entry.seq > expected:
            skipped.append(
                f"{_INDEX_NAME} line {number}: record {entry.seq} follows a missing record {expected}; it and the "
                "later records are not replayed"
            )
            break
        else:
            entries.append(entry)
    return entries, skipped


def _parse_index_line(line: bytes) -> _IndexEntry | None:
    try:
        record = json.loads(line)
        entry = _IndexEntry(
            seq=int(record["seq"]),
            kind=str(record["kind"]),
            file=str(record["file"]),
            sha256=str(record["sha256"]),
            nbytes=int(record["bytes"]),
            time=float(record["time"]),
            description=str(record.get("description", "")),
        )
    except (ValueError, KeyError, TypeError):
        return None
    match = _RECORD_PATTERN.fullmatch(entry.file)
    if match is None or int(match.group(1)) != entry.seq or match.group(2) != entry.kind:
        return None
    return entry


def _read_record(generation: Path, entry: _IndexEntry) -> bytes:
    """The bytes of a record, checked against its index entry.

    Raises:
        ValueError: The file is missing, a link, or of another size or checksum (torn by a crash).
    """
    path = generation / entry.file
    if path.is_symlink() or not path.is_file():
        raise ValueError(f"record file {entry.file} is missing")
    data = path.read_bytes()
    if len(data) != entry.nbytes or _sha256(data) != entry.sha256:
        raise ValueError(f"record file {entry.file} is torn ({len(data)} of {entry.nbytes} bytes or a bad checksum)")
    return data


# ----------------------------------------------------------------------------------------------------------------
# Records: encoding, checks and replay


def _region_arrays(region: tuple[slice, ...]) -> dict[str, np.ndarray]:
    return {
        "start": np.array([piece.start for piece in region], np.int64),
        "stop": np.array([piece.stop for piece in region], np.int64),
    }


def _region_from(arrays: Mapping[str, np.ndarray]) -> tuple[slice, ...]:
    return tuple(slice(int(start), int(stop)) for start, stop in zip(arrays["start"], arrays["stop"], strict=True))


def _encode_edit(edit: Edit) -> bytes:
    shape = np.array(edit.array_shape if edit.array_shape is not None else [], np.int64)
    return _npz_bytes({**_region_arrays(edit.region), "before": edit.before, "after": edit.after, "shape": shape})


def _replay_edit(labels: np.ndarray, arrays: Mapping[str, np.ndarray], description: str) -> None:
    shape = tuple(int(size) for size in arrays["shape"]) or None
    Edit(_region_from(arrays), arrays["before"], arrays["after"], description, array_shape=shape).apply(labels)


def _replay_voxels(labels: np.ndarray, arrays: Mapping[str, np.ndarray]) -> None:
    labels[tuple(arrays["indices"])] = arrays["new"]


def _replay_region(labels: np.ndarray, arrays: Mapping[str, np.ndarray]) -> None:
    for number in range(int(arrays["parts"])):
        part = {name[len(f"{number}_") :]: array for name, array in arrays.items() if name.startswith(f"{number}_")}
        box = labels[_region_from(part)]  # a view: labels are a numpy array
        if "mask" in part:
            box[part["mask"]] = part["new"]
        else:
            box[...] = part["new"]


def _replay(labels: np.ndarray, kind: str, data: bytes, description: str) -> ReviewState | None:
    """Apply one record to ``labels`` in place; returns the review state of a review record."""
    if kind == "review":
        return ReviewState.from_dict(json.loads(data))
    arrays = _load_npz(data)
    if kind == "edit":
        _replay_edit(labels, arrays, description)
    elif kind == "voxels":
        _replay_voxels(labels, arrays)
    else:
        _replay_region(labels, arrays)
    return None


def _values_for_labels(values: Any, dtype: np.dtype, shape: tuple[int, ...], what: str) -> np.ndarray:
    """``values`` broadcast to ``shape`` (a scalar stays 0D) as ``dtype``, refusing values it cannot hold."""
    array = np.asarray(values)
    if not array.size:
        array = array.astype(dtype)  # e.g. [] (float64 by default) for an empty change
    if array.dtype.kind not in "iub":
        raise ValueError(f"{what} must be integer labels, got dtype {array.dtype}")
    if array.size and array.dtype != dtype:
        info = np.iinfo(dtype)
        if int(array.min()) < info.min or int(array.max()) > info.max:
            raise ValueError(
                f"{what} hold values from {int(array.min())} to {int(array.max())}, which the labels' dtype {dtype} "
                "cannot store; record a snapshot of the converted labels instead"
            )
    if array.ndim:
        try:
            array = np.broadcast_to(array, shape)
        except ValueError as error:
            raise ValueError(f"{what} of shape {array.shape} do not match the {shape} voxels they describe") from error
    return array.astype(dtype, copy=False)


def _check_indices(indices: Any, shape: tuple[int, ...]) -> np.ndarray:
    """``(ndim, n)`` int64 voxel indices from a tuple of index arrays, each checked to lie inside ``shape``."""
    if not isinstance(indices, (tuple, list)) or len(indices) != len(shape):
        raise ValueError(
            f"indices must be a tuple of {len(shape)} index arrays (one per axis of labels of shape {shape}), "
            f"got {type(indices).__name__} of length {len(indices) if isinstance(indices, (tuple, list)) else '?'}"
        )
    arrays = [np.asarray(axis_indices) for axis_indices in indices]
    if any(array.dtype.kind not in "iu" for array in arrays):
        raise ValueError(f"indices must be integer arrays, got dtypes {[str(array.dtype) for array in arrays]}")
    try:
        arrays = np.broadcast_arrays(*arrays)
    except ValueError as error:
        raise ValueError(f"index arrays of shapes {[array.shape for array in arrays]} do not match") from error
    stacked = np.stack([array.ravel() for array in arrays]).astype(np.int64, copy=False)
    for axis, size in enumerate(shape):
        row = stacked[axis]
        if row.size and (row.min() < 0 or row.max() >= size):
            raise ValueError(
                f"indices along axis {axis} run from {int(row.min())} to {int(row.max())}, outside labels of shape "
                f"{shape}"
            )
    return stacked


def _last_write_wins(
    indices: np.ndarray, old: np.ndarray, new: np.ndarray, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each voxel once: the last of its new values (numpy does not promise an order for repeated fancy indices)
    and the first of its old values (its value before the whole change).

    Args:
        indices: ``(ndim, n)`` voxel indices inside ``shape``.
        old: ``(n,)`` values before.
        new: ``(n,)`` values after.
        shape: The labels' shape.

    Returns:
        ``(ndim, m)`` indices, ``(m,)`` old and ``(m,)`` new values, ``m <= n``, in first-occurrence order.
    """
    flat = np.ravel_multi_index(tuple(indices), shape)
    _, first = np.unique(flat, return_index=True)
    if first.size == flat.size:
        return indices, np.asarray(old), np.asarray(new)
    _, last_reversed = np.unique(flat[::-1], return_index=True)
    last = flat.size - 1 - last_reversed  # np.unique sorts by voxel, so first[i] and last[i] are one voxel
    order = np.argsort(first, kind="stable")
    return indices[:, first[order]], np.asarray(old)[first[order]], np.asarray(new)[last[order]]


def _check_region(region: Any, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Concrete ``slice(start, stop)`` per axis (None ends resolved against ``shape``), step 1."""
    if not isinstance(region, (tuple, list)) or len(region) != len(shape):
        raise ValueError(f"region must be a tuple of {len(shape)} slices (labels of shape {shape}), got {region!r}")
    pieces = []
    for axis, (piece, size) in enumerate(zip(region, shape, strict=True)):
        if not isinstance(piece, slice) or piece.step not in (None, 1):
            raise ValueError(f"region axis {axis} must be a slice with step 1, got {piece!r}")
        start, stop, _ = piece.indices(size)
        pieces.append(slice(start, max(start, stop)))
    return tuple(pieces)


# ----------------------------------------------------------------------------------------------------------------
# The journal


class CorrectionJournal:
    """The crash-safe journal of the corrections of one label array, in the folder ``root / key``.

    Create one with :meth:`start` (never with the constructor); then call a ``record_*`` method after each
    correction has been applied to the labels. Each call returns once its record is durable. The journal keeps
    its own copy of the labels (the base with every record applied; see :attr:`labels`), which it folds into a
    new base snapshot every ``compact_after_records`` records or ``compact_after_bytes`` bytes of records, so
    that a restore stays fast. One journal object per key at a time; its methods are thread-safe.
    """

    def __init__(self, folder: Path, key: str, *, _token: object = None) -> None:
        """Internal: use :meth:`start`."""
        if _token is not _START_TOKEN:
            raise TypeError("create a CorrectionJournal with CorrectionJournal.start(root, key, labels, ...)")
        self.folder = folder
        self.key = key
        self._lock = threading.RLock()
        self._discarded = False
        self._labels = np.zeros((0,), np.uint8)
        self._review: ReviewState | None = None
        self._description: dict[str, Any] = {}
        self._created = 0.0
        self._generation = folder
        self._records_in_generation = 0
        self._bytes_in_generation = 0
        self._edits_in_generation = 0
        self._folded_records = 0
        self._folded_edits = 0
        self.compact_after_records = DEFAULT_COMPACT_AFTER_RECORDS
        self.compact_after_bytes = DEFAULT_COMPACT_AFTER_BYTES

    # -- creation ---------------------------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        root: str | os.PathLike[str],
        key: str,
        base_labels: Any,
        *,
        description: Mapping[str, Any],
        review: ReviewState | None = None,
        compact_after_records: int = DEFAULT_COMPACT_AFTER_RECORDS,
        compact_after_bytes: int = DEFAULT_COMPACT_AFTER_BYTES,
    ) -> CorrectionJournal:
        """Start a new journal for ``key`` whose base is a snapshot of ``base_labels``.

        A previous journal of the same key is replaced, but only once the new base is durable: if this call fails
        or the process dies during it, the previous journal is still there, complete.

        Args:
            root: The recovery root (e.g. :func:`default_recovery_root`); created when missing.
            key: The journal's key, from :func:`journal_key`.
            base_labels: ``(z, y, x)`` or any-shape integer labels as they are now (copied).
            description: JSON-serialisable facts shown when offering a restore (image path, layer name, ...).
            review: The current review state, if any (restored when no later review record replaces it).
            compact_after_records: Fold the records into a new base after this many (>= 1).
            compact_after_bytes: ... or once the record files hold this many bytes (>= 1).

        Returns:
            The journal, with no records yet.

        Raises:
            JournalError: ``root / key`` exists but is not a journal's folder (it is left untouched).
            ValueError: A bad key, labels that are not integer, a description that is not JSON-serialisable, a
                review state that does not fit the labels, or bad compaction limits.
            TypeError: ``review`` is not a ReviewState.
            OSError: The disk refused the write (the previous journal, if any, is unchanged).
        """
        labels = _check_labels(base_labels, "base_labels")
        description = _check_description(description)
        review = _check_review(review, labels.shape)
        for name, value in (
            ("compact_after_records", compact_after_records),
            ("compact_after_bytes", compact_after_bytes),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        folder = _journal_folder(root, key)
        if folder is None:
            folder = _create_journal_folder(Path(root).expanduser(), key)
        journal = cls(folder, key, _token=_START_TOKEN)
        journal.compact_after_records = int(compact_after_records)
        journal.compact_after_bytes = int(compact_after_bytes)
        journal._labels = np.array(labels, copy=True)
        journal._review = review
        journal._description = description
        journal._created = time.time()
        with journal._lock:
            journal._write_generation()
        return journal

    # -- recording --------------------------------------------------------------------------------------------

    def record_edit(self, edit: Edit) -> int:
        """Record an :class:`Edit` that has been applied to the labels.

        Returns:
            The number of records since the start (this one included).

        Raises:
            TypeError: ``edit`` is not an Edit (e.g. None from a tool that changed nothing).
            ValueError: The edit does not fit the journalled labels (nothing is recorded).
            JournalError: The journal was discarded.
        """
        if not isinstance(edit, Edit):
            raise TypeError(f"record_edit expects an Edit, got {type(edit).__name__}; skip None (nothing changed)")
        with self._lock:
            self._check_open()
            edit.check_fits(self._labels)
            self._commit("edit", _encode_edit(edit), edit.description, lambda: edit.apply(self._labels))
            return self.num_records

    def record_voxels(self, indices: Any, old_values: Any, new_values: Any, description: str) -> int | None:
        """Record a change of single voxels, e.g. napari's ``data_setitem`` history atom.

        Args:
            indices: Tuple of ``ndim`` integer arrays of one length ``n`` (numpy fancy index) of the changed voxels.
            old_values: ``(n,)`` (or a scalar) values before the change; kept so the record describes the change.
            new_values: ``(n,)`` or a scalar: the values after the change. A voxel listed several times gets its
                last value (whole strokes can be recorded as one concatenated change).
            description: What the change was (e.g. ``"brush"``).

        Returns:
            The number of records since the start, or None when ``indices`` is empty (nothing is recorded).

        Raises:
            ValueError: Indices outside the labels, mismatched lengths, or values the labels' dtype cannot hold
                (nothing is recorded).
            JournalError: The journal was discarded.
        """
        with self._lock:
            self._check_open()
            stacked = _check_indices(indices, self._labels.shape)
            count = (stacked.shape[1],)
            old = _values_for_labels(old_values, self._labels.dtype, count, "old_values")
            new = np.broadcast_to(_values_for_labels(new_values, self._labels.dtype, count, "new_values"), count)
            if not count[0]:
                return None
            stacked, old, new = _last_write_wins(stacked, np.broadcast_to(old, count), new, self._labels.shape)
            data = _npz_bytes({"indices": stacked, "old": old, "new": new})
            self._commit("voxels", data, description, lambda: self._labels.__setitem__(tuple(stacked), new))
            return self.num_records

    def record_region(
        self, region: Sequence[slice], mask: Any, old_values: Any, new_values: Any, description: str
    ) -> int:
        """Record a masked change inside a box, e.g. one napari brush / fill / polygon history atom.

        Args:
            region: One slice per axis: the box (``slice(None)`` ends are resolved against the labels' shape).
            mask: Box-shaped bool array of the changed voxels, or None when every voxel of the box changed.
            old_values: The values before: ``(mask.sum(),)`` with a mask, box-shaped without one (or a scalar).
            new_values: The values after, same shapes as ``old_values`` (or a scalar, e.g. the painted label).
            description: What the change was (e.g. ``"brush"``).

        Returns:
            The number of records since the start (this one included).

        Raises:
            ValueError: A region outside the labels, a mask or values of the wrong shape, or values the labels'
                dtype cannot hold (nothing is recorded).
            JournalError: The journal was discarded.
        """
        return self.record_regions([(region, mask, old_values, new_values)], description)

    def record_regions(self, changes: Sequence[tuple[Any, Any, Any, Any]], description: str) -> int | None:
        """Record several masked box changes made together as one record, replayed in order.

        One brush stroke in napari is a list of history atoms (one per mouse move); recording them as one record
        keeps the stroke whole on restore and costs one fsync instead of one per atom.

        Args:
            changes: ``(region, mask, old_values, new_values)`` tuples as in :meth:`record_region`, in the order
                they were applied.
            description: What the change was (e.g. ``"brush stroke"``).

        Returns:
            The number of records since the start, or None when ``changes`` is empty (nothing is recorded).

        Raises:
            ValueError: Any change invalid as in :meth:`record_region` (nothing is recorded).
            JournalError: The journal was discarded.
        """
        with self._lock:
            self._check_open()
            changes = list(changes)
            arrays: dict[str, np.ndarray] = {}
            for number, change in enumerate(changes):
                if not isinstance(change, (tuple, list)) or len(change) != 4:
                    raise ValueError(f"change {number} must be a (region, mask, old_values, new_values) tuple")
                for name, array in self._region_change_arrays(*change).items():
                    arrays[f"{number}_{name}"] = array
            if not changes:
                return None
            arrays["parts"] = np.array(len(changes), np.int64)
            self._commit("region", _npz_bytes(arrays), description, lambda: _replay_region(self._labels, arrays))
            return self.num_records

    def _region_change_arrays(self, region: Any, mask: Any, old_values: Any, new_values: Any) -> dict[str, Any]:
        """The checked arrays of one masked box change (start, stop, mask when given, old, new)."""
        box = _check_region(region, self._labels.shape)
        box_shape = tuple(piece.stop - piece.start for piece in box)
        arrays = _region_arrays(box)
        if mask is None:
            target = box_shape
        else:
            mask = np.asarray(mask)
            if mask.dtype != np.bool_ or mask.shape != box_shape:
                raise ValueError(
                    f"mask must be a bool array of the region's shape {box_shape}, got {mask.dtype} {mask.shape}"
                )
            arrays["mask"] = mask
            target = (int(np.count_nonzero(mask)),)
        arrays["old"] = _values_for_labels(old_values, self._labels.dtype, target, "old_values")
        arrays["new"] = _values_for_labels(new_values, self._labels.dtype, target, "new_values")
        return arrays

    def record_review(self, state: ReviewState) -> int:
        """Record the current review state (the newest one recorded is the one restored).

        Returns:
            The number of records since the start (this one included).

        Raises:
            TypeError: ``state`` is not a ReviewState.
            ValueError: The state does not fit the labels' shape.
            JournalError: The journal was discarded.
        """
        if not isinstance(state, ReviewState):
            raise TypeError(f"record_review expects a ReviewState, got {type(state).__name__}")
        with self._lock:
            self._check_open()
            copy = _check_review(state, self._labels.shape)
            self._commit("review", _json_bytes(copy.to_dict()), "review", lambda: setattr(self, "_review", copy))
            return self.num_records

    def record_snapshot(self, labels: Any) -> int:
        """Record that the whole label array was replaced (e.g. a new segmentation): it becomes the new base.

        Args:
            labels: The new labels, the journalled shape (their dtype may differ, e.g. widened to hold a new class).

        Returns:
            The number of records since the start (this one included).

        Raises:
            ValueError: Non-integer labels, or another shape (start a new journal for labels of another shape).
            JournalError: The journal was discarded.
        """
        array = _check_labels(labels, "labels")
        with self._lock:
            self._check_open()
            if array.shape != self._labels.shape:
                raise ValueError(
                    f"record_snapshot: labels of shape {array.shape} replace journalled labels of shape "
                    f"{self._labels.shape}; start a new journal (CorrectionJournal.start) for labels of another shape"
                )
            previous = (self._labels, self._folded_records, self._folded_edits)
            self._labels = np.array(array, copy=True)
            self._folded_records += self._records_in_generation + 1
            self._folded_edits += self._edits_in_generation + 1
            try:
                self._write_generation()
            except BaseException:
                self._labels, self._folded_records, self._folded_edits = previous
                raise
            return self.num_records

    def compact(self) -> None:
        """Fold the records into a new base snapshot now (the journal's content stays the same).

        Raises:
            OSError: The disk refused the write (the journal stays as it was, complete).
            JournalError: The journal was discarded.
        """
        with self._lock:
            self._check_open()
            if not self._records_in_generation:
                return
            previous = (self._folded_records, self._folded_edits)
            self._folded_records += self._records_in_generation
            self._folded_edits += self._edits_in_generation
            try:
                self._write_generation()
            except BaseException:
                self._folded_records, self._folded_edits = previous
                raise

    def discard(self) -> None:
        """Remove the journal's folder (e.g. after the labels were saved or exported); the journal is closed."""
        with self._lock:
            if not self._discarded:
                discard_journal(self.folder.parent, self.key)
                self._discarded = True

    # -- state ------------------------------------------------------------------------------------------------

    @property
    def labels(self) -> np.ndarray:
        """Read-only view of the journalled labels (base + every record): what :meth:`restore` would return."""
        view = self._labels.view()
        view.flags.writeable = False
        return view

    @property
    def review(self) -> ReviewState | None:
        """A copy of the newest journalled review state, or None."""
        return None if self._review is None else ReviewState.from_dict(self._review.to_dict())

    @property
    def num_records(self) -> int:
        """Number of records since the start (including those folded into the base)."""
        return self._folded_records + self._records_in_generation

    @property
    def num_edits(self) -> int:
        """Number of label-changing records since the start."""
        return self._folded_edits + self._edits_in_generation

    @property
    def discarded(self) -> bool:
        """True once :meth:`discard` removed the journal."""
        return self._discarded

    # -- reading ----------------------------------------------------------------------------------------------

    @staticmethod
    def find(root: str | os.PathLike[str], key: str) -> JournalInfo | None:
        """What the journal of ``key`` holds, without replaying it; None when there is none.

        Records torn by a crash are not counted (their size is checked; :meth:`restore` also checks checksums).

        Raises:
            JournalError: ``root / key`` is not a journal's folder, or its base is unreadable.
        """
        folder = _journal_folder(root, key)
        generation = None if folder is None else _current_generation(folder)
        if folder is None or generation is None:
            return None
        meta = _read_base_meta(generation)
        entries, _ = _read_index(generation)
        complete = []
        for entry in entries:
            path = generation / entry.file
            if path.is_symlink() or not path.is_file() or path.stat().st_size != entry.nbytes:
                break
            complete.append(entry)
        has_review = meta.get("review") is not None or any(entry.kind == "review" for entry in complete)
        last_change = max([float(meta["time"])] + [entry.time for entry in complete])
        return JournalInfo(
            key=key,
            folder=folder,
            description=dict(meta["description"]),
            created=datetime.fromtimestamp(float(meta["created"])).astimezone(),
            last_change=datetime.fromtimestamp(last_change).astimezone(),
            num_edits=int(meta["folded_edits"]) + sum(entry.kind in _LABEL_KINDS for entry in complete),
            num_records=int(meta["folded_records"]) + len(complete),
            has_review=has_review,
            shape=tuple(int(size) for size in meta["shape"]),
            dtype=np.dtype(meta["dtype"]).name,
        )

    @staticmethod
    def restore(root: str | os.PathLike[str], key: str) -> RestoredCorrections:
        """Rebuild the labels and review state: the base snapshot with every complete record replayed in order.

        A record torn by a crash (torn index line, missing or truncated file, bad checksum) is skipped, and so are
        the records after it; :attr:`RestoredCorrections.skipped` says which. The journal itself is not changed.

        Raises:
            JournalError: No journal for ``key``, a folder that is not a journal's, or an unreadable base snapshot.
        """
        folder = _journal_folder(root, key)
        generation = None if folder is None else _current_generation(folder)
        if folder is None or generation is None:
            raise JournalError(f"no correction journal {key!r} in {root}; check CorrectionJournal.find first")
        meta = _read_base_meta(generation)
        labels = _read_base_labels(generation, meta)
        review = None if meta.get("review") is None else ReviewState.from_dict(meta["review"])
        entries, skipped = _read_index(generation)
        replayed = edits = 0
        for position, entry in enumerate(entries):
            try:
                state = _replay(labels, entry.kind, _read_record(generation, entry), entry.description)
            except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as error:
                later = len(entries) - position - 1
                skipped.append(f"record {entry.seq}: {error}; it and the {later} later record(s) are not replayed")
                break
            replayed += 1
            edits += entry.kind in _LABEL_KINDS
            if state is not None:
                review = state
        return RestoredCorrections(
            labels=labels,
            review=review,
            num_records=int(meta["folded_records"]) + replayed,
            num_edits=int(meta["folded_edits"]) + edits,
            skipped=tuple(skipped),
        )

    # -- internals --------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._discarded:
            raise JournalError(f"correction journal {self.folder} was discarded; start a new one")

    def _commit(self, kind: str, data: bytes, description: str, apply: Any) -> None:
        """Write one record durably, commit it in the index, then apply it to the journal's labels."""
        seq = self._records_in_generation + 1
        name = f"{seq:08d}.{kind}.{'json' if kind == 'review' else 'npz'}"
        _write_file_durably(self._generation / name, data)
        line = {
            "seq": seq,
            "kind": kind,
            "file": name,
            "sha256": _sha256(data),
            "bytes": len(data),
            "time": time.time(),
            "description": str(description),
        }
        _append_durably(self._generation / _INDEX_NAME, _json_bytes(line) + b"\n")
        apply()
        self._records_in_generation = seq
        self._bytes_in_generation += len(data)
        self._edits_in_generation += kind in _LABEL_KINDS
        if (
            self._records_in_generation >= self.compact_after_records
            or self._bytes_in_generation >= self.compact_after_bytes
        ):
            self._compact_quietly()

    def _compact_quietly(self) -> None:
        """Compaction after a record: a failure leaves the (complete) journal as it is and warns."""
        try:
            self.compact()
        except OSError as error:
            warnings.warn(
                f"correction journal {self.folder}: compaction failed ({error}); the records are safe and the next "
                "record tries again",
                RuntimeWarning,
                stacklevel=3,
            )

    def _write_generation(self) -> None:
        """Write a new generation (base = the journal's labels, no records), durably, then switch to it."""
        numbers = [_generation_number(path) for path in self.folder.iterdir()]
        generation = self.folder / f"gen-{max([n for n in numbers if n is not None], default=0) + 1:06d}"
        try:
            generation.mkdir()
            base = _npz_bytes({"labels": self._labels})
            _write_file_durably(generation / _BASE_NAME, base)
            now = time.time()
            meta = {
                "format": _FORMAT,
                "version": _FORMAT_VERSION,
                "shape": list(self._labels.shape),
                "dtype": self._labels.dtype.str,
                "sha256": _sha256(base),
                "created": self._created,
                "time": now,
                "description": self._description,
                "review": None if self._review is None else self._review.to_dict(),
                "folded_records": self._folded_records,
                "folded_edits": self._folded_edits,
            }
            _write_file_durably(generation / _BASE_META_NAME, _json_bytes(meta))
            _write_file_durably(generation / _INDEX_NAME, b"")
            fsync_directory(self.folder)
            _write_file_durably(self.folder / _CURRENT_NAME, _json_bytes({"generation": generation.name}))
        except BaseException:
            if _current_generation_name(self.folder) != generation.name:
                _remove_tree(generation)
            raise
        self._generation = generation
        self._records_in_generation = self._bytes_in_generation = self._edits_in_generation = 0
        with contextlib.suppress(OSError):  # leftovers are harmless; the next generation removes them
            _remove_leftovers(self.folder, keep=generation.name)


_START_TOKEN = object()


def _current_generation_name(folder: Path) -> str | None:
    try:
        return json.loads((folder / _CURRENT_NAME).read_bytes())["generation"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remove_leftovers(folder: Path, *, keep: str) -> None:
    """Remove the generations other than ``keep`` and temporary files of cut-short writes (inside ``folder``)."""
    for path in folder.iterdir():
        if path.name == keep:
            continue
        if _generation_number(path) is not None or (path.name.startswith(".") and ".tmp-" in path.name):
            _remove_tree(path)
    fsync_directory(folder)


def _create_journal_folder(root: Path, key: str) -> Path:
    """Create ``root / key`` holding only the marker: built under a temporary name, then renamed into place."""
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{key}.tmp-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        write_durably(staging / MARKER_NAME, _json_bytes(_marker_record(key)))
        fsync_directory(staging)
        os.rename(staging, root / key)
    except BaseException:
        _remove_tree(staging)
        raise
    fsync_directory(root)
    return root / key


def discard_journal(root: str | os.PathLike[str], key: str) -> bool:
    """Remove the journal of ``key`` (e.g. the user declined to restore it, or saved the labels).

    The current-generation pointer goes first (so the journal vanishes at once) and the marker last, so a removal
    cut short leaves a folder that is still recognised as a journal's.

    Returns:
        True when a journal folder was removed, False when there was none.

    Raises:
        JournalError: ``root / key`` is not a journal's folder (it is left untouched).
    """
    folder = _journal_folder(root, key)
    if folder is None:
        return False
    (folder / _CURRENT_NAME).unlink(missing_ok=True)
    fsync_directory(folder)
    for path in folder.iterdir():
        if path.name != MARKER_NAME:
            _remove_tree(path)
    (folder / MARKER_NAME).unlink()
    folder.rmdir()
    fsync_directory(folder.parent)
    return True


def _check_labels(labels: Any, name: str) -> np.ndarray:
    array = np.asarray(labels)
    if array.dtype.kind not in "iu" or array.ndim == 0:
        raise ValueError(
            f"{name} must be an integer label array with at least one axis, got dtype {array.dtype} shape "
            f"{array.shape}; convert it, e.g. labels.astype(np.uint8)"
        )
    return array


def _check_description(description: Any) -> dict[str, Any]:
    if not isinstance(description, Mapping):
        raise ValueError(f"description must be a dict of JSON values, got {type(description).__name__}")
    try:
        return json.loads(json.dumps(dict(description)))
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"description must hold JSON values only (str, numbers, lists, dicts), got {description!r}: {error}"
        ) from error


def _check_review(review: ReviewState | None, shape: tuple[int, ...]) -> ReviewState | None:
    if review is None:
        return None
    if not isinstance(review, ReviewState):
        raise TypeError(f"review must be a ReviewState or None, got {type(review).__name__}")
    review.check_fits(shape)
    return ReviewState.from_dict(review.to_dict())
