"""Fine-tuning options: voxels changed from the model's prediction weighted up (in the loss, through patch sampling and
augmentation, in the fine-tune), unreviewed voxels still ignored; a frozen encoder that does not move on every
architecture; epochs instead of steps."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from napari_mamba_seg import cli
from napari_mamba_seg.bundles import ModelCard, load_bundle, save_bundle
from napari_mamba_seg.interactive import ReviewState
from napari_mamba_seg.models import create_model, get_model_entry, list_models
from napari_mamba_seg.training.augmentation import AugmentationConfig, Augmenter
from napari_mamba_seg.training.cases import TrainingCase
from napari_mamba_seg.training.dataset import SegmentationDataset
from napari_mamba_seg.training.finetune import CorrectedStudy, FineTuneSettings, finetune
from napari_mamba_seg.training.losses import DiceCELoss

SHAPE = (6, 32, 32)
SETTINGS = FineTuneSettings(steps=3, batch_size=2, device="cpu", augment=False, anchor=False)  # anchor: own tests


def _study(reviewed=(1, 2, 4), axis=0, garbage_seed=None, shape=SHAPE) -> CorrectedStudy:
    """A lesion study whose prediction misses the lesion's right half; ``garbage_seed``: random labels and
    prediction on the unreviewed slices."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, *shape)).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    labels[:, 10:20, 12:22] = 1
    image[0][labels == 1] += 2.0
    predicted = labels.copy()
    predicted[:, 10:20, 17:22] = 0
    review = ReviewState(axis, shape[axis], set(reviewed))
    if garbage_seed is not None:
        garbage = np.random.default_rng(garbage_seed).integers(0, 2, (2, *shape)).astype(np.uint8)
        unreviewed = ~review.trusted_mask(shape)
        labels[unreviewed] = garbage[0][unreviewed]
        predicted[unreviewed] = garbage[1][unreviewed]
    return CorrectedStudy(image, labels, review, (3.0, 1.0, 1.0), "case", predicted)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


# ------------------------------------------------------------------------------------------------------ the loss


@pytest.mark.parametrize(("dice_weight", "ce_weight"), [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0)])
def test_a_voxel_of_weight_w_gets_w_times_the_gradient(dice_weight, ce_weight) -> None:
    """Voxels 0 and 1 have the same logits and label; voxel 1 weighs 4: its gradient is 4 times voxel 0's."""
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 4)
    logits[..., 0, 1] = logits[..., 0, 0]
    logits.requires_grad_(True)
    target = torch.randint(0, 3, (1, 4, 4))
    target[0, 0, 1] = target[0, 0, 0]
    weight = torch.ones(1, 4, 4)
    weight[0, 0, 1] = 4.0
    loss_fn = DiceCELoss(dice_weight=dice_weight, ce_weight=ce_weight)
    (gradient,) = torch.autograd.grad(loss_fn(logits, target, None, weight), logits)
    assert gradient[..., 0, 0].abs().sum() > 0
    torch.testing.assert_close(gradient[..., 0, 1], 4.0 * gradient[..., 0, 0], rtol=1e-5, atol=1e-8)


def test_weights_keep_untrusted_voxels_without_gradient_and_ones_change_nothing() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 2, 8, 8, requires_grad=True)
    target = torch.randint(0, 2, (2, 8, 8))
    trusted = torch.rand(2, 8, 8) > 0.5
    weight = torch.rand(2, 8, 8) * 10
    loss_fn = DiceCELoss()
    (gradient,) = torch.autograd.grad(loss_fn(logits, target, trusted, weight), logits)
    assert torch.all(gradient.movedim(1, -1)[~trusted] == 0)
    assert gradient.movedim(1, -1)[trusted].abs().sum() > 0
    plain = loss_fn(logits, target, trusted)
    assert torch.equal(plain, loss_fn(logits, target, trusted, torch.ones(2, 8, 8)))  # bit for bit
    with pytest.raises(ValueError, match="finite and >= 0"):
        loss_fn(logits, target, trusted, -weight)
    with pytest.raises(ValueError, match="target's shape"):
        loss_fn(logits, target, trusted, weight[:1])


