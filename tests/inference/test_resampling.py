"""Resampling: the grid convention on a linear ramp, shapes, and resampling inside predictions."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mamba_seg.bundles import ModelCard
from napari_mamba_seg.inference import PredictionSettings, Predictor, resample_to_shape, resampled_shape


def _expected_ramp(n: int, m: int) -> np.ndarray:
    """Values of the ramp f(i) = i sampled at output voxels of an n -> m resampling (edges clamped)."""
    return np.clip((np.arange(m) + 0.5) * n / m - 0.5, 0, n - 1)


@pytest.mark.parametrize(("n", "m"), [(10, 20), (20, 10), (9, 14), (12, 7)])
def test_ramp_is_exact_at_the_sampled_positions(n: int, m: int) -> None:
    ramp = np.broadcast_to(np.arange(n, dtype=np.float32), (1, 3, n)).copy()
    out = resample_to_shape(ramp, (3, m))
    assert out.shape == (1, 3, m) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], np.broadcast_to(_expected_ramp(n, m), (3, m)), atol=1e-5)


def test_twofold_upsampling_puts_new_voxels_between_the_old_ones() -> None:
    ramp = np.arange(8, dtype=np.float32)[None, None, :]
    out = resample_to_shape(ramp, (1, 16))[0, 0]
    # interior output voxel 2k+1 lies a quarter voxel after input voxel k
    np.testing.assert_allclose(out[1:-1:2], np.arange(7) + 0.25, atol=1e-6)
    np.testing.assert_allclose(out[2::2], np.arange(1, 8) - 0.25, atol=1e-6)


def test_unchanged_axes_are_copied_exactly_in_3d() -> None:
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(2, 5, 12, 9)).astype(np.float32)
    out = resample_to_shape(volume, (5, 6, 9))  # only axis 1 changes
    ramp_free = resample_to_shape(volume[:, 2:3], (1, 6, 9))
    np.testing.assert_array_equal(out[:, 2:3], ramp_free)
    np.testing.assert_allclose(out[..., 0], resample_to_shape(volume[..., 0], (5, 6)), atol=1e-6)
    assert resample_to_shape(volume, volume.shape[1:]) is volume


def test_resampled_shape_keeps_the_physical_extent() -> None:
    assert resampled_shape((20, 40, 36), (2.0, 0.7, 0.7), (1.4, 1.4, 1.4)) == (29, 20, 18)
    assert resampled_shape((3,), (0.1,), (10.0,)) == (1,)
    with pytest.raises(ValueError, match="equal lengths"):
        resampled_shape((3, 4), (1.0,), (1.0, 1.0))


def test_2d_model_resamples_in_plane_and_returns_the_input_shape(vm_unet, make_image) -> None:
    image = make_image((2, 5, 30, 34))
    card = ModelCard(spacing=[1.4, 1.4], resample=True)
    predictor = Predictor(vm_unet, card, PredictionSettings(return_probabilities=True))
    prediction = predictor.predict(image, spacing=(2.0, 0.7, 0.7))
    assert prediction.plan.axis == 0
    assert prediction.plan.resample_to == (5, 15, 17)  # in-plane halved, the slice axis untouched
    assert prediction.labels.shape == image.shape[1:]
    assert prediction.probabilities.shape == (3, *image.shape[1:])
    np.testing.assert_allclose(prediction.probabilities.sum(0), 1, atol=1e-5)
    unresampled = Predictor(vm_unet, card, PredictionSettings(resample=False, return_probabilities=True))
    assert not np.allclose(unresampled.predict(image, spacing=(2.0, 0.7, 0.7)).probabilities, prediction.probabilities)


def test_3d_model_resampling_returns_the_input_shape(unet_3d, make_image) -> None:
    image = make_image((2, 6, 21, 18))
    card = ModelCard(spacing=[1.4, 1.4, 1.4], resample=True, patch_size=[8, 8, 8])
    predictor = Predictor(unet_3d, card, PredictionSettings(return_probabilities=True))
    prediction = predictor.predict(image, spacing=(2.0, 0.7, 0.7))
    assert prediction.plan.resample_to == (9, 10, 9)
    assert prediction.labels.shape == image.shape[1:]
    np.testing.assert_array_equal(prediction.labels, prediction.probabilities.argmax(0))
    labels_only = Predictor(unet_3d, card, PredictionSettings()).predict(image, spacing=(2.0, 0.7, 0.7))
    np.testing.assert_array_equal(labels_only.labels, prediction.labels)  # class-by-class argmax agrees


@pytest.mark.parametrize("model_name", ["vm_unet", "unet_3d"])
def test_resampling_at_the_image_spacing_equals_no_resampling(model_name, request, make_image) -> None:
    model = request.getfixturevalue(model_name)
    image = make_image((2, 6, 20, 18))
    spacing = [1.5, 0.8, 0.8] if model.spatial_dims == 3 else [0.8, 0.8]
    settings = {"return_probabilities": True, "tile_size": (8, 16, 16) if model.spatial_dims == 3 else None}
    with_resampling = Predictor(model, ModelCard(spacing=spacing, resample=True), PredictionSettings(**settings))
    without = Predictor(model, ModelCard(spacing=spacing, resample=False), PredictionSettings(**settings))
    a = with_resampling.predict(image, spacing=(1.5, 0.8, 0.8))
    b = without.predict(image, spacing=(1.5, 0.8, 0.8))
    assert a.plan.resample_to == image.shape[1:] and b.plan.resample_to is None
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_resampling_without_a_spacing_says_what_to_pass(per_pixel, make_image) -> None:
    predictor = Predictor(per_pixel(2), ModelCard(spacing=[1.0, 1.0], resample=True))
    with pytest.raises(ValueError, match="pass spacing="):
        predictor.predict(make_image((2, 3, 8, 8)))
    settings = PredictionSettings(resample=True)
    with pytest.raises(ValueError, match="the card has none"):
        Predictor(per_pixel(2), ModelCard(), settings).plan((2, 3, 8, 8), spacing=(1, 1, 1))
