"""Fine-tuning on corrections: only reviewed slices train, a held-out check decides activation, versions are never
overwritten, cancelling saves nothing."""

from __future__ import annotations

import dataclasses
import json
import math
import threading

import numpy as np
import pytest
import torch

from napari_mamba_seg.bundles import load_bundle, save_bundle
from napari_mamba_seg.interactive import ReviewState
from napari_mamba_seg.training.finetune import (
    CorrectedStudy,
    FineTuneSettings,
    ModelVersions,
    finetune,
    save_version,
    split_reviewed_slices,
)

SHAPE = (6, 32, 32)


def _study(reviewed=(1, 2, 4), seed=0, garbage_seed=None, axis=0) -> CorrectedStudy:
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(1, *SHAPE)).astype(np.float32)
    labels = np.zeros(SHAPE, np.uint8)
    labels[:, 10:20, 12:22] = 1
    image[0][labels == 1] += 2.0
    if garbage_seed is not None:  # different labels on the unreviewed slices only
        garbage = np.random.default_rng(garbage_seed).integers(0, 2, SHAPE).astype(np.uint8)
        unreviewed = ~ReviewState(axis, SHAPE[axis], set(reviewed)).trusted_mask(SHAPE)
        labels[unreviewed] = garbage[unreviewed]
    review = ReviewState(axis, SHAPE[axis], set(reviewed))
    return CorrectedStudy(image, labels, review, (3.0, 1.0, 1.0), "case")


SETTINGS = FineTuneSettings(steps=3, batch_size=2, device="cpu", augment=False, anchor=False)  # anchor: own tests


def test_split_holds_out_every_third_reviewed_slice_from_the_second() -> None:
    assert split_reviewed_slices(ReviewState(0, 20, {3, 5, 9, 12, 15}), 3) == ([3, 9, 12], [5, 15])
    assert split_reviewed_slices(ReviewState(0, 20, {7}), 3) == ([7], [])
    assert split_reviewed_slices(ReviewState(0, 20, {7, 8}), 2) == ([7], [8])


@pytest.mark.parametrize("axis", [0, 1], ids=["slices-along-the-model-axis", "trust-mask-across-slices"])
def test_unreviewed_voxels_do_not_change_the_fine_tuned_weights(parent, axis) -> None:
    """Reviewed along the model's slice axis the cases hold only the reviewed slices; reviewed along another axis the
    whole volume goes in with a trust mask, whose untrusted voxels must get no gradient."""
    reviewed = (1, 2, 4) if axis == 0 else (11, 14, 17)
    first = finetune(parent, [_study(reviewed, garbage_seed=1, axis=axis)], SETTINGS)
    second = finetune(parent, [_study(reviewed, garbage_seed=2, axis=axis)], SETTINGS)
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # while the reviewed labels do change them
    changed = _study(reviewed, garbage_seed=1, axis=axis)
    first_reviewed = [slice(None)] * 3
    first_reviewed[axis] = reviewed[0]
    changed.labels[tuple(first_reviewed)] = 0
    third = finetune(parent, [changed], SETTINGS)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(first.model.state_dict().values(), third.model.state_dict().values(), strict=True)
    )


def test_the_held_out_score_is_reported_during_the_run_and_does_not_change_the_model(parent) -> None:
    """Step 0 is the parent's score, then every ``validate_every`` steps and after the last (the safety net's)."""
    reports = []
    settings = dataclasses.replace(SETTINGS, steps=5, validate_every=2)
    scored = finetune(parent, [_study()], settings, progress=reports.append)
    dice = [(r.step, r.metrics["mean_dice"]) for r in reports if r.stage == "validate" and r.metrics]
    assert [step for step, _ in dice] == [0, 2, 4, 5]
    assert dice[0][1] == scored.before and dice[-1][1] == scored.after
    assert len({value for _, value in dice}) > 1  # the scores follow the training
    quiet = finetune(parent, [_study()], dataclasses.replace(settings, validate_every=0))
    same = zip(scored.model.state_dict().values(), quiet.model.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in same) and quiet.after == scored.after
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="validate_every"):
            FineTuneSettings(validate_every=bad)