# ------------------------------------------------------------------------------------------------- the patches


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_weights_follow_the_crop_and_the_augmentation_exactly(spatial_dims) -> None:
    """The weights come out where a copy of them given as the labels comes out; the image, labels and trust come out
    as without weights."""
    rng = np.random.default_rng(0)
    shape = (5, 20, 24)  # the patch is larger than the image along the last axis: padding
    image = rng.normal(size=(1, *shape)).astype(np.float32)
    labels = rng.integers(0, 2, shape).astype(np.uint8)
    trusted = rng.random(shape) > 0.3
    levels = np.array([0.5, 1.0, 3.0], np.float32)
    level_index = rng.integers(0, 3, shape)
    patch = (16, 28) if spatial_dims == 2 else (4, 16, 28)
    augmenter = Augmenter(AugmentationConfig(rotation_probability=0.7, scale_probability=0.7))

    def dataset(case_labels, voxel_weights=None):
        case = TrainingCase(image, case_labels, trusted, (3.0, 1.0, 1.0), "case")
        return SegmentationDataset(
            [case], patch, spatial_dims=spatial_dims, foreground_fraction=0.0, augmenter=augmenter,
            voxel_weights=voxel_weights, seed=3,
        )  # fmt: skip

    weighted = dataset(labels, [levels[level_index]])
    plain = dataset(labels)
    carrier = dataset(level_index.astype(np.uint8))  # the weights' positions, moved as labels
    for index in range(12):
        item, reference, moved = weighted[index], plain[index], carrier[index]
        for key in ("image", "labels", "trusted"):
            assert torch.equal(item[key], reference[key]), (index, key)
        expected = torch.where(moved["trusted"], torch.from_numpy(levels)[moved["labels"]], 0.0)
        assert torch.equal(item["weight"], expected), index
        assert "weight" not in reference


def test_voxel_weights_are_checked() -> None:
    case = TrainingCase(np.zeros((1, 8, 8), np.float32), np.zeros((8, 8), np.uint8), name="flat")
    with pytest.raises(ValueError, match="one per case"):
        SegmentationDataset([case], (8, 8), spatial_dims=2, voxel_weights=[None, None])
    with pytest.raises(ValueError, match=r"'flat'.*do not fit"):
        SegmentationDataset([case], (8, 8), spatial_dims=2, voxel_weights=[np.ones((4, 8))])
    with pytest.raises(ValueError, match="finite and >= 0"):
        SegmentationDataset([case], (8, 8), spatial_dims=2, voxel_weights=[np.full((8, 8), np.nan)])


# ---------------------------------------------------------------------------------------------- the fine-tune


@pytest.mark.parametrize("axis", [0, 1], ids=["slices-along-the-model-axis", "trust-mask-across-slices"])
def test_changed_voxels_weigh_more_and_unreviewed_ones_still_do_not_count(parent, axis) -> None:
    reviewed = (1, 2, 4) if axis == 0 else (11, 14, 17)
    weighted = FineTuneSettings(steps=3, batch_size=2, device="cpu", augment=False, changed_weight=4.0, anchor=False)
    first = finetune(parent, [_study(reviewed, axis, garbage_seed=1)], weighted)
    second = finetune(parent, [_study(reviewed, axis, garbage_seed=2)], weighted)
    assert _same_weights(first.model, second.model)  # unreviewed labels and prediction: no effect
    unweighted = finetune(parent, [_study(reviewed, axis, garbage_seed=1)], SETTINGS)
    assert not _same_weights(first.model, unweighted.model)  # the weighting does act
    study = first.provenance["studies"][0]
    assert study["changed_train_voxels"] == (2 * 10 * 5 if axis == 0 else 2 * 6 * 5)
    assert first.provenance["settings"]["changed_weight"] == 4.0
    assert "changed voxels weighted 4" in first.card.training_data


