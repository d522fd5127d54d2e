"""Fine-tune a model bundle on a clinician's corrections, with a safety net.

Only the reviewed slices count: a study's labels are trusted on its reviewed slices and nowhere else, so an
unreviewed voxel contributes no gradient (it is ignored, not taken as background). A share of each study's reviewed
slices is held out of the fine-tune; the parent and the fine-tuned model are both scored on them (Dice over the
held-out slices), and the new version is *activated* only when it is not worse there. Either way it is written as a
new bundle version (never over another file), with its parent, the studies and slices used (hashes), the settings and
both scores in its card and in ``provenance.json``.

Options beyond steps and learning rate: ``epochs`` instead of steps, ``changed_weight`` (the voxels the clinician
changed relative to the model's own prediction, ``CorrectedStudy.predicted``, count that many times in the loss),
``anchor`` (half of the patches show the model its own prediction on the unreviewed slices, so that it learns what
the corrections show without drifting elsewhere), ``freeze_encoder`` (only the decoder side learns) and ``augment``.

Example:
    >>> study = CorrectedStudy(image, labels, ReviewState(axis=0, num_slices=60, reviewed={10, 20, 30}), spacing)
    >>> outcome = finetune("breast-dce", [study], FineTuneSettings(steps=60), progress=print)
    >>> version = save_version(outcome, versions_root())   # user bundles folder; activated if not worse
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from napari_mamba_seg._durable import fsync_directory, write_durably
from napari_mamba_seg._generators import CancelSignal
from napari_mamba_seg._spacing import checked_spacing
from napari_mamba_seg.bundles import Bundle, ModelCard, load_bundle, save_bundle, user_bundle_root
from napari_mamba_seg.inference import PredictionSettings, Predictor
from napari_mamba_seg.inference.predictor import slice_axis_for
from napari_mamba_seg.interactive.review import ReviewState
from napari_mamba_seg.models import get_model_entry
from napari_mamba_seg.training.anchor import defer_extent, deferred_to_corrections
from napari_mamba_seg.training.augmentation import AugmentationConfig
from napari_mamba_seg.training.cases import TrainingCase
from napari_mamba_seg.training.evaluation import MEAN_DICE
from napari_mamba_seg.training.trainer import Trainer, TrainingConfig, TrainingProgress, card_patch_size

__all__ = [
    "CorrectedStudy",
    "FineTuneOutcome",
    "FineTuneSettings",
    "ModelVersions",
    "finetune",
    "lineage_of",
    "save_version",
    "split_reviewed_slices",
    "versions_root",
    "write_bundle",
]

PROVENANCE_FILE = "provenance.json"
VERSIONS_FILE = "versions.json"


@dataclass
class CorrectedStudy:
    """One corrected study: the image, the corrected labels and which slices the clinician reviewed.

    Attributes:
        image: ``(C, *spatial)`` image, as the model takes it.
        labels: ``(*spatial)`` corrected labels.
        review: The reviewed slices (only they are trusted).
        spacing: Voxel size in mm (array order), or None.
        name: A name for messages and the provenance record.
        predicted: ``(*spatial)`` the model's own prediction the clinician started from, or None. Where the
            reviewed labels differ from it, the voxels count ``FineTuneSettings.changed_weight`` times in the loss.
    """

    image: np.ndarray
    labels: np.ndarray
    review: ReviewState
    spacing: tuple[float, ...] | None = None
    name: str = "study"
    predicted: np.ndarray | None = None

    def __post_init__(self) -> None:
        """Check that the labels, the prediction and the review state fit the image."""
        self.image, self.labels = np.asarray(self.image), np.asarray(self.labels)
        if self.labels.shape != self.image.shape[1:]:
            raise ValueError(
                f"study {self.name!r}: labels of shape {self.labels.shape} do not fit the image {self.image.shape} "
                "(channels first); the labels must lie on the image's voxel grid"
            )
        if self.predicted is not None:
            self.predicted = np.asarray(self.predicted)
            if self.predicted.shape != self.labels.shape or self.predicted.dtype.kind not in "biu":
                raise ValueError(
                    f"study {self.name!r}: the prediction (shape {self.predicted.shape}, dtype "
                    f"{self.predicted.dtype}) must be integer labels of the labels' shape {self.labels.shape}: the "
                    "model's own prediction the corrections started from"
                )
        self.review.check_fits(self.labels.shape)
        if self.spacing is not None:
            self.spacing = checked_spacing(
                self.spacing, self.labels.ndim, name=f"study {self.name!r}: spacing", axes="array order, or None"
            )

    def changed(self) -> np.ndarray | None:
        """``(*spatial)`` bool: where the labels differ from :attr:`predicted` (None without a prediction)."""
        return None if self.predicted is None else self.labels != self.predicted


@dataclass
class FineTuneSettings:
    """How to fine-tune.

    Attributes:
        steps: Optimizer steps (unless ``epochs`` is set).
        epochs: Train this many epochs instead of ``steps``; None = use ``steps``. An epoch draws one patch per
            training slice (the reviewed slices not held out, over all studies), so it takes
            ``ceil(training slices / batch_size)`` steps; patches are drawn at random, so each slice is seen once per
            epoch on average (for a 3D model a patch covers several slices).
        lr: Peak learning rate (AdamW, short warm-up, cosine); lower than for training from scratch.
        batch_size: Patches per step.
        augment: Augment the patches (flips, rotations, intensity...) or not.
        holdout_every: Hold out every ``holdout_every``-th reviewed slice of each study (sorted, starting with the
            second one) for the before/after check; a study with one reviewed slice holds out none.
        tolerance: Activate the new version when its held-out mean Dice is at least the parent's minus this.
        seed: Seed of the patches and the augmentation.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        changed_weight: Loss weight of the reviewed voxels whose label the clinician changed relative to the model's
            prediction (``CorrectedStudy.predicted``); the other reviewed voxels weigh 1. 1 = off.
        freeze_encoder: Train only the decoder side: the encoder's parameters (``encoder_parameters()`` of the
            model) get no gradient and do not change, nor do its batch-norm statistics.
        anchor: Anchor the fine-tune to the parent: each study adds a case made of its *unreviewed* slices labelled
            with the parent's own prediction (``CorrectedStudy.predicted``, else predicted here with the parent), so
            half of the patches rehearse what the parent did where nobody corrected it. The corrections still win on
            the reviewed slices; the labels of unreviewed slices are still ignored. Without it, a few corrections
            that all point one way (all "more tumour" or all "less") shift the whole study that way. On by default,
            with ``lr`` 3e-4: on issue 7's protocol (BENCHMARKS.md) that took the mean gain over 7 unseen sarcoma
            cases from +0.000 (no anchor, lr 3e-5, 30 steps) to +0.025 (80 steps), and the same lr without the
            anchor spread the corrected case's tumour over its other slices.
        defer_to_corrections: The anchor does not rehearse the parent where the training slices' corrections showed
            it wrong (:func:`~napari_mamba_seg.training.anchor.deferred_to_corrections`): within 20 mm of a corrected
            slice at the positions it corrected (grown by 3 mm), farther away where the parent repeats a foreground
            the clinician removed.
            Without it the parent's error on the neighbouring slices outvotes the one corrected slice. On by default,
            with 60 steps: on the same protocol the mean gain went from +0.025 to +0.045, and from +0.061 to +0.181
            on the one case below 0.70 Dice.
        validate_every: Score the held-out slices every this many steps as well (reported through ``progress`` for the
            widget's plot; the fine-tuned model and the safety decision do not depend on it: the decision takes the
            score after the last step); 0 = only before the first step and after the last.
    """

    steps: int = 60
    lr: float = 3e-4
    batch_size: int = 2
    augment: bool = True
    holdout_every: int = 3
    tolerance: float = 0.0
    seed: int = 0
    device: str = "auto"
    epochs: int | None = None
    changed_weight: float = 1.0
    freeze_encoder: bool = False
    anchor: bool = True
    defer_to_corrections: bool = True
    validate_every: int = 10

    def __post_init__(self) -> None:
        """Check the values."""
        if self.holdout_every < 2:
            raise ValueError(f"holdout_every must be >= 2 (some reviewed slices must train), got {self.holdout_every}")
        if not self.tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0, got {self.tolerance}")
        if self.epochs is not None and (isinstance(self.epochs, bool) or not isinstance(self.epochs, int)):
            raise ValueError(f"epochs must be None or an integer >= 1, got {self.epochs!r}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be None or an integer >= 1, got {self.epochs}")
        if isinstance(self.validate_every, bool) or not isinstance(self.validate_every, int) or self.validate_every < 0:
            raise ValueError(f"validate_every must be an integer >= 0 (0: at the end), got {self.validate_every!r}")
        if not (math.isfinite(self.changed_weight) and self.changed_weight > 0):
            raise ValueError(f"changed_weight must be a positive number (1 = off), got {self.changed_weight}")

    def steps_for(self, training_slices: int) -> int:
        """The optimizer steps to run: ``steps``, or ``epochs`` epochs of ``training_slices`` slices."""
        if self.epochs is None:
            return self.steps
        return max(1, math.ceil(self.epochs * training_slices / self.batch_size))


@dataclass
class FineTuneOutcome:
    """The result of :func:`finetune` (nothing written yet; see :func:`save_version`).

    Attributes:
        model: The fine-tuned model (None when cancelled).
        card: Its card: parent and parent hash, settings, studies and both scores.
        before: Held-out mean Dice of the parent (nan without held-out slices).
        after: Held-out mean Dice of the fine-tuned model.
        activate: Whether the safety net accepts the new version.
        reason: Why (or why not), for the user.
        provenance: The studies and slices used (with hashes) and the settings, as JSON.
        cancelled: The fine-tune was cancelled (nothing to save).
        history: Loss per step: ``(step, loss)``.
    """

    model: nn.Module | None
    card: ModelCard | None
    before: float
    after: float
    activate: bool
    reason: str
    provenance: dict[str, Any] = field(default_factory=dict)
    cancelled: bool = False
    history: list[tuple[int, float]] = field(default_factory=list)


def split_reviewed_slices(review: ReviewState, holdout_every: int) -> tuple[list[int], list[int]]:
    """``(train, holdout)`` reviewed slice indices: every ``holdout_every``-th one from the second is held out."""
    reviewed = sorted(review.reviewed)
    holdout = reviewed[1::holdout_every] if len(reviewed) >= 2 else []
    return [i for i in reviewed if i not in holdout], holdout


def _trusted(review: ReviewState, slices: Sequence[int], shape: tuple[int, ...]) -> np.ndarray:
    return ReviewState(review.axis, review.num_slices, set(slices)).trusted_mask(shape)


def finetune(
    source: str | os.PathLike[str],
    studies: Sequence[CorrectedStudy],
    settings: FineTuneSettings | None = None,
    *,
    progress: Callable[[TrainingProgress], None] | None = None,
    cancel: CancelSignal = None,
) -> FineTuneOutcome:
    """Fine-tune the bundle ``source`` on the reviewed slices of ``studies`` and score it against its parent.

    Args:
        source: A bundle name or folder.
        studies: The corrected studies.
        settings: How to fine-tune; None = defaults.
        progress: Called with every :class:`TrainingProgress`: ``stage == "train"`` carries the loss, ``"validate"``
            with ``metrics`` the held-out ``mean_dice`` (at step 0 the parent's, then every ``validate_every`` steps
            and after the last).
        cancel: Stops before the next step; the outcome is then ``cancelled`` and holds no model.

    Returns:
        The :class:`FineTuneOutcome`.

    Raises:
        ValueError: No study, no reviewed slice to train on, a study that does not fit the model, or
            ``freeze_encoder`` for an architecture that does not name its encoder.
    """
    settings = settings or FineTuneSettings()
    if not studies:
        raise ValueError("no study to fine-tune on: correct and review some slices first")
    bundle = load_bundle(source)
    slice_wise = get_model_entry(bundle.card.architecture).spatial_dims == 2 and not bundle.card.resample
    train_cases, holdout_cases, used = _cases(studies, settings, slice_wise=slice_wise)
    if not train_cases:
        raise ValueError("no reviewed slice to train on: mark the slices you corrected as reviewed")
    weights = _voxel_weights(studies, settings, slice_wise=slice_wise)
    if settings.anchor:  # before training: the parent predicts the unreviewed slices
        anchor_cases = _anchor_cases(bundle, studies, used, settings, slice_wise=slice_wise)
        train_cases += anchor_cases
        weights = None if weights is None else weights + [None] * len(anchor_cases)
    steps = settings.steps_for(sum(len(study["train_slices"]) for study in used))
    patch = _patch_size(bundle.card, train_cases)
    config = TrainingConfig(
        steps=steps,
        batch_size=settings.batch_size,
        lr=settings.lr,
        warmup_steps=min(10, steps // 5),
        val_every=settings.validate_every,
        checkpoint_every=0,
        seed=settings.seed,
        device=settings.device,
        patch_size=patch,
        foreground_fraction=0.5,
        augmentation=AugmentationConfig() if settings.augment else AugmentationConfig.none(),
    )
    provenance = {"parent": bundle.folder.name, "parent_sha256": bundle.card.sha256, "studies": used}
    provenance["settings"] = dataclasses.asdict(settings) | {"steps_run": steps, "patch_size": patch}
    card = bundle.fine_tuned_card(training_data=_training_text(bundle.card, used, settings, steps))
    provenance["changed_voxels_weighted"] = weights is not None  # changed_weight != 1 and a prediction to compare to
    history: list[tuple[int, float]] = []

    def record(update: TrainingProgress) -> None:
        if update.stage == "train" and update.loss is not None:
            history.append((update.step, float(update.loss)))
        if progress is not None:
            progress(update)

    with _encoder_frozen(bundle.model, settings.freeze_encoder):
        trainer = Trainer(bundle.model, card, train_cases, holdout_cases or None, config, voxel_weights=weights)
        before = _mean_dice(trainer) if holdout_cases else math.nan
        if holdout_cases:
            message = f"held-out Dice before fine-tuning: {before:.3f}"
            record(TrainingProgress(0, steps, None, 0.0, "validate", {MEAN_DICE: before}, message))
        result = trainer.train(progress=record, cancel=cancel)
    if result.cancelled:
        return FineTuneOutcome(None, None, before, math.nan, False, "cancelled", provenance, True, history)
    after = float(trainer.last_metrics.get(MEAN_DICE, math.nan)) if holdout_cases else math.nan  # end-of-run check
    activate, reason = _safety_decision(before, after, settings.tolerance)
    metrics = {"holdout_mean_dice_before": before, "holdout_mean_dice_after": after, "steps": steps}
    card = dataclasses.replace(
        trainer.card,
        patch_size=bundle.card.patch_size,  # the parent's tile for prediction, not the (capped) training patch
        metrics={k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))},
    )
    return FineTuneOutcome(trainer.model.eval(), card, before, after, activate, reason, provenance, False, history)


def _cases(
    studies: Sequence[CorrectedStudy], settings: FineTuneSettings, *, slice_wise: bool
) -> tuple[list[TrainingCase], list[TrainingCase], list[dict[str, Any]]]:
    """Training cases (trusted on the training slices) and held-out cases (trusted on the held-out slices).

    With ``slice_wise`` (a 2D model that slices along the review axis), each case holds only its own slices: the
    model sees exactly the same 2D inputs, and validating a held-out slice costs one slice, not the volume.
    """
    train_cases, holdout_cases, used = [], [], []
    for study in studies:
        train, holdout = split_reviewed_slices(study.review, settings.holdout_every)
        for slices, cases in ((train, train_cases), (holdout, holdout_cases)):
            if slices:
                cases.append(_case_of_slices(study, slices, cropped=_cropped(study, slice_wise)))
        record = {
            "name": study.name,
            "image_sha256": _array_sha256(study.image),
            "labels_sha256": _array_sha256(study.labels),
            "axis": study.review.axis,
            "train_slices": train,
            "holdout_slices": holdout,
        }
        if study.predicted is not None:
            record["predicted_sha256"] = _array_sha256(study.predicted)
            record["changed_train_voxels"] = int(
                (study.changed() & _trusted(study.review, train, study.labels.shape)).sum()
            )
        used.append(record)
    return train_cases, holdout_cases, used


def _anchor_cases(
    bundle: Bundle,
    studies: Sequence[CorrectedStudy],
    used: list[dict[str, Any]],
    settings: FineTuneSettings,
    *,
    slice_wise: bool,
) -> list[TrainingCase]:
    """Per study with unreviewed slices, a case of those slices labelled with the parent's prediction (recorded in
    ``used``: how many slices and where the prediction came from)."""
    cases = []
    for study, record in zip(studies, used, strict=True):
        unreviewed = sorted(set(range(study.review.num_slices)) - set(study.review.reviewed))
        if not unreviewed:
            continue
        predicted, source = study.predicted, "the study's prediction"
        if predicted is None:
            predictor = Predictor(bundle.model, bundle.card, PredictionSettings(device=settings.device))
            predicted, source = predictor.predict(study.image, study.spacing).labels, "predicted by the parent"
        deferred = None
        if settings.defer_to_corrections:
            train, axis = record["train_slices"], study.review.axis
            margin, reach = defer_extent(study.spacing, axis)
            deferred = deferred_to_corrections(
                study.labels, predicted, axis, train, unreviewed, margin=margin, reach=reach
            )
            record |= {"anchor_defer_margin_pixels": margin, "anchor_defer_reach_slices": reach}
        record |= {"anchor_slices": len(unreviewed), "anchor_labels": source}
        record["anchor_deferred_voxels"] = 0 if deferred is None else int(deferred.sum())
        rehearsal = dataclasses.replace(
            study, labels=predicted, name=f"{study.name} (unreviewed, parent's prediction)", predicted=None
        )
        cases.append(_case_of_slices(rehearsal, unreviewed, cropped=_cropped(study, slice_wise), untrusted=deferred))
    return cases


def _voxel_weights(
    studies: Sequence[CorrectedStudy], settings: FineTuneSettings, *, slice_wise: bool
) -> list[np.ndarray | None] | None:
    """One weight map per training case (as :func:`_cases` makes them): ``changed_weight`` where the labels differ
    from the prediction, else 1; None when no weighting applies (``changed_weight`` 1, or no study has a prediction).
    """
    if settings.changed_weight == 1.0 or all(study.predicted is None for study in studies):
        return None
    weights: list[np.ndarray | None] = []
    for study in studies:
        train, _ = split_reviewed_slices(study.review, settings.holdout_every)
        if not train:
            continue
        changed = study.changed()
        if changed is None:
            weights.append(None)
            continue
        if _cropped(study, slice_wise):  # the case holds its slices only
            changed = np.take(changed, train, axis=study.review.axis)
        weights.append(np.where(changed, np.float32(settings.changed_weight), np.float32(1.0)))
    return weights


@contextlib.contextmanager
def _encoder_frozen(model: nn.Module, frozen: bool) -> Iterator[None]:
    """With ``frozen``, the model's encoder parameters get no gradient and its batch-norm statistics stay put (momentum
    0); both restored afterwards. Nothing without ``frozen``.

    Raises:
        ValueError: The architecture does not name its encoder.
    """
    if not frozen:
        yield
        return
    try:
        parameters = model.encoder_parameters()
        modules = [inner for module in model.encoder_modules() for inner in module.modules()]
    except NotImplementedError as error:
        raise ValueError(f"freeze_encoder: {error}") from None
    norms = [m for m in modules if getattr(m, "running_mean", None) is not None and hasattr(m, "momentum")]
    requires_grad = [p.requires_grad for p in parameters]
    momenta = [m.momentum for m in norms]
    try:
        for parameter in parameters:
            parameter.requires_grad_(False)
        for norm in norms:
            norm.momentum = 0.0
        yield
    finally:
        for parameter, flag in zip(parameters, requires_grad, strict=True):
            parameter.requires_grad_(flag)
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum


def _patch_size(card: ModelCard, cases: Sequence[TrainingCase]) -> tuple[int, ...] | None:
    """The training patch: the card's (or the trainer's default), capped at the largest case along each axis.

    The predictor caps its tile at the slice (or volume) the same way, so a study smaller than the patch trains on
    what prediction sees, not on a patch mostly made of padding (and faster). None when the card resamples (the
    cases' sizes change on the model's grid).
    """
    if card.resample:
        return None
    spatial_dims = get_model_entry(card.architecture).spatial_dims
    patch = card_patch_size(card, spatial_dims)
    extents = [_model_extent(case, spatial_dims) for case in cases]
    if any(len(extent) != len(patch) for extent in extents):
        return None  # the trainer explains the mismatch
    return tuple(min(int(size), max(extent[axis] for extent in extents)) for axis, size in enumerate(patch))


def _model_extent(case: TrainingCase, spatial_dims: int) -> tuple[int, ...]:
    """The case's size as the model sees it: in-plane (the slice axis as the trainer picks it removed) for a 2D model
    on a volume, else its spatial shape."""
    shape = case.spatial_shape
    if spatial_dims == 2 and len(shape) == 3:
        axis = slice_axis_for(case.spacing)
        return tuple(size for a, size in enumerate(shape) if a != axis)
    return tuple(shape)


def _cropped(study: CorrectedStudy, slice_wise: bool) -> bool:
    """Whether a case of ``study``'s slices holds those slices alone: a 2D model that slices along the review axis."""
    return slice_wise and slice_axis_for(study.spacing) == study.review.axis


