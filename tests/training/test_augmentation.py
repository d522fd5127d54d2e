"""Augmentation: image and labels stay aligned, flips and rot90 are exact, everything is seeded."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_mamba_seg.training import AugmentationConfig, Augmenter
from napari_mamba_seg.training.augmentation import affine_transform, flip_and_rotate90

SPATIAL_ONLY = AugmentationConfig(
    flip_probability=0.5,
    rot90_probability=0.5,
    rotation_probability=1.0,
    max_rotation_degrees=30.0,
    scale_probability=1.0,
    scale_range=(0.8, 1.25),
    brightness_probability=0.0,
    contrast_probability=0.0,
    gamma_probability=0.0,
    bias_field_probability=0.0,
    noise_probability=0.0,
)


def _blob_labels(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Labels 0..3 in large blocks (so most voxels have neighbours of the same class)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 4, tuple(max(1, s // 6) for s in shape))
    labels = coarse
    for axis, s in enumerate(shape):
        labels = np.repeat(labels, 6, axis=axis)[(slice(None),) * axis + (slice(0, s),)]
    return torch.from_numpy(labels.astype(np.int64))


@pytest.mark.parametrize("shape", [(36, 36), (12, 24, 24)])
def test_spatial_augmentation_keeps_labels_on_their_intensities(shape):
    augmenter = Augmenter(SPATIAL_ONLY)
    labels = _blob_labels(shape, 0)
    image = labels.float()[None] * 10.0  # the image encodes the label
    checked = 0
    for seed in range(6):
        out_image, out_labels, out_trusted = augmenter(image, labels, generator=torch.Generator().manual_seed(seed))
        assert out_image.shape == image.shape and out_labels.shape == labels.shape
        # where the interpolated intensity is exactly a label's value, the nearest label must be that label
        value = out_image[0] / 10.0
        exact = out_trusted & ((value - value.round()).abs() < 1e-4) & (value.round() >= 0)
        assert exact.float().mean() > 0.3
        assert torch.equal(out_labels[exact], value[exact].round().long())
        # voxels brought in from outside the patch are untrusted, with label 0
        assert torch.all(out_labels[~out_trusted] == 0)
        checked += int(exact.sum())
    assert checked > 0


def test_rotation_moves_content_and_outside_voxels_become_untrusted():
    labels = _blob_labels((32, 32), 1)
    config = dataclasses.replace(SPATIAL_ONLY, flip_probability=0, rot90_probability=0, scale_probability=0)
    augmenter = Augmenter(config)
    params = augmenter.draw((1, 32, 32), torch.Generator().manual_seed(0))
    assert params.rotation_degrees != 0
    _, rotated, trusted = augmenter.apply(
        labels.float()[None], labels, torch.ones_like(labels, dtype=torch.bool), params
    )
    assert not torch.equal(rotated, labels)
    assert not trusted[0, 0] and trusted[16, 16]  # a corner comes from outside, the centre stays inside


def test_zoom_by_two_about_the_centre_is_exact_for_nearest_labels():
    labels = torch.arange(16 * 16).reshape(16, 16)
    image = labels.float()[None]
    out_image, out_labels, trusted = affine_transform(
        image, labels, torch.ones_like(labels, dtype=torch.bool), 0.0, 2.0
    )
    assert trusted.all()
    # output voxel i samples input position (i + 0.5) / 2 + 3.5, i.e. the centre 8×8 block enlarged twice
    expected = labels[4:12, 4:12].repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(out_labels, expected)
    # the image (value 16 y + x) is interpolated linearly, which is exact for a linear function of the position
    position = (torch.arange(16) + 0.5) / 2 + 3.5
    assert torch.allclose(out_image[0], 16 * position[:, None] + position[None, :], atol=1e-3)


@pytest.mark.parametrize("shape", [(1, 8, 8), (2, 4, 6, 6)])
def test_flips_and_rot90_are_exact_and_invertible(shape):
    generator = torch.Generator().manual_seed(5)
    image = torch.randn(shape, generator=generator)
    labels = torch.randint(0, 5, shape[1:], generator=generator)
    trusted = torch.rand(shape[1:], generator=generator) < 0.5
    spatial = len(shape) - 1
    for flips in [(), (0,), tuple(range(spatial))]:
        for k in range(4):
            out = flip_and_rotate90(image, labels, trusted, flips, k)
            assert torch.equal(out[0], torch.rot90(image.flip([1 + a for a in flips]), k, dims=(-2, -1)))
            # undo: rotate back, then flip again
            back = [torch.rot90(t, -k, dims=(-2, -1)) for t in out]
            back = [back[0].flip([1 + a for a in flips]), back[1].flip(list(flips)), back[2].flip(list(flips))]
            assert torch.equal(back[0], image) and torch.equal(back[1], labels) and torch.equal(back[2], trusted)


def test_flip_rot90_augmentation_is_one_of_the_dihedral_transforms_with_labels_moved_alike():
    config = AugmentationConfig(
        rotation_probability=0, scale_probability=0, brightness_probability=0, contrast_probability=0,
        gamma_probability=0, bias_field_probability=0, noise_probability=0,
    )  # fmt: skip
    augmenter = Augmenter(config)
    image = torch.arange(64.0).reshape(1, 8, 8)
    labels = torch.arange(64).reshape(8, 8)
    seen = set()
    for seed in range(24):
        generator = torch.Generator().manual_seed(seed)
        params = augmenter.draw((1, 8, 8), generator)
        out_image, out_labels, _ = augmenter(image, labels, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(out_labels, out_image[0].long())  # labels moved exactly like the image
        expected = flip_and_rotate90(
            image, labels, torch.ones(8, 8, dtype=torch.bool), params.flip_axes, params.rot90_k
        )
        assert torch.equal(out_image, expected[0])
        seen.add(tuple(out_labels.reshape(-1).tolist()))
    assert len(seen) >= 6  # the random choices really vary (8 distinct transforms exist)


def test_intensity_augmentations_change_only_the_image_and_are_seeded():
    config = AugmentationConfig(
        flip_probability=0, rot90_probability=0, rotation_probability=0, scale_probability=0,
        brightness_probability=1, contrast_probability=1, gamma_probability=1, bias_field_probability=1,
        noise_probability=1, noise_std_range=(0.05, 0.1),
    )  # fmt: skip
    augmenter = Augmenter(config)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(2, 6, 16, 16, generator=generator)
    labels = torch.randint(0, 3, (6, 16, 16), generator=generator)
    a = augmenter(image, labels, generator=torch.Generator().manual_seed(11))
    b = augmenter(image, labels, generator=torch.Generator().manual_seed(11))
    c = augmenter(image, labels, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert torch.equal(a[1], labels) and a[2].all()
    assert not torch.allclose(a[0], image) and torch.isfinite(a[0]).all()
    assert not torch.allclose(a[0][0], a[0][1] * image[0].std() / image[1].std())  # channels get their own factors


def test_disabled_augmentation_returns_the_patch_and_config_round_trips():
    image, labels = torch.randn(1, 8, 8), torch.zeros(8, 8, dtype=torch.long)
    out = Augmenter(AugmentationConfig.none())(image, labels)
    assert torch.equal(out[0], image) and torch.equal(out[1], labels) and out[2].all()
    config = AugmentationConfig(scale_range=(0.9, 1.1), flip_axes=(1, 2))
    assert AugmentationConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="flip_probability"):
        AugmentationConfig(flip_probability=1.5)
    with pytest.raises(ValueError, match="unknown augmentation"):
        AugmentationConfig.from_dict({"rotate": 1})