def test_nothing_changed_means_the_weighting_changes_nothing(parent) -> None:
    """Prediction == labels: all weights 1, and the fine-tune equals the unweighted one bit for bit."""
    study = _study()
    study.predicted = study.labels.copy()
    weighted = finetune(
        parent, [study], FineTuneSettings(steps=3, device="cpu", augment=True, changed_weight=5.0, anchor=False)
    )
    plain = finetune(parent, [_study()], FineTuneSettings(steps=3, device="cpu", augment=True, anchor=False))
    assert _same_weights(weighted.model, plain.model)


def test_a_prediction_that_does_not_fit_is_refused() -> None:
    study = _study()
    with pytest.raises(ValueError, match="prediction"):
        CorrectedStudy(study.image, study.labels, study.review, predicted=study.labels[:2])
    with pytest.raises(ValueError, match="integer labels"):
        CorrectedStudy(study.image, study.labels, study.review, predicted=study.labels.astype(np.float32))
    with pytest.raises(ValueError, match="changed_weight"):
        FineTuneSettings(changed_weight=0.0)


def _parent_of(name: str, folder) -> tuple[object, tuple[int, ...]]:
    torch.manual_seed(0)
    dims = get_model_entry(name).spatial_dims
    shape = SHAPE if dims == 2 else (16, 32, 32)
    card = ModelCard(class_names=["background", "lesion"], patch_size=list(shape[-dims:]))
    save_bundle(create_model(name, in_channels=1, num_classes=2), folder, card)
    return folder, shape


@pytest.mark.parametrize("name", [n for n in list_models(include_test=True) if n.startswith("test_")])
def test_a_frozen_encoder_does_not_move_while_the_decoder_learns(name, tmp_path) -> None:
    folder, shape = _parent_of(name, tmp_path / name)
    settings = FineTuneSettings(steps=2, lr=1e-3, device="cpu", augment=False, freeze_encoder=True, anchor=False)
    outcome = finetune(folder, [_study(reviewed=(1, 2, 4), shape=shape)], settings)
    before = load_bundle(folder).model
    encoder = {id(p) for p in outcome.model.encoder_parameters()}
    encoder_state = {
        f"{module_name}.{key}"
        for module_name in outcome.model.encoder_module_names
        for key in getattr(outcome.model, module_name).state_dict()
        if not key.endswith("num_batches_tracked")
    }
    after_state, before_state = outcome.model.state_dict(), before.state_dict()
    for key in encoder_state:
        assert torch.equal(after_state[key], before_state[key]), key
    moved = [
        not torch.equal(p, q)
        for p, q in zip(outcome.model.parameters(), before.parameters(), strict=True)
        if id(p) not in encoder
    ]
    assert any(moved), "the decoder side did not learn"
    assert all(p.requires_grad for p in outcome.model.parameters())  # unfrozen again afterwards
    assert "encoder frozen" in outcome.card.training_data


def test_epochs_set_the_steps_from_the_training_slices(parent) -> None:
    settings = FineTuneSettings(epochs=3, batch_size=1, device="cpu", augment=False)
    assert settings.steps_for(2) == 6 and FineTuneSettings(epochs=3, batch_size=2).steps_for(3) == 5
    outcome = finetune(parent, [_study(reviewed=(1, 2, 4))], settings)  # 2 training slices
    assert [step for step, _ in outcome.history] == [1, 2, 3, 4, 5, 6]
    assert outcome.card.metrics["steps"] == 6 and outcome.provenance["settings"]["steps_run"] == 6
    with pytest.raises(ValueError, match="epochs"):
        FineTuneSettings(epochs=0)


# ------------------------------------------------------------------------------------------------------ the CLI


