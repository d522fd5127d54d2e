"""Evaluate a predictor on labelled cases: per-case and mean per-class Dice (and HD95), as validation and the
``evaluate`` command report them.

Untrusted voxels (``TrainingCase.trusted == False``) are left out of the Dice counts. HD95 uses the whole masks (a
surface distance has no meaning on a partial mask), so it is reported only for fully trusted cases.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_mamba_seg._generators import CancelSignal, cancel_predicate, run_to_end
from napari_mamba_seg.inference import Predictor
from napari_mamba_seg.training.cases import TrainingCase
from napari_mamba_seg.training.metrics import dice_per_class, hd95

__all__ = ["CaseEvaluation", "EvaluationResult", "evaluate", "iter_evaluate", "summarize"]

MEAN_DICE = "mean_dice"
"""Key of the mean foreground Dice: the mean over the foreground classes of their Dice averaged over the cases."""


@dataclass
class CaseEvaluation:
    """The metrics of one case.

    Attributes:
        name: The case name.
        dice: ``(num_classes,)`` per-class Dice, background first (``nan``: class absent from both).
        hd95: ``(num_classes,)`` per-class HD95 in mm (``nan`` for background, for classes absent from both, and for
            partially trusted cases; ``inf`` when the class is in only one of them), or None when not computed.
    """

    name: str
    dice: np.ndarray
    hd95: np.ndarray | None = None


@dataclass
class EvaluationResult:
    """Per-case metrics and their summary.

    Attributes:
        cases: One :class:`CaseEvaluation` per case.
        metrics: The summary of :func:`summarize`: ``dice_<class>`` (and ``hd95_<class>``) averaged over the cases,
            and ``mean_dice``.
        class_names: One name per class, background first.
    """

    cases: list[CaseEvaluation] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)


def iter_evaluate(
    predictor: Predictor,
    cases: Iterable[TrainingCase],
    *,
    compute_hd95: bool = False,
    cancel: CancelSignal = None,
) -> Generator[CaseEvaluation, None, EvaluationResult | None]:
    """Predict every case and yield its metrics; return the :class:`EvaluationResult` (None when cancelled).

    Args:
        predictor: Runs the model as its card says (normalisation, slicing, tiles, device).
        cases: Labelled cases (a lazy sequence is read one case at a time).
        compute_hd95: Also compute the per-class HD95 (slower: distance transforms).
        cancel: None, a ``threading.Event`` or a callable returning True to stop; checked before every case.
    """
    is_cancelled = cancel_predicate(cancel)
    num_classes = predictor.num_classes
    results = []
    for case in cases:
        if is_cancelled():
            return None
        prediction = predictor.predict(case.image, case.spacing)
        results.append(case_metrics(prediction.labels, case, num_classes, compute_hd95=compute_hd95))
        yield results[-1]
    return EvaluationResult(results, summarize(results, predictor.class_names), predictor.class_names)


def evaluate(
    predictor: Predictor,
    cases: Iterable[TrainingCase],
    *,
    compute_hd95: bool = False,
    progress: Callable[[CaseEvaluation], None] | None = None,
) -> EvaluationResult:
    """:func:`iter_evaluate` run to the end; ``progress`` is called with every case's metrics."""
    return run_to_end(iter_evaluate(predictor, cases, compute_hd95=compute_hd95), progress)


def case_metrics(
    prediction: np.ndarray, case: TrainingCase, num_classes: int, *, compute_hd95: bool = False
) -> CaseEvaluation:
    """The metrics of one predicted label map against a case's labels (untrusted voxels left out of the Dice)."""
    ignore = None if case.trusted is None else ~case.trusted
    dice = dice_per_class(prediction, case.labels, num_classes, ignore=ignore)
    distances = None
    if compute_hd95:
        distances = np.full(num_classes, np.nan)
        if case.trusted is None or case.trusted.all():
            for k in range(1, num_classes):
                distances[k] = hd95(prediction == k, case.labels == k, case.spacing)
    return CaseEvaluation(case.name, dice, distances)


def summarize(results: Sequence[CaseEvaluation], class_names: Sequence[str]) -> dict[str, float]:
    """Metrics averaged over the cases (``nan`` values skipped, infinite HD95 kept).

    Returns:
        ``dice_<class>`` for every foreground class, ``mean_dice`` (their mean), and ``hd95_<class>`` when HD95 was
        computed; ``nan`` where no case defines the value.
    """
    metrics: dict[str, float] = {}
    if not results:
        return metrics
    dice = np.stack([r.dice for r in results])
    foreground = [_nanmean(dice[:, k]) for k in range(1, dice.shape[1])]
    for name, value in zip(class_names[1:], foreground, strict=False):
        metrics[f"dice_{name}"] = value
    metrics[MEAN_DICE] = _nanmean(np.asarray(foreground)) if foreground else _nanmean(dice[:, 0])
    if all(r.hd95 is not None for r in results):
        distances = np.stack([r.hd95 for r in results])
        for k, name in enumerate(class_names[1:], start=1):
            metrics[f"hd95_{name}"] = _nanmean(distances[:, k])
    return metrics


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or np.all(np.isnan(values)):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values))


def json_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` without its ``nan`` and infinite values (standard JSON has neither; a card must be valid JSON)."""
    return {key: value for key, value in metrics.items() if not (isinstance(value, float) and not np.isfinite(value))}
