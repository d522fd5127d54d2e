"""Normalisation schemas on known arrays: z-score, percentile, none, constant channels, bad schemas."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mamba_seg.bundles import ModelCard
from napari_mamba_seg.inference import NORMALIZATION_METHODS, Predictor, check_normalization, normalize_image
from napari_mamba_seg.inference.normalization import normalize_channel


@pytest.fixture
def image() -> np.ndarray:
    """Two int16 channels with different offsets and scales, and outliers."""
    rng = np.random.default_rng(1)
    first = rng.normal(100, 20, size=(6, 30, 25))
    second = rng.normal(-50, 3, size=(6, 30, 25))
    first[0, 0, :5] = 5000  # bright outliers
    return np.stack([first, second]).round().astype(np.int16)


def test_empty_dict_means_zscore_mean_0_std_1_per_channel(image: np.ndarray) -> None:
    before = image.copy()
    out = normalize_image(image, {})
    assert out.dtype == np.float32 and out.shape == image.shape
    for channel in out:
        assert abs(channel.astype(np.float64).mean()) < 1e-5
        assert channel.astype(np.float64).std() == pytest.approx(1.0, abs=1e-5)
    expected = (image[1] - image[1].mean()) / image[1].std()
    np.testing.assert_allclose(out[1], expected, atol=1e-5)
    np.testing.assert_array_equal(image, before)  # input untouched


def test_zscore_nonzero_mask_uses_only_nonzero_voxels_and_keeps_zeros() -> None:
    rng = np.random.default_rng(2)
    channel = rng.uniform(10, 20, size=(20, 20)).astype(np.float32)
    channel[:, :8] = 0  # zero background
    out = normalize_channel(channel, {"method": "zscore", "mask": "nonzero"})
    inside = channel != 0
    assert np.all(out[~inside] == 0)
    assert abs(out[inside].astype(np.float64).mean()) < 1e-5
    assert out[inside].astype(np.float64).std() == pytest.approx(1.0, abs=1e-5)
    # without the mask the zeros pull the statistics: a different result
    assert not np.allclose(normalize_channel(channel, {"method": "zscore"}), out)


def test_percentile_clips_to_np_percentile_bounds_and_rescales_to_unit_range(image: np.ndarray) -> None:
    spec = {"method": "percentile", "lower": 1.0, "upper": 99.0}
    out = normalize_image(image, spec)
    for raw, normalised in zip(image.astype(np.float32), out, strict=True):
        low, high = np.percentile(raw, [1.0, 99.0])
        expected = (np.clip(raw, low, high) - low) / (high - low)
        np.testing.assert_allclose(normalised, expected, atol=1e-6)
        assert normalised.min() == 0 and normalised.max() == pytest.approx(1.0)
    # the outliers were clipped: the bulk is not squashed near 0
    assert np.median(out[0]) > 0.3


def test_percentile_defaults_are_filled_in() -> None:
    assert check_normalization({"method": "percentile"}) == {
        "method": "percentile",
        "lower": 0.5,
        "upper": 99.5,
        "mask": None,
    }


def test_none_only_converts_to_float32(image: np.ndarray) -> None:
    out = normalize_image(image, {"method": "none"})
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, image.astype(np.float32))


@pytest.mark.parametrize(
    "spec", [{}, {"method": "zscore", "mask": "nonzero"}, {"method": "percentile"}, {"method": "none"}]
)
@pytest.mark.parametrize("value", [0.0, 7.25, 1e6])
def test_constant_channel_gives_zeros_never_nan(spec: dict, value: float) -> None:
    image = np.stack([np.full((4, 9, 11), value), np.linspace(0, 1, 4 * 9 * 11).reshape(4, 9, 11)])
    out = normalize_image(image, spec)
    assert np.isfinite(out).all()
    if spec.get("method") != "none":
        assert np.all(out[0] == 0)
    else:
        assert np.all(out[0] == np.float32(value))


@pytest.mark.parametrize(
    ("spec", "listed"),
    [
        ({"method": "minmax"}, "zscore, percentile, none"),
        ({"method": "zscore", "lower": 1}, "method, mask"),
        ({"method": "percentile", "low": 1}, "method, lower, upper, mask"),
        ({"method": "zscore", "mask": "positive"}, "'nonzero'"),
        ({"method": "percentile", "lower": 60, "upper": 40}, "lower < upper"),
        ({"method": "percentile", "upper": "99"}, "must be numbers"),
    ],
)
def test_bad_schema_raises_listing_the_valid_choices(spec: dict, listed: str) -> None:
    with pytest.raises(ValueError) as error:
        check_normalization(spec)
    assert listed in str(error.value)


def test_valid_methods_are_the_documented_ones() -> None:
    assert set(NORMALIZATION_METHODS) == {"zscore", "percentile", "none"}


def test_predictor_rejects_a_card_with_a_bad_schema(per_pixel) -> None:
    with pytest.raises(ValueError, match="valid methods: zscore, percentile, none"):
        Predictor(per_pixel(2), ModelCard(normalization={"method": "histogram"}))