def test_the_cli_takes_the_new_options(parent, tmp_path) -> None:
    import nibabel as nib

    study = _study()
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    for name, array in (("image", study.image[0]), ("labels", study.labels), ("predicted", study.predicted)):
        nib.save(nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine), tmp_path / f"{name}.nii")
    files = ["--images", str(tmp_path / "image.nii"), "--labels", str(tmp_path / "labels.nii")]
    base = ["finetune", "--model", str(parent), *files, "--reviewed", "1,2,4", "--device", "cpu", "-q"]
    options = ["--predicted", str(tmp_path / "predicted.nii"), "--changed-weight", "3", "--freeze-encoder", "--anchor"]
    options += ["--no-defer-to-corrections"]
    assert cli.main([*base, *options, "--epochs", "2", "-o", str(tmp_path / "tuned")]) == 0
    record = json.loads((tmp_path / "tuned" / "provenance.json").read_text())
    settings = record["settings"]
    assert (settings["changed_weight"], settings["freeze_encoder"], settings["epochs"], settings["anchor"]) == (
        3.0, True, 2, True,
    )  # fmt: skip
    assert record["studies"][0]["anchor_labels"] == "the study's prediction"
    assert not settings["defer_to_corrections"] and record["studies"][0]["anchor_deferred_voxels"] == 0
    assert settings["steps_run"] == 2 and record["studies"][0]["changed_train_voxels"] == 100
    assert cli.main([*base, "--changed-weight", "3", "-o", str(tmp_path / "other")]) == 2  # no --predicted
    assert not (tmp_path / "other").exists()


def test_the_cli_defaults_are_the_library_defaults() -> None:
    import argparse

    from napari_mamba_seg._cli_finetune import add_finetune_parser

    parser = argparse.ArgumentParser()
    add_finetune_parser(parser.add_subparsers())
    args = parser.parse_args(["finetune", "-m", "x", "--images", "i", "--labels", "l", "-o", "o"])
    defaults = FineTuneSettings()
    assert (args.steps, args.lr, args.batch_size, args.holdout_every, args.seed, args.device) == (
        defaults.steps, defaults.lr, defaults.batch_size, defaults.holdout_every, defaults.seed, defaults.device,
    )  # fmt: skip
    assert (args.epochs, args.changed_weight, args.freeze_encoder, args.anchor, not args.no_augmentation) == (
        defaults.epochs, defaults.changed_weight, defaults.freeze_encoder, defaults.anchor, defaults.augment,
    )  # fmt: skip
    assert args.defer_to_corrections == defaults.defer_to_corrections


# ------------------------------------------------------------------------------------------------------ anchor


def test_the_anchor_rehearses_the_parents_prediction_on_unreviewed_slices(parent) -> None:
    """Its labels are the parent's prediction (given or computed here: the same model either way), the unreviewed
    labels still count for nothing, and it changes the fine-tune."""
    from napari_mamba_seg.inference import PredictionSettings, Predictor

    anchored = FineTuneSettings(steps=3, device="cpu", augment=False, anchor=True)
    computed = _study(garbage_seed=1)
    computed.predicted = None
    first = finetune(parent, [computed], anchored)
    record = first.provenance["studies"][0]
    assert record["anchor_slices"] == 3 and record["anchor_labels"] == "predicted by the parent"

    given = _study(garbage_seed=2)  # other garbage on the unreviewed slices
    bundle = load_bundle(parent)
    given.predicted = (
        Predictor(bundle.model, bundle.card, PredictionSettings(device="cpu"))
        .predict(given.image, given.spacing)
        .labels
    )
    second = finetune(parent, [given], anchored)
    assert second.provenance["studies"][0]["anchor_labels"] == "the study's prediction"
    assert _same_weights(first.model, second.model)

    plain = finetune(parent, [computed], SETTINGS)
    assert not _same_weights(first.model, plain.model)