def _case_of_slices(
    study: CorrectedStudy, slices: list[int], *, cropped: bool, untrusted: np.ndarray | None = None
) -> TrainingCase:
    """A case trusted on ``slices`` only: those slices alone (``cropped``) or the whole study with a trust mask; minus
    the ``(*spatial)`` voxels ``untrusted`` (of the whole study) when given."""
    axis = study.review.axis
    if cropped:
        image = np.take(study.image, slices, axis=axis + 1)
        labels = np.take(study.labels, slices, axis=axis)
        trusted = None if untrusted is None else ~np.take(untrusted, slices, axis=axis)
        return TrainingCase(image, labels, trusted, study.spacing, study.name)
    trusted = _trusted(study.review, slices, study.labels.shape)
    if untrusted is not None:
        trusted &= ~untrusted
    return TrainingCase(study.image, study.labels, trusted, study.spacing, study.name)


def _mean_dice(trainer: Trainer) -> float:
    metrics = trainer.validate() or {}
    return float(metrics.get(MEAN_DICE, math.nan))


def _safety_decision(before: float, after: float, tolerance: float) -> tuple[bool, str]:
    if math.isnan(before) or math.isnan(after):
        return False, (
            "kept but not activated: no reviewed slice was held out to check it (review at least two slices); "
            "activate it yourself if its masks look better"
        )
    if after + 1e-9 >= before - tolerance:
        return True, f"activated: held-out Dice {before:.3f} -> {after:.3f}"
    return False, (
        f"kept but not activated: the held-out Dice dropped from {before:.3f} to {after:.3f}; the previous model "
        "stays active (more reviewed slices, or fewer steps, may help)"
    )


