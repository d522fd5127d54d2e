"""Which slices of a label array a person has reviewed (numpy only).

:class:`ReviewState` records the reviewed slice indices along one axis. Its :meth:`ReviewState.trusted_mask` is the
"reviewed mask" fine-tuning trains on (``TrainingCase.trusted``): True on reviewed slices, whose labels are known to
be right. It round-trips through JSON (:meth:`ReviewState.to_dict` / :meth:`ReviewState.from_dict`), so it can live
in a napari layer's ``metadata`` under :data:`REVIEW_METADATA_KEY`.

Example:
    >>> state = ReviewState.for_shape((5, 8, 8), axis=0)
    >>> state.mark(1); state.mark(3)
    >>> state.remaining, state.next_unreviewed(after=1)
    (3, 2)
    >>> int(state.trusted_mask((5, 8, 8)).sum())
    128
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_mamba_seg.interactive._checks import is_integer

__all__ = ["REVIEW_METADATA_KEY", "ReviewState"]

REVIEW_METADATA_KEY = "napari_mamba_seg.review"
"""Key of the :meth:`ReviewState.to_dict` record in a napari Labels layer's ``metadata``."""


@dataclass
class ReviewState:
    """The reviewed slices of a label array along one axis.

    Attributes:
        axis: The slice axis (0 <= axis < the labels' ndim).
        num_slices: Number of slices along ``axis`` (the labels' ``shape[axis]``).
        reviewed: Indices of the reviewed slices, each in ``[0, num_slices)``.

    Raises:
        ValueError: A negative axis, a number of slices below 1, or a reviewed index out of range.
    """

    axis: int
    num_slices: int
    reviewed: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        """Check the fields; ``reviewed`` may be any iterable of indices."""
        if not is_integer(self.axis) or self.axis < 0:
            raise ValueError(f"ReviewState axis must be a non-negative integer (the slice axis), got {self.axis!r}")
        if not is_integer(self.num_slices) or self.num_slices < 1:
            raise ValueError(
                f"ReviewState num_slices must be a positive integer (shape[axis] of the labels), got "
                f"{self.num_slices!r}"
            )
        self.axis, self.num_slices = int(self.axis), int(self.num_slices)
        if isinstance(self.reviewed, (str, bytes)) or not isinstance(self.reviewed, Iterable):
            raise ValueError(f"ReviewState reviewed must be a set of slice indices, got {self.reviewed!r}")
        self.reviewed = {self._check_index(index, "reviewed slice") for index in self.reviewed}

    @classmethod
    def for_shape(cls, shape: tuple[int, ...], axis: int) -> ReviewState:
        """An empty state (nothing reviewed) for labels of ``shape`` sliced along ``axis``.

        Raises:
            ValueError: ``axis`` out of range for ``shape``.
        """
        shape = tuple(shape)
        if not is_integer(axis) or not 0 <= axis < len(shape):
            raise ValueError(f"axis must be an integer from 0 to {len(shape) - 1} for shape {shape}, got {axis!r}")
        return cls(int(axis), int(shape[axis]))

    def _check_index(self, index: Any, what: str = "slice index") -> int:
        if not is_integer(index) or not 0 <= index < self.num_slices:
            raise ValueError(f"{what} must be an integer from 0 to {self.num_slices - 1}, got {index!r}")
        return int(index)

    def mark(self, index: int) -> None:
        """Mark slice ``index`` as reviewed (no-op when it already is).

        Raises:
            ValueError: ``index`` not an integer in ``[0, num_slices)``.
        """
        self.reviewed.add(self._check_index(index))

    def unmark(self, index: int) -> None:
        """Mark slice ``index`` as not reviewed (no-op when it is not).

        Raises:
            ValueError: ``index`` not an integer in ``[0, num_slices)``.
        """
        self.reviewed.discard(self._check_index(index))

    def is_reviewed(self, index: int) -> bool:
        """True when slice ``index`` is reviewed.

        Raises:
            ValueError: ``index`` not an integer in ``[0, num_slices)``.
        """
        return self._check_index(index) in self.reviewed

    @property
    def remaining(self) -> int:
        """Number of slices not yet reviewed."""
        return self.num_slices - len(self.reviewed)

    def next_unreviewed(self, after: int = -1, *, wrap: bool = True) -> int | None:
        """The first slice after ``after`` that is not reviewed.

        Args:
            after: Start looking at ``after + 1`` (-1 starts at slice 0).
            wrap: Continue from slice 0 when no later slice is left.

        Returns:
            A slice index, or None when every slice (every later slice, with ``wrap=False``) is reviewed.

        Raises:
            ValueError: ``after`` not an integer in ``[-1, num_slices)``.
        """
        if not is_integer(after) or not -1 <= after < self.num_slices:
            raise ValueError(f"after must be an integer from -1 to {self.num_slices - 1}, got {after!r}")
        order = list(range(int(after) + 1, self.num_slices))
        if wrap:
            order += list(range(int(after) + 1))
        return next((index for index in order if index not in self.reviewed), None)

    def check_fits(self, shape: tuple[int, ...]) -> None:
        """Raise a ValueError unless the state describes labels of ``shape``.

        Raises:
            ValueError: ``axis`` beyond the dimensions of ``shape``, or ``shape[axis] != num_slices`` (e.g. the
                state was stored for another image); the message says how to start over.
        """
        shape = tuple(int(size) for size in shape)
        if self.axis >= len(shape) or shape[self.axis] != self.num_slices:
            have = f"{shape[self.axis]} slices" if self.axis < len(shape) else f"only {len(shape)} axes"
            raise ValueError(
                f"review state ({self.num_slices} slices along axis {self.axis}) does not fit labels of shape {shape} "
                f"({have}); it belongs to other labels: start a new one with ReviewState.for_shape(shape, axis)"
            )

    def trusted_mask(self, shape: tuple[int, ...]) -> np.ndarray:
        """The reviewed mask for fine-tuning: True on every voxel of a reviewed slice.

        Args:
            shape: The labels' shape, e.g. ``(z, y, x)``.

        Returns:
            ``shape`` bool array.

        Raises:
            ValueError: The state does not fit ``shape`` (see :meth:`check_fits`).
        """
        self.check_fits(shape)
        along_axis = np.zeros(self.num_slices, bool)
        along_axis[sorted(self.reviewed)] = True
        view = [1] * len(shape)
        view[self.axis] = self.num_slices
        return np.broadcast_to(along_axis.reshape(view), tuple(shape)).copy()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record: ``{"axis": int, "num_slices": int, "reviewed": sorted list of int}``."""
        return {"axis": self.axis, "num_slices": self.num_slices, "reviewed": sorted(self.reviewed)}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> ReviewState:
        """Rebuild a state from :meth:`to_dict`'s record (extra keys are ignored).

        Raises:
            ValueError: Not a mapping, a missing key or an invalid value.
        """
        if not isinstance(record, Mapping):
            raise ValueError(f"review state record must be a dict from ReviewState.to_dict(), got {record!r}")
        missing = [key for key in ("axis", "num_slices", "reviewed") if key not in record]
        if missing:
            raise ValueError(
                f"review state record lacks {missing}; expected the keys axis, num_slices and reviewed "
                "(from ReviewState.to_dict())"
            )
        reviewed = record["reviewed"]
        if not isinstance(reviewed, (list, tuple, set, frozenset)):
            raise ValueError(f"review state record: reviewed must be a list of slice indices, got {reviewed!r}")
        return cls(record["axis"], record["num_slices"], set(reviewed))