def test_outcome_card_and_provenance(parent) -> None:
    outcome = finetune(parent, [_study()], SETTINGS)
    assert outcome.card.parent_sha256 == load_bundle(parent).card.sha256
    assert outcome.provenance["studies"][0]["train_slices"] == [1, 4]
    assert outcome.provenance["studies"][0]["holdout_slices"] == [2]
    assert 0 <= outcome.before <= 1 and 0 <= outcome.after <= 1
    assert outcome.card.metrics["holdout_mean_dice_before"] == outcome.before
    assert outcome.activate == (outcome.after >= outcome.before)
    assert [step for step, _loss in outcome.history] == [1, 2, 3]


def test_versions_are_new_folders_and_a_regression_is_not_activated(parent, tmp_path) -> None:
    root = tmp_path / "versions"
    outcome = finetune(parent, [_study()], SETTINGS)
    outcome.activate, outcome.reason = True, "activated"
    first = save_version(outcome, root)
    regression = finetune(parent, [_study()], SETTINGS)
    regression.activate, regression.reason = False, "kept but not activated: the held-out Dice dropped"
    second = save_version(regression, root)
    assert (first.name, second.name) == ("tiny-ft1", "tiny-ft2")
    versions = ModelVersions(root)
    assert versions.versions("tiny") == ["tiny", "tiny-ft1", "tiny-ft2"]
    assert versions.active("tiny") == "tiny-ft1"  # the regression is kept, not activated
    provenance = json.loads((second / "provenance.json").read_text())
    assert provenance["activated"] is False and "dropped" in provenance["reason"]
    assert load_bundle(second).card.parent_bundle is not None
    versions.activate("tiny", "tiny")
    assert versions.active("tiny") == "tiny"
    with pytest.raises(ValueError, match="not a version"):
        versions.activate("tiny", "other")


def test_the_safety_net_refuses_a_worse_model(parent, tmp_path) -> None:
    """A parent trained on the study, then "corrections" that erase the lesion on the training slices: the held-out
    slice (still labelled) gets worse, so the version is not activated."""
    from napari_mamba_seg.training import Trainer, TrainingCase, TrainingConfig

    study = _study()
    trainer = Trainer.from_bundle(
        parent,
        [TrainingCase(study.image, study.labels, None, study.spacing, "case")],
        None,
        TrainingConfig(steps=40, batch_size=4, lr=3e-3, device="cpu", val_every=0, checkpoint_every=0),
    )
    trainer.train()
    good = tmp_path / "good"
    save_bundle(trainer.model, good, trainer.card)
    erased = _study()
    erased.labels[[1, 4]] = 0  # the training slices (2 is held out)
    outcome = finetune(good, [erased], FineTuneSettings(steps=20, lr=3e-3, device="cpu", augment=False, anchor=False))
    assert outcome.before > 0.5, outcome.before
    assert outcome.after < outcome.before
    assert not outcome.activate and "dropped" in outcome.reason


def test_without_a_held_out_slice_it_is_kept_but_not_activated(parent) -> None:
    outcome = finetune(parent, [_study(reviewed=(2,))], SETTINGS)
    assert math.isnan(outcome.before) and not outcome.activate and "held out" in outcome.reason


def test_cancel_saves_nothing_and_keeps_the_active_model(parent, tmp_path) -> None:
    cancel = threading.Event()
    cancel.set()
    outcome = finetune(parent, [_study()], SETTINGS, cancel=cancel)
    assert outcome.cancelled and outcome.model is None
    with pytest.raises(ValueError, match="cancelled"):
        save_version(outcome, tmp_path / "versions")
    assert ModelVersions(tmp_path / "versions").active("tiny") == "tiny"
    assert not (tmp_path / "versions").exists()


def test_bad_studies_are_refused(parent) -> None:
    with pytest.raises(ValueError, match="no study"):
        finetune(parent, [], SETTINGS)
    with pytest.raises(ValueError, match="no reviewed slice"):
        finetune(parent, [_study(reviewed=())], SETTINGS)
    study = _study()
    with pytest.raises(ValueError, match="do not fit the image"):
        CorrectedStudy(study.image, study.labels[:3], study.review)
    for spacing in ((1.0, 1.0), (1.0, 0.0, 1.0), (1.0, float("inf"), 1.0)):
        with pytest.raises(
            ValueError, match=r"study .*: spacing must be 3 positive finite voxel sizes in mm \(array order, or None\)"
        ):
            CorrectedStudy(study.image, study.labels, study.review, spacing)
    assert CorrectedStudy(study.image, study.labels, study.review, [2, 1, 1]).spacing == (2.0, 1.0, 1.0)