def _array_sha256(array: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _training_text(parent: ModelCard, used: Sequence[dict[str, Any]], settings: FineTuneSettings, steps: int) -> str:
    slices = sum(len(s["train_slices"]) for s in used)
    names = ", ".join(s["name"] for s in used)
    how = [f"{steps} steps of batch {settings.batch_size}", f"lr {settings.lr:g}"]
    how += [] if settings.augment else ["no augmentation"]
    how += [f"changed voxels weighted {settings.changed_weight:g}"] if settings.changed_weight != 1.0 else []
    how += ["encoder frozen"] if settings.freeze_encoder else []
    if settings.anchor:
        deferring = " except where the corrections showed it wrong" if settings.defer_to_corrections else ""
        how += [f"anchored to the parent's prediction on unreviewed slices{deferring}"]
    return (
        f"fine-tuned on {slices} reviewed slice(s) of {len(used)} study(ies) ({names}; {', '.join(how)}); parent "
        f"trained on: {parent.training_data or 'not stated'}"
    )


# -------------------------------------------------------------------------------------------------------- versions


def versions_root() -> Path:
    """Where fine-tuned versions go: the user's bundle folder (``list_user_bundles``/``load_bundle`` find them)."""
    return user_bundle_root()


def save_version(outcome: FineTuneOutcome, root: str | os.PathLike[str] | None = None) -> Path:
    """Write the fine-tuned model as a new bundle version ``<lineage>-ft<N>`` (never over an existing folder) and
    record it in ``versions.json``; make it the active version of its lineage when the safety net accepted it.

    Returns:
        The new bundle folder.

    Raises:
        ValueError: A cancelled outcome (nothing to save).
    """
    versions = ModelVersions(root if root is not None else versions_root())
    lineage = lineage_of(outcome.provenance.get("parent", "model"))
    folder = write_bundle(outcome, versions.new_folder(lineage))
    versions.add(lineage, folder.name, outcome.provenance["parent"], activate=outcome.activate)
    return folder


def write_bundle(outcome: FineTuneOutcome, folder: str | os.PathLike[str]) -> Path:
    """Write the fine-tuned model as a bundle in ``folder`` (which must not exist), with ``provenance.json``: parent
    and its hash, the studies and slices used (hashes), the settings, both held-out scores and the safety decision.

    Raises:
        ValueError: A cancelled outcome (nothing to save).
        FileExistsError: ``folder`` exists.
    """
    if outcome.cancelled or outcome.model is None or outcome.card is None:
        raise ValueError("the fine-tune was cancelled: there is no model to save")
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} exists; a fine-tuned model is always written to a new folder")
    save_bundle(outcome.model, folder, outcome.card)
    record = {**outcome.provenance, "activated": outcome.activate, "reason": outcome.reason}
    record |= {"holdout_mean_dice_before": _json_float(outcome.before)}
    record |= {"holdout_mean_dice_after": _json_float(outcome.after)}
    write_durably(folder / PROVENANCE_FILE, json.dumps(record, indent=2).encode())
    return folder


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else value


