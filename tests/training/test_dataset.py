"""Training patches (shapes, slicing, foreground share, normalisation, trust, determinism) and nnU-Net raw folders."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from training_cases import synthetic_case

from napari_mamba_seg.inference import normalize_image
from napari_mamba_seg.training import (
    NnUNetRawDataset,
    SegmentationDataset,
    TrainingCase,
    load_nnunet_raw,
    slice_axis_for,
)
from napari_mamba_seg.training.dataset import is_foreground_sample


def test_patch_shapes_for_2d_models_on_volumes_and_images_and_3d_models():
    volume = synthetic_case(channels=2)
    flat = TrainingCase(volume.image[:, 3], volume.labels[3], None, (1.0, 1.0), "flat")
    for cases, patch, dims in [([volume], (32, 32), 2), ([flat], (24, 16), 2), ([volume], (4, 16, 16), 3)]:
        dataset = SegmentationDataset(cases, patch, spatial_dims=dims, in_channels=2)
        item = dataset[5]
        assert item["image"].shape == (2, *patch) and item["image"].dtype == torch.float32
        assert item["labels"].shape == patch and item["labels"].dtype == torch.int64
        assert item["trusted"].shape == patch and item["trusted"].dtype == torch.bool


def test_2d_patches_are_slices_along_the_coarse_axis():
    # the intensity is the index along axis 2, so a slice across axis 2 is constant
    shape = (40, 40, 6)
    image = np.broadcast_to(np.arange(6, dtype=np.float32), shape)[None].copy()
    case = TrainingCase(image, np.zeros(shape, np.uint8), None, (1.0, 1.0, 3.0), "sagittal")
    assert slice_axis_for(case.spacing) == 2
    dataset = SegmentationDataset([case], (32, 32), spatial_dims=2, normalization={"method": "none"})
    values = set()
    for index in range(12):
        patch = dataset[index]["image"][0]
        assert torch.all(patch == patch[0, 0])
        values.add(float(patch[0, 0]))
    assert len(values) > 1
    # along another axis on request: then the patch varies along x
    dataset = SegmentationDataset([case], (32, 6), spatial_dims=2, normalization={"method": "none"}, slice_axis=0)
    assert torch.equal(dataset[0]["image"][0, 0], torch.arange(6.0))


def test_foreground_oversampling_gives_the_requested_share():
    labels = np.zeros((6, 40, 40), np.uint8)
    labels[2:4, 30:32, 5:7] = 1  # 8 foreground voxels in 9600
    case = TrainingCase(np.random.default_rng(0).normal(size=(1, 6, 40, 40)), labels, None, (3.0, 1.0, 1.0), "tiny")
    n = 60
    shares = {}
    for fraction in (0.0, 1 / 3, 1.0):
        dataset = SegmentationDataset([case], (16, 16), spatial_dims=2, foreground_fraction=fraction, seed=1)
        items = [dataset[i] for i in range(n)]
        flagged = [i for i, item in enumerate(items) if item["foreground"]]
        assert len(flagged) == math.floor(n * fraction)
        assert flagged == [i for i in range(n) if is_foreground_sample(i, fraction)]
        assert all(items[i]["labels"].any() for i in flagged)  # centred on foreground: it is in the patch
        shares[fraction] = np.mean([bool(item["labels"].any()) for item in items])
    assert shares[0.0] < 0.2 <= 1 / 3 <= shares[1 / 3] < shares[1.0] == 1.0


def test_samples_are_deterministic_for_a_seed_and_independent_of_order():
    cases = [synthetic_case("a", seed=1), synthetic_case("b", seed=2)]
    from napari_mamba_seg.training import AugmentationConfig, Augmenter

    def dataset(seed):
        return SegmentationDataset(
            cases, (32, 32), spatial_dims=2, augmenter=Augmenter(AugmentationConfig()), seed=seed
        )

    first, second, other = dataset(7), dataset(7), dataset(8)
    forward = [first[i] for i in range(6)]
    backward = [second[i] for i in reversed(range(6))][::-1]
    for a, b in zip(forward, backward, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["trusted"], b["trusted"]) and a["case"] == b["case"]
    assert any(not torch.equal(a["image"], other[i]["image"]) for i, a in enumerate(forward))


def test_patches_are_normalised_exactly_as_inference_normalises_the_whole_case():
    case = synthetic_case(shape=(32, 32), spacing=None, channels=2)
    spec = {"method": "percentile", "lower": 1, "upper": 99}
    dataset = SegmentationDataset([case], (32, 32), spatial_dims=2, normalization=spec)
    assert torch.equal(dataset[0]["image"], torch.from_numpy(normalize_image(case.image, spec)))
    assert torch.equal(dataset[0]["labels"], torch.from_numpy(case.labels.astype(np.int64)))


def test_only_trusted_voxels_are_sampled_and_their_trust_is_kept():
    case = synthetic_case()
    trusted = np.zeros(case.labels.shape, bool)
    trusted[2] = True  # one reviewed slice
    case.trusted = trusted
    dataset = SegmentationDataset([case], (40, 40), spatial_dims=2)
    for index in range(9):
        item = dataset[index]
        assert item["trusted"].all()
        assert torch.equal(item["labels"], torch.from_numpy(case.labels[2].astype(np.int64)))


def test_a_case_smaller_than_the_patch_is_padded_with_untrusted_voxels():
    case = synthetic_case(shape=(20, 12), spacing=None)
    item = SegmentationDataset([case], (32, 32), spatial_dims=2)[0]
    assert item["trusted"][:20, :12].all() and not item["trusted"][20:].any() and not item["trusted"][:, 12:].any()
    assert torch.all(item["image"][:, 20:] == 0)


def test_resampling_to_the_card_spacing_changes_only_the_in_plane_grid_of_2d_models():
    case = synthetic_case(shape=(6, 40, 40), spacing=(3.0, 0.5, 0.5))
    dataset = SegmentationDataset([case], (16, 16), spatial_dims=2, target_spacing=(1.0, 1.0))
    prepared = dataset.prepared_case(0)
    assert prepared.image.shape == (1, 6, 20, 20) and prepared.labels.shape == (6, 20, 20)
    assert set(np.unique(prepared.labels)) == {0, 1, 2}


def test_cases_that_do_not_fit_the_model_are_refused_with_their_name():
    case = synthetic_case("odd", channels=2)
    with pytest.raises(ValueError, match=r"case 'odd' has 2 channel\(s\).*takes 1"):
        SegmentationDataset([case], (32, 32), spatial_dims=2, in_channels=1)
    with pytest.raises(ValueError, match=r"case 'odd' has label values in \[0, 2\].*2 classes"):
        SegmentationDataset([case], (32, 32), spatial_dims=2, num_classes=2)
    with pytest.raises(ValueError, match=r"2D.*model is 3D"):
        SegmentationDataset([synthetic_case(shape=(32, 32), spacing=None)], (8, 8, 8), spatial_dims=3)
    with pytest.raises(ValueError, match="labels must be integers"):
        TrainingCase(np.zeros((1, 4, 4)), np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="spatial shape"):
        TrainingCase(np.zeros((1, 4, 4)), np.zeros((4, 5), np.uint8))


# ------------------------------------------------------------------------------------------------ nnU-Net raw folders


def _write_nifti(path, array_zyx, spacing_zyx=(2.0, 0.7, 0.7)):
    """Write an array given in array order (z, y, x) as NIfTI (voxel order i, j, k = x, y, z) with nibabel."""
    affine = np.diag([spacing_zyx[2], spacing_zyx[1], spacing_zyx[0], 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(np.transpose(array_zyx)), affine), str(path))


def _nnunet_folder(root, *, cases=("BR_001", "BR_002"), ignore=False):
    folder = root / "Dataset001_Breast"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    labels = {"background": 0, "breast": 1, "lesion": 2}
    if ignore:
        labels["ignore"] = 3
    info = {
        "channel_names": {"0": "pre", "1": "post"},
        "labels": labels,
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    (folder / "dataset.json").write_text(json.dumps(info))
    expected = {}
    for number, case in enumerate(cases):
        truth = synthetic_case(case, shape=(5, 12, 10), seed=number)
        stored = truth.labels.copy()
        if ignore:
            stored[0] = 3
        for channel in range(2):
            _write_nifti(folder / "imagesTr" / f"{case}_{channel:04d}.nii.gz", truth.image[0] + 100 * channel)
        _write_nifti(folder / "labelsTr" / f"{case}.nii.gz", stored.astype(np.uint8))
        expected[case] = truth
    return folder, expected


def test_nnunet_raw_folder_is_read_in_array_order_with_spacing_channels_and_ignore_label(tmp_path):
    folder, expected = _nnunet_folder(tmp_path, ignore=True)
    dataset = NnUNetRawDataset(folder)
    assert dataset.class_names == ["background", "breast", "lesion"] and dataset.ignore_label == 3
    assert dataset.channel_names == ["pre", "post"] and dataset.case_names == ["BR_001", "BR_002"]
    cases = load_nnunet_raw(folder)
    for case in cases:
        truth = expected[case.name]
        assert case.image.shape == (2, 5, 12, 10)
        np.testing.assert_allclose(case.image[0], truth.image[0], rtol=1e-6)
        np.testing.assert_allclose(case.image[1], truth.image[0] + 100, rtol=1e-6)
        assert case.spacing == pytest.approx((2.0, 0.7, 0.7))
        assert not case.trusted[0].any() and case.trusted[1:].all()  # the ignore label marks untrusted voxels
        np.testing.assert_array_equal(case.labels[1:], truth.labels[1:])
        assert np.all(case.labels[0] == 0)


def test_lazy_nnunet_cases_give_the_same_patches_as_cases_in_memory(tmp_path):
    folder, _ = _nnunet_folder(tmp_path)
    lazy = SegmentationDataset(NnUNetRawDataset(folder), (8, 8), spatial_dims=2, in_channels=2, cache_size=1, seed=3)
    eager = SegmentationDataset(load_nnunet_raw(folder), (8, 8), spatial_dims=2, in_channels=2, seed=3)
    for index in range(6):
        assert torch.equal(lazy[index]["image"], eager[index]["image"])
        assert torch.equal(lazy[index]["labels"], eager[index]["labels"])
    assert len(lazy._cache) == 1


def test_nnunet_errors_name_the_missing_or_mismatched_files(tmp_path):
    folder, _ = _nnunet_folder(tmp_path)
    (folder / "labelsTr" / "BR_002.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"have no label file: BR_002_0000\.nii\.gz.*labelsTr/BR_002\.nii\.gz"):
        NnUNetRawDataset(folder)

    folder, _ = _nnunet_folder(tmp_path / "channel")
    (folder / "imagesTr" / "BR_001_0001.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"imagesTr/BR_001_0001\.nii\.gz"):
        NnUNetRawDataset(folder)

    folder, _ = _nnunet_folder(tmp_path / "grid")
    _write_nifti(folder / "imagesTr" / "BR_002_0001.nii.gz", np.zeros((5, 12, 11), np.float32))
    dataset = NnUNetRawDataset(folder)
    with pytest.raises(ValueError, match=r"BR_002_0001\.nii\.gz has spatial shape \(5, 12, 11\).*BR_002\.nii\.gz"):
        dataset[1]
    _write_nifti(folder / "imagesTr" / "BR_002_0001.nii.gz", np.zeros((5, 12, 10), np.float32), (2.5, 0.7, 0.7))
    with pytest.raises(ValueError, match="same voxel grid"):
        dataset.read_case("BR_002")

    with pytest.raises(FileNotFoundError, match=r"no dataset\.json"):
        NnUNetRawDataset(tmp_path)
    (folder / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "a"}, "labels": {"background": 0, "x": 2}, "file_ending": ".nii.gz"})
    )
    with pytest.raises(ValueError, match="without gaps"):
        NnUNetRawDataset(folder)
