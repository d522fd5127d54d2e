"""Tests of the synthetic breast DCE-MRI phantom (napari_mamba_seg.data).

Most tests use a small, coarse grid (16 × 96 × 96 voxels of 3 × 1.8 × 1.8 mm: the default field of view at a
quarter of the resolution), which generates in well under a second.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_mamba_seg.data import LABELS, PhantomConfig, make_phantom

SMALL = {"shape": (16, 96, 96), "spacing": (3.0, 1.8, 1.8)}
BACKGROUND, BREAST, FGT, LESION, MUSCLE = 0, 1, 2, 3, 4
DENSITY_RANGE = {"a": (0.0, 0.25), "b": (0.25, 0.50), "c": (0.50, 0.75), "d": (0.75, 1.0)}
UCSF_CASE = Path(__file__).resolve().parents[3] / "shared" / "data" / "breast_nact" / "UCSF-BR-06"


def small_phantom(**overrides):
    return make_phantom(**{**SMALL, **overrides})


def voxel_ml(phantom) -> float:
    return float(np.prod(phantom.spacing)) / 1000.0


def early_minus_pre(phantom, mask: np.ndarray) -> float:
    return float(phantom.image[1][mask].mean() - phantom.image[0][mask].mean())


def test_same_seed_gives_identical_arrays():
    first, second = small_phantom(seed=5, lesions=2), small_phantom(seed=5, lesions=2)
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.labels, second.labels)
    assert first.lesion_info == second.lesion_info
    assert first.fgt_fraction == second.fgt_fraction


def test_different_seeds_give_different_anatomy():
    first, second = small_phantom(seed=5), small_phantom(seed=6)
    breast_first = np.isin(first.labels, (BREAST, FGT, LESION))
    breast_second = np.isin(second.labels, (BREAST, FGT, LESION))
    differing = np.mean(breast_first != breast_second) / max(breast_first.mean(), 1e-9)
    assert differing > 0.1, "two seeds gave nearly the same breast outline"
    assert np.mean(first.labels != second.labels) > 0.01


def test_arrays_have_the_documented_shapes_and_values():
    phantom = small_phantom(seed=1)
    assert phantom.image.shape == (3, 16, 96, 96) and phantom.image.dtype == np.float32
    assert phantom.labels.shape == (16, 96, 96) and phantom.labels.dtype == np.uint8
    assert set(np.unique(phantom.labels)) <= set(LABELS)
    assert {BACKGROUND, BREAST, FGT, LESION, MUSCLE} <= set(np.unique(phantom.labels))
    assert np.all(np.isfinite(phantom.image)) and phantom.image.min() >= 0
    assert phantom.spacing == (3.0, 1.8, 1.8)
    assert phantom.channel_names == ["pre-contrast", "early post-contrast", "late post-contrast"]


def test_every_lesion_voxel_is_surrounded_by_breast():
    phantom = small_phantom(seed=2, lesions=3)
    lesion = phantom.labels == LESION
    assert lesion.any()
    ring = ndi.binary_dilation(lesion, structure=np.ones((3, 3, 3), bool)) & ~lesion
    neighbours = np.unique(phantom.labels[ring])
    assert set(neighbours) <= {BREAST, FGT}, f"lesion touches labels {neighbours}"


@pytest.mark.parametrize("kind", ["malignant", "benign"])
def test_lesion_volume_and_centre_match_lesion_info(kind):
    phantom = small_phantom(seed=3, lesions=1, lesion_kind=kind)
    (info,) = phantom.lesion_info
    assert info["kind"] == kind
    label_volume = (phantom.labels == LESION).sum() * voxel_ml(phantom)
    assert info["volume_ml"] > 0
    # majority voting moves the outline by up to half a voxel: allow 25 %, at least 4 voxels
    tolerance = max(0.25 * info["volume_ml"], 4 * voxel_ml(phantom))
    assert abs(label_volume - info["volume_ml"]) <= tolerance, (label_volume, info)
    centre = tuple(round(c) for c in info["centre"])
    assert phantom.labels[centre] == LESION
    assert np.isclose(info["radius_mm"], (3 * info["volume_ml"] * 1000 / (4 * np.pi)) ** (1 / 3))


@pytest.mark.parametrize("density", ["a", "b", "c", "d"])
def test_fgt_fraction_matches_labels_and_density_class(density):
    phantom = small_phantom(seed=4, density=density, lesions=1)
    whole_breast = np.isin(phantom.labels, (BREAST, FGT, LESION)).sum()
    from_labels = (phantom.labels == FGT).sum() / whole_breast
    assert abs(from_labels - phantom.fgt_fraction) < 0.03, (from_labels, phantom.fgt_fraction)
    low, high = DENSITY_RANGE[density]
    assert low < from_labels < high
    assert low < phantom.fgt_fraction < high


def test_two_breasts_one_on_each_side_with_muscle_behind():
    phantom = small_phantom(seed=7)
    breast = np.isin(phantom.labels, (BREAST, FGT, LESION))
    components, count = ndi.label(breast, structure=np.ones((3, 3, 3), bool))
    assert count == 2
    centres_x = [np.argwhere(components == k)[:, 2].mean() for k in (1, 2)]
    midline = phantom.labels.shape[2] / 2
    assert min(centres_x) < midline < max(centres_x)
    # in every (z, x) column that holds both, all breast voxels lie in front of (lower y than) the muscle
    muscle = phantom.labels == MUSCLE
    y = np.arange(breast.shape[1])[None, :, None]
    last_breast = np.where(breast, y, -1).max(axis=1)
    first_muscle = np.where(muscle, y, breast.shape[1]).min(axis=1)
    both = breast.any(axis=1) & muscle.any(axis=1)
    assert both.sum() > 100
    assert np.all(last_breast[both] < first_muscle[both])


@pytest.mark.parametrize("kind", ["malignant", "benign"])
def test_lesion_enhances_more_than_fgt_and_fat(kind):
    phantom = small_phantom(seed=8, lesion_kind=kind)
    lesion, fgt, fat = (phantom.labels == k for k in (LESION, FGT, BREAST))
    assert early_minus_pre(phantom, lesion) > early_minus_pre(phantom, fgt) > 0
    assert early_minus_pre(phantom, lesion) > early_minus_pre(phantom, fat)


def test_malignant_lesion_washes_out_and_benign_persists():
    malignant = small_phantom(seed=9, lesion_kind="malignant")
    benign = small_phantom(seed=9, lesion_kind="benign")
    assert malignant.lesion_info[0]["curve"] == "washout"
    assert benign.lesion_info[0]["curve"] == "persistent"
    mask = malignant.labels == LESION
    assert malignant.image[2][mask].mean() < malignant.image[1][mask].mean()
    mask = benign.labels == LESION
    assert benign.image[2][mask].mean() >= benign.image[1][mask].mean()


def test_fat_is_suppressed_by_the_recipe_factor():
    settings = {"seed": 10, "noise": 0.0, "bias_field": 0.0, "lesions": 0}
    saturated, plain = small_phantom(**settings), small_phantom(fat_suppression=False, **settings)
    np.testing.assert_array_equal(saturated.labels, plain.labels)
    fat = ndi.binary_erosion(saturated.labels == BREAST, structure=np.ones((3, 3, 3), bool))
    fgt = saturated.labels == FGT
    assert saturated.image[0][fat].mean() < saturated.image[0][fgt].mean()  # fat-sat: fat dark
    assert plain.image[0][fat].mean() > 2 * plain.image[0][fgt].mean()  # plain T1w: fat bright
    # the recipe multiplies fat by 0.05-0.3; ligaments and vessels inside the fat add a little signal
    ratio = saturated.image[0][fat].mean() / plain.image[0][fat].mean()
    assert 0.05 <= ratio <= 0.35


def test_background_noise_is_rician():
    phantom = small_phantom(seed=11, noise=0.06)
    air = phantom.image[:, :, :3, :]  # the rows in front of the nipples hold only air
    assert np.all(phantom.labels[:, :3, :] == BACKGROUND)
    values = air.ravel()
    sigma = phantom.noise_sigma
    assert sigma == pytest.approx(0.06 * 50)
    # pure noise magnitude is Rayleigh: mean = σ √(π/2), mean/std = 1.913
    assert values.mean() > 0
    assert values.mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.05)
    assert values.mean() / values.std() == pytest.approx(1.913, abs=0.06)


def test_noise_free_background_is_zero_and_noise_scales():
    clean = small_phantom(seed=11, noise=0.0)
    assert np.all(clean.image[:, :, :3, :] == 0)
    assert clean.noise_sigma == 0


def test_to_medical_image_carries_geometry_and_phases():
    phantom = small_phantom(seed=12)
    image = phantom.to_medical_image()
    assert image.num_channels == 3
    assert image.channel_names == ["pre-contrast", "early post-contrast", "late post-contrast"]
    np.testing.assert_allclose(image.geometry.spacing, (3.0, 1.8, 1.8))
    assert image.array is phantom.image
    direction = image.geometry.direction  # columns: world (R, A, S) direction of array axes z, y, x
    np.testing.assert_allclose(direction[:, 0], [0, 0, 1])  # slices go superior
    np.testing.assert_allclose(direction[:, 1], [0, -1, 0])  # rows go posterior (anterior on top)
    np.testing.assert_allclose(direction[:, 2], [-1, 0, 0])  # columns go to the patient's left
    centre = image.geometry.affine @ np.array([*((np.array(phantom.labels.shape) - 1) / 2), 1.0])
    np.testing.assert_allclose(centre[:3], 0, atol=1e-9)
    assert image.metadata["labels"] is phantom.labels


def test_lesions_zero_gives_no_lesion_label():
    phantom = small_phantom(seed=13, lesions=0)
    assert phantom.lesion_info == []
    assert not np.any(phantom.labels == LESION)


def test_phase_count_and_motion():
    five = small_phantom(seed=14, phases=5, lesions=0)
    assert five.image.shape[0] == 5 and len(five.channel_names) == 5
    assert five.phase_times_s == (0.0, 75.0, 150.0, 225.0, 300.0)
    still, moved = small_phantom(seed=14, lesions=0), small_phantom(seed=14, lesions=0, motion=2.0)
    np.testing.assert_array_equal(still.image[0], moved.image[0])  # labels follow the pre-contrast phase
    assert not np.array_equal(still.image[1], moved.image[1])


@pytest.mark.parametrize(
    ("overrides", "field", "valid"),
    [
        ({"density": "e"}, "density", "'a', 'b', 'c', 'd'"),
        ({"noise": -0.1}, "noise", "from 0 to 1"),
        ({"shape": (4, 20, 20)}, "shape", "at least (8, 48, 48)"),
        ({"spacing": (1.0, 0.3, 0.3)}, "shape × spacing", "at least"),
        ({"lesion_kind": "cyst"}, "lesion_kind", "'malignant', 'benign', 'random'"),
        ({"lesions": -1}, "lesions", "from 0 to 8"),
        ({"phases": 0}, "phases", "from 1 to 9"),
        ({"bias_field": float("nan")}, "bias_field", "from 0 to 2"),
        ({"phase_times": (0.0, 100.0)}, "phase_times", "3 increasing times"),
        ({"colour": "red"}, "unknown PhantomConfig field", "valid fields"),
    ],
)
def test_invalid_settings_raise_value_error_naming_the_field(overrides, field, valid):
    with pytest.raises(ValueError) as error:
        make_phantom(**overrides)
    assert field in str(error.value) and valid in str(error.value)


def test_config_object_and_overrides_combine():
    config = PhantomConfig(**SMALL, density="C", seed=15, lesions=0)
    assert config.density == "c"
    phantom = make_phantom(config, seed=16)
    assert phantom.config.seed == 16 and phantom.config.density == "c"
    with pytest.raises(ValueError, match="density"):
        PhantomConfig(density="x")


def test_default_size_shape_and_types():
    phantom = make_phantom()
    assert phantom.config == PhantomConfig()
    assert phantom.image.shape == (3, 60, 256, 256) and phantom.image.dtype == np.float32
    assert phantom.labels.shape == (60, 256, 256) and phantom.labels.dtype == np.uint8
    assert phantom.spacing == (2.0, 0.7, 0.7)
    assert len(phantom.lesion_info) == 1
    assert set(np.unique(phantom.labels)) == set(LABELS)
    assert 0.25 < phantom.fgt_fraction < 0.5


def test_package_imports_neither_torch_nor_napari():
    code = (
        "import sys; from napari_mamba_seg.data import make_phantom; "
        "make_phantom(shape=(8, 64, 64), spacing=(3.0, 2.7, 2.7)); "
        "bad = [m for m in ('torch', 'napari', 'qtpy', 'PyQt5', 'PyQt6') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_intensities_resemble_the_real_ucsf_case():
    """Pre-contrast FGT level, background noise and lesion enhancement are on the scale of UCSF-BR-06."""
    if not (UCSF_CASE / "dce.nii.gz").exists():
        pytest.skip(f"real breast DCE case not found at {UCSF_CASE}")
    import nibabel as nib

    real = np.asarray(nib.load(UCSF_CASE / "dce.nii.gz").dataobj).astype(np.float32)
    voi = np.asarray(nib.load(UCSF_CASE / "breast_voi_mask.nii.gz").dataobj) > 0
    tumour = np.asarray(nib.load(UCSF_CASE / "tumour_pe70_mask.nii.gz").dataobj) > 0
    real_tissue_pre = np.median(real[..., 0][voi & ~tumour])
    real_corner = real[:16, :16, :, 0]
    real_pe = np.median(100 * (real[..., 1][tumour] - real[..., 0][tumour]) / real[..., 0][tumour])

    phantom = small_phantom(seed=17, lesion_kind="malignant")
    fgt = phantom.labels == FGT
    lesion = phantom.labels == LESION
    phantom_pre = np.median(phantom.image[0][fgt])
    phantom_pe = np.median(100 * (phantom.image[1][lesion] - phantom.image[0][lesion]) / phantom.image[0][lesion])
    assert phantom_pre == pytest.approx(real_tissue_pre, rel=0.3)
    assert phantom.image[0][:, :3].mean() == pytest.approx(real_corner.mean(), rel=0.5)
    assert 0.5 * real_pe < phantom_pe < 2.5 * real_pe