def lineage_of(parent: str) -> str:
    """``breast-dce-ft3`` -> ``breast-dce``: versions of versions stay in one lineage."""
    return re.sub(r"-ft\d+$", "", Path(parent).name)


class ModelVersions:
    """The fine-tuned versions of each model lineage in a folder, and which one is active (``versions.json``).

    A lineage is the name of the original bundle (e.g. ``breast-dce``); its versions are ``breast-dce-ft1``,
    ``-ft2``... The active version of a lineage is the one the widgets use for it; the original is active until a
    version is activated.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _read(self) -> dict[str, Any]:
        path = self.root / VERSIONS_FILE
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{path} is damaged ({error}); move it away to start a new version list") from error

    def _write(self, record: dict[str, Any]) -> None:
        """Replace ``versions.json`` atomically: a new file written durably, then renamed over the old one."""
        self.root.mkdir(parents=True, exist_ok=True)
        temporary = self.root / f".{VERSIONS_FILE}.{os.getpid()}.tmp"
        temporary.unlink(missing_ok=True)
        write_durably(temporary, json.dumps(record, indent=2).encode())
        os.replace(temporary, self.root / VERSIONS_FILE)
        fsync_directory(self.root)

    def new_folder(self, lineage: str) -> Path:
        """A folder name for the next version of ``lineage`` that does not exist yet."""
        number = 1
        while (self.root / f"{lineage}-ft{number}").exists():
            number += 1
        return self.root / f"{lineage}-ft{number}"

    def add(self, lineage: str, version: str, parent: str, *, activate: bool) -> None:
        """Record a new version (and make it active when ``activate``)."""
        record = self._read()
        entry = record.setdefault(lineage, {"active": lineage, "versions": []})
        entry["versions"].append(
            {"name": version, "parent": parent, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        )
        if activate:
            entry["active"] = version
        self._write(record)

    def versions(self, lineage: str) -> list[str]:
        """The lineage's original name then its versions, oldest first."""
        entry = self._read().get(lineage, {"versions": []})
        return [lineage] + [v["name"] for v in entry["versions"]]

    def active(self, lineage: str) -> str:
        """The active version of ``lineage`` (the original when none was activated)."""
        return self._read().get(lineage, {}).get("active", lineage)

    def activate(self, lineage: str, version: str) -> None:
        """Make ``version`` (or the original, ``lineage``) the active one."""
        if version not in self.versions(lineage):
            raise ValueError(f"{version!r} is not a version of {lineage!r}; versions: {self.versions(lineage)}")
        record = self._read()
        record.setdefault(lineage, {"active": lineage, "versions": []})["active"] = version
        self._write(record)
