"""Sliding-window prediction: tile positions, the Gaussian importance map, and the blending of tile
probabilities into whole-image probabilities.

Tiles (nnU-Net style): along each axis the tile starts are evenly spaced from 0 to ``size - tile`` so that
neighbouring tiles overlap by at least ``overlap`` of the tile and the last tile ends at the border; an axis no
larger than the tile is not tiled (the model pads it). Every tile's softmax probabilities are weighted by a
Gaussian importance map (sigma = tile / 8 per axis, maximum 1, clamped away from 0 so no voxel gets a zero
weight) and summed in float32 on the CPU; dividing by the summed weights gives the blended probabilities.

The work is described as *items* of equal spatial shape (the slices of a volume for a 2D model, or one image /
volume) that are cut into tiles; tiles of consecutive items are batched together, and an item's blended
probabilities are handed on as soon as its last tile is in, so only the items in flight need accumulators.
Tiles are always blended in the same order, whatever the batch size, so the result does not depend on it.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "TileBlender",
    "TileGrid",
    "gaussian_importance_map",
    "iter_tile_batches",
    "run_tiles",
    "sliding_window_probabilities",
    "tile_starts",
]

MIN_IMPORTANCE = 1e-4
"""Smallest weight of the importance map, relative to its maximum of 1."""


def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Start indices of the tiles along one axis.

    Args:
        size: Length of the axis.
        tile: Tile length; an axis no longer than the tile gets one tile at 0.
        overlap: Minimum overlap of neighbouring tiles as a fraction of the tile, in [0, 1).

    Returns:
        Increasing starts from 0 to ``size - tile``, evenly spaced, with steps of at most ``tile * (1 - overlap)``.
    """
    if size < 1 or tile < 1:
        raise ValueError(f"size and tile must be >= 1, got {size} and {tile}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if size <= tile:
        return [0]
    max_step = max(1.0, tile * (1 - overlap))
    steps = math.ceil((size - tile) / max_step - 1e-9)
    step = (size - tile) / steps
    return [round(i * step) for i in range(steps + 1)]


@functools.lru_cache(maxsize=16)
def _cached_importance(tile: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    weights = np.ones((), dtype=np.float64)
    for length in tile:
        centre = (length - 1) / 2
        sigma = length * sigma_scale
        axis = np.exp(-0.5 * ((np.arange(length) - centre) / sigma) ** 2)
        weights = np.multiply.outer(weights, axis)
    weights /= weights.max()
    importance = np.maximum(weights, MIN_IMPORTANCE).astype(np.float32)
    importance.setflags(write=False)
    return importance


def gaussian_importance_map(tile: Sequence[int], sigma_scale: float = 1 / 8) -> np.ndarray:
    """Weights of the voxels of a tile: a Gaussian centred on the tile, maximum 1, at least ``MIN_IMPORTANCE``.

    Args:
        tile: Tile shape.
        sigma_scale: Sigma as a fraction of the tile length along each axis.

    Returns:
        ``(*tile)`` float32, read-only (cached).
    """
    return _cached_importance(tuple(int(t) for t in tile), float(sigma_scale))


@dataclass(frozen=True)
class TileGrid:
    """The tiles covering one item.

    Attributes:
        shape: Spatial shape of the item.
        tile: Effective tile shape: the requested tile, capped at ``shape``.
        starts: Start index of every tile, in the order they are predicted and blended.
    """

    shape: tuple[int, ...]
    tile: tuple[int, ...]
    starts: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, shape: Sequence[int], tile: Sequence[int], overlap: float) -> TileGrid:
        """Tiles of ``tile`` (capped at ``shape``) overlapping by at least ``overlap``."""
        shape = tuple(int(s) for s in shape)
        if len(tile) != len(shape):
            raise ValueError(f"tile {tuple(tile)} and image shape {shape} have different numbers of axes")
        effective = tuple(min(int(t), s) for t, s in zip(tile, shape, strict=True))
        per_axis = [tile_starts(s, t, overlap) for s, t in zip(shape, effective, strict=True)]
        return cls(shape, effective, tuple(itertools.product(*per_axis)))

    @property
    def num_tiles(self) -> int:
        return len(self.starts)

    def region(self, start: Sequence[int]) -> tuple[slice, ...]:
        """The index of the tile starting at ``start``."""
        return tuple(slice(b, b + t) for b, t in zip(start, self.tile, strict=True))

    @functools.cached_property
    def weight_sum(self) -> np.ndarray:
        """``(*shape)`` float32: the summed importance of all tiles at each voxel (blended in tile order)."""
        total = np.zeros(self.shape, dtype=np.float32)
        importance = gaussian_importance_map(self.tile)
        for start in self.starts:
            total[self.region(start)] += importance
        return total


def iter_tile_batches(
    grid: TileGrid, items: int | Sequence[int], batch_size: int
) -> Iterator[list[tuple[int, tuple[int, ...]]]]:
    """The ``(item, tile start)`` pairs of the items (a count: ``0 .. items - 1``), item by item, in batches of
    ``batch_size``."""
    items = range(items) if isinstance(items, int) else items
    pairs = ((item, start) for item in items for start in grid.starts)
    while batch := list(itertools.islice(pairs, batch_size)):
        yield batch


def num_batches(grid: TileGrid, num_items: int, batch_size: int) -> int:
    """How many batches :func:`iter_tile_batches` yields."""
    return math.ceil(num_items * grid.num_tiles / batch_size)


class TileBlender:
    """Blends the tile probabilities of the items in flight; hands each item on when its last tile is in.

    Args:
        grid: The tiles of one item.
        num_classes: Probability channels K.
        on_item_done: Called as ``on_item_done(item, probabilities)`` with ``(K, *grid.shape)`` float32 blended
            probabilities (which the callee may keep), once per item.
    """

    def __init__(self, grid: TileGrid, num_classes: int, on_item_done: Callable[[int, np.ndarray], None]) -> None:
        self.grid = grid
        self.num_classes = num_classes
        self.on_item_done = on_item_done
        self._sums: dict[int, np.ndarray] = {}
        self._counts: dict[int, int] = {}

    @property
    def items_in_flight(self) -> int:
        return len(self._sums)

    def add(self, item: int, start: tuple[int, ...], probabilities: np.ndarray) -> None:
        """Add the ``(K, *grid.tile)`` probabilities of the tile of ``item`` starting at ``start``."""
        grid = self.grid
        if grid.num_tiles == 1:  # the tile is the whole item: nothing to blend
            self.on_item_done(item, probabilities)
            return
        total = self._sums.get(item)
        if total is None:
            total = self._sums[item] = np.zeros((self.num_classes, *grid.shape), dtype=np.float32)
            self._counts[item] = 0
        total[(slice(None), *grid.region(start))] += probabilities * gaussian_importance_map(grid.tile)
        self._counts[item] += 1
        if self._counts[item] == grid.num_tiles:
            del self._sums[item], self._counts[item]
            total /= grid.weight_sum
            self.on_item_done(item, total)


def run_tiles(
    grid: TileGrid,
    items: int | Sequence[int],
    batch_size: int,
    read_tile: Callable[[int, tuple[slice, ...]], np.ndarray],
    predict_batch: Callable[[np.ndarray], np.ndarray],
    on_item_done: Callable[[int, np.ndarray], None],
    num_classes: int,
    check_cancel: Callable[[], None] = lambda: None,
) -> Generator[int, None, None]:
    """Predict every tile of every item, batch by batch, and blend them.

    Args:
        grid: The tiles of one item.
        items: The items to predict, or their number (then ``0 .. items - 1``).
        batch_size: Tiles per forward pass.
        read_tile: ``read_tile(item, region) -> (C, *grid.tile)`` input of one tile.
        predict_batch: ``(b, C, *grid.tile)`` float32 -> ``(b, K, *grid.tile)`` float32 probabilities.
        on_item_done: Receives each item's ``(K, *grid.shape)`` blended probabilities (see :class:`TileBlender`).
        num_classes: K.
        check_cancel: Called before every batch; raises to stop.

    Yields:
        The number of batches done, after each batch.
    """
    blender = TileBlender(grid, num_classes, on_item_done)
    for done, batch in enumerate(iter_tile_batches(grid, items, batch_size), start=1):
        check_cancel()
        inputs = np.stack([read_tile(item, grid.region(start)) for item, start in batch])
        probabilities = predict_batch(inputs)
        del inputs
        for (item, start), tile_probabilities in zip(batch, probabilities, strict=True):
            blender.add(item, start, tile_probabilities)
        del probabilities
        yield done


def sliding_window_probabilities(
    image: np.ndarray,
    predict_batch: Callable[[np.ndarray], np.ndarray],
    tile: Sequence[int],
    *,
    num_classes: int,
    overlap: float = 0.5,
    batch_size: int = 1,
) -> np.ndarray:
    """Blended probabilities of one image, for callers outside the predictor (e.g. validation in training).

    Args:
        image: ``(C, *spatial)`` float32 model input.
        predict_batch: ``(b, C, *tile)`` float32 -> ``(b, K, *tile)`` float32 probabilities.
        tile: Tile shape (capped at the image shape).
        num_classes: K.
        overlap: Minimum tile overlap, in [0, 1).
        batch_size: Tiles per call of ``predict_batch``.

    Returns:
        ``(K, *spatial)`` float32.
    """
    grid = TileGrid.build(image.shape[1:], tile, overlap)
    result: list[np.ndarray] = []
    steps = run_tiles(
        grid,
        1,
        batch_size,
        lambda _, region: image[(slice(None), *region)],
        predict_batch,
        lambda _, probabilities: result.append(probabilities),
        num_classes,
    )
    for _ in steps:
        pass
    return result[0]