def test_the_anchor_across_slices_trusts_exactly_the_unreviewed_voxels(parent) -> None:
    """Reviewed along another axis than the model slices: the anchor case is the whole study, trusted where
    unreviewed; the reviewed slices' anchor labels (the prediction there) must not count. (Deferring off: a changed
    prediction on a training slice moves what the anchor defers to, tested below.)"""
    anchored = FineTuneSettings(steps=3, device="cpu", augment=False, anchor=True, defer_to_corrections=False)
    first, second = _study((11, 14, 17), axis=1), _study((11, 14, 17), axis=1)
    second.predicted[:, 11] = 1 - second.predicted[:, 11]  # differs on a reviewed slice only
    assert _same_weights(finetune(parent, [first], anchored).model, finetune(parent, [second], anchored).model)


@pytest.mark.parametrize("axis", [0, 1])  # the anchor case cropped to its slices, or the whole study with a mask
def test_where_the_anchor_defers_its_labels_count_for_nothing(parent, axis) -> None:
    """The prediction misses the lesion's right half on every slice; the training slices' corrections add it. On the
    unreviewed slices near them the anchor leaves those columns out: other anchor labels there change no weight,
    and without deferring they do."""
    reviewed = (1, 2, 4) if axis == 0 else (11, 14, 17)
    deferring = FineTuneSettings(steps=3, device="cpu", augment=False, anchor=True)
    first, second = _study(reviewed, axis=axis), _study(reviewed, axis=axis)
    columns = np.zeros(SHAPE, bool)
    columns[:, 9:21, 15:24] = True  # the corrected columns (10:20, 17:22) grown by 1 of the 3 margin pixels
    unreviewed = ~ReviewState(axis, SHAPE[axis], set(reviewed)).trusted_mask(SHAPE)
    noise = np.random.default_rng(3).integers(0, 2, SHAPE).astype(np.uint8)
    second.predicted[columns & unreviewed] = noise[columns & unreviewed]
    tuned = finetune(parent, [first], deferring)
    record = tuned.provenance["studies"][0]
    assert record["anchor_deferred_voxels"] > (columns & unreviewed).sum()
    # spacing (3, 1, 1) mm: 20 mm are 6 slices of 3 mm along axis 0, 20 of 1 mm along axis 1
    expected = (3, 6) if axis == 0 else (2, 20)
    assert (record["anchor_defer_margin_pixels"], record["anchor_defer_reach_slices"]) == expected
    assert _same_weights(tuned.model, finetune(parent, [second], deferring).model)

    plain = dataclasses.replace(deferring, defer_to_corrections=False)
    undeferred = finetune(parent, [first], plain)
    assert undeferred.provenance["studies"][0]["anchor_deferred_voxels"] == 0
    assert not _same_weights(undeferred.model, finetune(parent, [second], plain).model)


def test_the_held_out_slices_correction_does_not_move_the_anchor(parent) -> None:
    """The held-out slice judges the fine-tune: what the clinician changed there must not shape the training."""
    anchored = FineTuneSettings(steps=3, device="cpu", augment=False, anchor=True)
    first, second = _study((11, 14, 17), axis=1), _study((11, 14, 17), axis=1)
    second.predicted[:, 14] = 1 - second.predicted[:, 14]  # 14: the held-out slice
    assert _same_weights(finetune(parent, [first], anchored).model, finetune(parent, [second], anchored).model)


def test_the_training_patch_is_capped_at_the_study_and_the_card_keeps_its_tile(tmp_path) -> None:
    torch.manual_seed(0)
    folder = tmp_path / "wide"
    save_bundle(create_model("test_unet", in_channels=1, num_classes=2), folder, ModelCard(patch_size=[64, 48]))
    outcome = finetune(folder, [_study()], SETTINGS)  # slices of 32 x 32
    assert outcome.provenance["settings"]["patch_size"] == (32, 32)
    assert outcome.card.patch_size == [64, 48]
