"""The training engine: data sets of labelled cases, augmentation, loss, metrics, and the training loop with
validation, early stopping, checkpoints, resume, progress and cancellation.

No napari or Qt here; importing this package imports torch. Main entry points:

* :class:`Trainer` (``Trainer(model, card, train_cases, val_cases, config, output_dir)``,
  ``Trainer.from_bundle``, ``Trainer.resume``, ``train``, ``iter_train``) with :class:`TrainingConfig`,
  :class:`TrainingProgress` and :class:`TrainingResult`;
* cases: :class:`TrainingCase`, :class:`NnUNetRawDataset` (lazy) and :func:`load_nnunet_raw`;
* the pieces: :class:`SegmentationDataset`, :class:`Augmenter` with :class:`AugmentationConfig`,
  :class:`DiceCELoss`, :func:`dice_per_class`, :func:`hd95`, :func:`evaluate`; the moving average of the weights
  (``TrainingConfig.ema_decay``) in :mod:`.ema`;
* checkpoints: :func:`write_checkpoint`, :func:`read_trainer_state` (format in :mod:`.checkpoint`).
"""

from napari_mamba_seg.training.augmentation import AugmentationConfig, AugmentationParams, Augmenter
from napari_mamba_seg.training.cases import NnUNetRawDataset, TrainingCase, load_nnunet_raw
from napari_mamba_seg.training.checkpoint import read_trainer_state, recover_checkpoint, write_checkpoint
from napari_mamba_seg.training.dataset import SegmentationDataset, slice_axis_for
from napari_mamba_seg.training.evaluation import CaseEvaluation, EvaluationResult, evaluate, iter_evaluate
from napari_mamba_seg.training.losses import DiceCELoss
from napari_mamba_seg.training.metrics import confusion_matrix, dice_per_class, hd95, surface_distances
from napari_mamba_seg.training.trainer import (
    BEST,
    LAST,
    Trainer,
    TrainingConfig,
    TrainingProgress,
    TrainingResult,
    WarmupCosineSchedule,
    cpu_training_flags,
)

__all__ = [
    "BEST",
    "LAST",
    "AugmentationConfig",
    "AugmentationParams",
    "Augmenter",
    "CaseEvaluation",
    "DiceCELoss",
    "EvaluationResult",
    "NnUNetRawDataset",
    "SegmentationDataset",
    "Trainer",
    "TrainingCase",
    "TrainingConfig",
    "TrainingProgress",
    "TrainingResult",
    "WarmupCosineSchedule",
    "confusion_matrix",
    "cpu_training_flags",
    "dice_per_class",
    "evaluate",
    "hd95",
    "iter_evaluate",
    "load_nnunet_raw",
    "read_trainer_state",
    "recover_checkpoint",
    "slice_axis_for",
    "surface_distances",
    "write_checkpoint",
]
