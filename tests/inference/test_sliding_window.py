"""Sliding window: tile positions, the importance map, the blending arithmetic, and tiled = untiled for a
per-pixel model (2D and 3D tilings, several overlaps, odd sizes)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_mamba_seg.bundles import ModelCard
from napari_mamba_seg.inference import (
    PredictionSettings,
    Predictor,
    gaussian_importance_map,
    sliding_window_probabilities,
    tile_starts,
)
from napari_mamba_seg.inference.sliding_window import MIN_IMPORTANCE, TileGrid


@pytest.mark.parametrize("size", [1, 16, 17, 40, 97])
@pytest.mark.parametrize("tile", [5, 16, 33])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.9])
def test_tile_starts_cover_the_axis_with_the_requested_overlap(size: int, tile: int, overlap: float) -> None:
    starts = tile_starts(size, tile, overlap)
    if size <= tile:
        assert starts == [0]
        return
    assert starts[0] == 0 and starts[-1] == size - tile  # the last tile ends at the border
    steps = np.diff(starts)
    assert np.all(steps > 0)
    assert steps.max() - steps.min() <= 1  # evenly spaced (up to rounding)
    assert np.all(steps <= math.floor(tile * (1 - overlap)) + 1)  # overlap at least as asked (up to rounding)
    # as few tiles as that allows
    assert len(starts) == math.ceil((size - tile) / max(1.0, tile * (1 - overlap)) - 1e-9) + 1


def test_tile_starts_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 1\)"):
        tile_starts(10, 4, 1.0)
    with pytest.raises(ValueError, match=">= 1"):
        tile_starts(0, 4, 0.5)


@pytest.mark.parametrize("tile", [(16, 16), (7, 12), (8, 16, 10)])
def test_importance_map_is_a_centred_gaussian_clamped_away_from_zero(tile: tuple[int, ...]) -> None:
    weights = gaussian_importance_map(tile)
    assert weights.shape == tile and weights.dtype == np.float32
    assert weights.max() == pytest.approx(1.0) and weights.min() >= MIN_IMPORTANCE
    for axis in range(len(tile)):
        np.testing.assert_allclose(weights, np.flip(weights, axis), rtol=1e-6)  # symmetric
    # separable Gaussian with sigma = tile / 8, where not clamped
    centre = tuple((t - 1) // 2 for t in tile)
    profile = weights[(slice(None), *centre[1:])]
    i = np.arange(tile[0])
    expected = np.exp(-0.5 * ((i - (tile[0] - 1) / 2) / (tile[0] / 8)) ** 2)
    expected /= expected.max()
    unclamped = expected * profile.max() > MIN_IMPORTANCE
    np.testing.assert_allclose(profile[unclamped], (expected * profile.max())[unclamped], rtol=1e-5)


def test_blending_is_the_importance_weighted_mean_of_overlapping_tiles() -> None:
    """Each tile predicts a constant (its start index); the blend at a voxel is the Gaussian-weighted mean."""
    size, tile, overlap = 40, 16, 0.5
    image = np.broadcast_to(np.arange(size, dtype=np.float32), (1, 1, size)).copy()  # value = x index

    def predict_start(batch: np.ndarray) -> np.ndarray:  # (b, 1, 1, tile) -> constant = the tile's first x
        return np.broadcast_to(batch[:, :, :, :1], batch.shape).copy()

    blended = sliding_window_probabilities(image, predict_start, (1, tile), num_classes=1, overlap=overlap)[0, 0]
    starts = tile_starts(size, tile, overlap)
    assert starts == [0, 8, 16, 24]
    sigma = tile / 8
    weights = np.exp(-0.5 * ((np.arange(tile) - (tile - 1) / 2) / sigma) ** 2)
    weights = np.maximum(weights / weights.max(), MIN_IMPORTANCE)
    numerator, denominator = np.zeros(size), np.zeros(size)
    for start in starts:
        numerator[start : start + tile] += weights * start
        denominator[start : start + tile] += weights
    np.testing.assert_allclose(blended, numerator / denominator, rtol=1e-5)
    assert blended[0] == 0 and blended[-1] == 24  # covered by a single tile
    assert 0 < blended[10] < 8  # a weighted mean, not the last tile written


def test_weight_sum_is_positive_everywhere() -> None:
    grid = TileGrid.build((23, 41), (8, 16), 0.3)
    assert grid.tile == (8, 16) and grid.num_tiles == len(tile_starts(23, 8, 0.3)) * len(tile_starts(41, 16, 0.3))
    assert grid.weight_sum.min() >= MIN_IMPORTANCE


@pytest.mark.parametrize(
    ("shape", "tile", "overlap"),
    [
        ((2, 37, 41), (16, 12), 0.5),  # 2D image
        ((2, 37, 41), (13, 17), 0.0),
        ((2, 37, 41), (9, 40), 0.7),
        ((2, 5, 19, 23), (8, 7), 0.25),  # 2D model, slice-wise with tiled slices
        ((2, 11, 23, 19), (5, 8, 7), 0.5),  # 3D model
        ((2, 11, 23, 19), (8, 16, 16), 0.3),
        ((2, 3, 23, 19), (8, 9, 30), 0.6),  # smaller than the tile along two axes: not tiled there
    ],
)
def test_tiled_equals_untiled_for_a_per_pixel_model(per_pixel, make_image, shape, tile, overlap) -> None:
    model = per_pixel(len(tile))
    image = make_image(shape)
    tiled = Predictor(
        model, ModelCard(), PredictionSettings(tile_size=tile, overlap=overlap, return_probabilities=True)
    )
    whole = Predictor(model, ModelCard(), PredictionSettings(tile_size="whole", return_probabilities=True))
    a, b = tiled.predict(image), whole.predict(image)
    assert a.plan.num_tiles > b.plan.num_tiles
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
    np.testing.assert_array_equal(a.labels, b.labels)
