"""The training loop: random patches, Dice + cross-entropy over the trusted voxels, AdamW with warm-up and a cosine
schedule, mixed precision on GPU, validation with per-class Dice, early stopping, checkpoints as model bundles,
resume, progress by generator or callback, and cancellation.

Example:
    >>> trainer = Trainer(create_model("vm_unet", in_channels=3, num_classes=4), card, train_cases, val_cases,
    ...                   TrainingConfig(steps=20_000, batch_size=8, patch_size=(256, 256)), output_dir="runs/v1")
    >>> result = trainer.train(progress=print)
    >>> result.best_bundle          # runs/v1/best: load_bundle / Predictor.from_bundle it
    >>> Trainer.resume("runs/v1", train_cases, val_cases).train()  # after an interruption

Determinism and resume: everything random in step ``s`` comes from ``(seed, s)``: the samples of the global batch
(``SegmentationDataset[s * batch_size + i]``) and torch's global RNG during the step (reseeded from ``(seed, s)``
inside ``torch.random.fork_rng``, for dropout and stochastic depth). No RNG state has to be saved, and a run
resumed at step ``s`` (or run with another number of data-loading workers) draws exactly the batches of an
uninterrupted one. The learning rate is a function of the global step too.

Data-parallel (several processes, torchrun): a trainer built inside
:func:`napari_mamba_seg.training.distributed.init_distributed` trains as one rank of the group: it draws its share
of each global batch, its loss is the loss of the whole global batch, DDP averages the gradients, the validation
cases are split between the ranks, every rank stops (cancel, early stopping) at the same step, and rank 0 alone
writes checkpoints. The update equals the single-process update up to float32 summation order, and a checkpoint
resumes with any number of processes (see that module).

On the CPU each step and each validation runs with oneDNN (``torch.backends.mkldnn``) off unless
``TrainingConfig.cpu_onednn`` is set. Why: with torch 2.13 a oneDNN convolution backward spins for more than 10
minutes in some models (tests/conftest.py), a oneDNN backward of test_umamba_enc crashed the process (double free)
when numba ran single-threaded, and tiny models run slower with it (test_umamba_enc, 32² patches: 0.39 s per step
with oneDNN, 0.04 s without). The price, measured on 2 shared cores (1 torch thread, ``OMP_WAIT_POLICY=PASSIVE``,
batch 2 of 128², forward + backward): unet 1.0 s with oneDNN vs 1.4 s without, vm_unet 1.3 vs 2.0 s, umamba_enc 2.1
vs 3.0 s: full-size models train 1.4-1.5 times faster on the CPU with oneDNN. Training must not hang, so it is off by
default; GPU training is unaffected. The flag is set around each step and each validation case only, never across a
``yield``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_mamba_seg._generators import CancelSignal, cancel_predicate, run_to_end
from napari_mamba_seg.bundles import CARD_FILE, ModelCard, load_bundle
from napari_mamba_seg.inference import PredictionSettings, Predictor
from napari_mamba_seg.inference.device import PRECISIONS, resolve_precision
from napari_mamba_seg.inference.device import autocast as autocast_context
from napari_mamba_seg.inference.normalization import check_normalization
from napari_mamba_seg.inference.predictor import check_card
from napari_mamba_seg.models import SegmentationModel, get_model_entry
from napari_mamba_seg.training.augmentation import AugmentationConfig, Augmenter
from napari_mamba_seg.training.cases import TrainingCase, case_names
from napari_mamba_seg.training.checkpoint import (
    optimizer_state_from_files,
    optimizer_state_to_files,
    read_trainer_state,
    recover_checkpoint,
    write_checkpoint,
)
from napari_mamba_seg.training.dataset import SegmentationDataset
from napari_mamba_seg.training.distributed import (
    GlobalBatchSampler,
    agreed_predicate,
    check_global_batch,
    current_context,
    gather_indexed,
    global_sum,
    is_main_process,
    split_indices,
    sync_buffers,
    training_device,
    wrap_model,
)
from napari_mamba_seg.training.ema import ema_decay_at, make_ema_model, update_ema
from napari_mamba_seg.training.evaluation import (
    MEAN_DICE,
    case_metrics,
    json_metrics,
    summarize,
)
from napari_mamba_seg.training.losses import DiceCELoss

__all__ = [
    "BEST",
    "LAST",
    "Trainer",
    "TrainingConfig",
    "TrainingProgress",
    "TrainingResult",
    "WarmupCosineSchedule",
    "card_patch_size",
    "cpu_training_flags",
]

LAST = "last"
"""Sub-folder of the output folder holding the latest checkpoint (bundle + trainer state)."""
BEST = "best"
"""Sub-folder holding the bundle with the best validation ``mean_dice``."""
DEFAULT_PATCH_2D = (256, 256)
DEFAULT_PATCH_3D = (64, 128, 128)
_TRAINING_MODEL_PREFIX = "training_model."


@dataclass
class TrainingConfig:
    """How to train (saved in every checkpoint's ``trainer_state.json``).

    Attributes:
        steps: Total optimizer steps (global: independent of the number of processes).
        batch_size: Patches per step (the global batch).
        patch_size: Patch size in voxels (2 values for a 2D model, 3 for a 3D model); None = the card's patch size,
            else 256×256 (2D) or 64×128×128 (3D).
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW's decoupled weight decay.
        warmup_steps: Linear warm-up from ``lr / warmup_steps`` to ``lr``; then a cosine decay to 0 at ``steps``.
        val_every: Validate every this many steps (and after the last); 0 = only after the last.
        early_stopping_patience: Stop after this many validations in a row without an improvement of the mean
            foreground Dice by more than ``early_stopping_min_delta``; None = never stop early.
        early_stopping_min_delta: The improvement that counts.
        checkpoint_every: Write ``<output_dir>/last`` every this many steps (and at the end); 0 = only at the end.
        grad_clip: Clip the gradient norm to this value; None = no clipping.
        seed: Seed of every random choice (patches, augmentation, dropout).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        precision: ``"auto"`` (bf16 autocast on CUDA, fp16 with a gradient scaler where bf16 is unsupported; fp32
            elsewhere), ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA only).
        num_workers: Data-loading worker processes (0 = sample in the training process).
        foreground_fraction: Share of patches centred on a foreground voxel.
        slice_axis: Slice axis of 2D models on volumes: ``"auto"`` (the coarsest spacing, as inference) or 0, 1, 2.
        dice_weight: Weight of the Dice term of the loss.
        ce_weight: Weight of the cross-entropy term.
        batch_dice: Dice over the whole batch (nnU-Net) instead of per patch.
        validation_overlap: Tile overlap of the sliding-window validation.
        cpu_onednn: Leave oneDNN as the process has it (on, unless turned off) for CPU training: 1.4-1.5 times faster
            for full-size models, but a oneDNN backward hangs or crashes in some models with torch 2.13 (see the
            module docstring). False (the default) turns it off during training.
        augmentation: The augmentation settings.
        cache_size: Lazily read training cases (an ``NnUNetRawDataset``): how many prepared (read, normalised) cases
            each data-loading process keeps in memory, the least recently drawn dropped first; None = all of them.
            Changes the speed, never the batches. In-memory case lists are prepared once whatever this says.
        ema_decay: Keep an exponential moving average of the weights with this decay (e.g. 0.999) and validate,
            save and return the averaged model (:func:`ema_decay_at` gives the decay of each step); None = no
            average: the last step's weights are the model. Measured on the sarcoma data at CPU scale
            (BENCHMARKS.md): it helps early in a run, while the weights still move fast, and gave no gain at its end.
    """

    steps: int = 1000
    batch_size: int = 2
    patch_size: tuple[int, ...] | None = None
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    val_every: int = 250
    early_stopping_patience: int | None = None
    early_stopping_min_delta: float = 0.0
    checkpoint_every: int = 250
    grad_clip: float | None = 12.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    num_workers: int = 0
    foreground_fraction: float = 1 / 3
    slice_axis: int | str = "auto"
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    batch_dice: bool = False
    validation_overlap: float = 0.5
    cpu_onednn: bool = False
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    cache_size: int | None = None
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        """Check the values (a dict from JSON becomes an :class:`AugmentationConfig`, lists become tuples)."""
        if isinstance(self.augmentation, dict):
            self.augmentation = AugmentationConfig.from_dict(self.augmentation)
        if self.patch_size is not None:
            self.patch_size = tuple(int(p) for p in self.patch_size)
        checks = [
            (_is_int(self.steps) and self.steps >= 1, "steps must be an integer >= 1"),
            (_is_int(self.batch_size) and self.batch_size >= 1, "batch_size must be an integer >= 1"),
            (
                self.patch_size is None or (len(self.patch_size) in (2, 3) and min(self.patch_size) >= 1),
                "patch_size must be None or 2 or 3 positive sizes",
            ),
            (self.lr > 0 and math.isfinite(self.lr), "lr must be a positive number"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (
                _is_int(self.warmup_steps) and 0 <= self.warmup_steps <= self.steps,
                "warmup_steps must lie in [0, steps]",
            ),
            (_is_int(self.val_every) and self.val_every >= 0, "val_every must be an integer >= 0"),
            (
                self.early_stopping_patience is None
                or (_is_int(self.early_stopping_patience) and self.early_stopping_patience >= 1),
                "early_stopping_patience must be None or an integer >= 1",
            ),
            (_is_int(self.checkpoint_every) and self.checkpoint_every >= 0, "checkpoint_every must be an integer >= 0"),
            (self.grad_clip is None or self.grad_clip > 0, "grad_clip must be None or > 0"),
            (_is_int(self.seed) and self.seed >= 0, "seed must be an integer >= 0"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (_is_int(self.num_workers) and self.num_workers >= 0, "num_workers must be an integer >= 0"),
            (0 <= self.foreground_fraction <= 1, "foreground_fraction must lie in [0, 1]"),
            (0 <= self.validation_overlap < 1, "validation_overlap must lie in [0, 1)"),
            (
                self.cache_size is None or (_is_int(self.cache_size) and self.cache_size >= 1),
                "cache_size must be None or an integer >= 1",
            ),
            (
                self.ema_decay is None or (isinstance(self.ema_decay, int | float) and 0 < self.ema_decay < 1),
                "ema_decay must be None or a number in (0, 1), e.g. 0.999",
            ),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ValueError(f"invalid TrainingConfig: {'; '.join(problems)}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples as lists)."""
        return json_ready(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingConfig:
        """Rebuild from :meth:`to_dict` output; ValueError for unknown keys."""
        known = {item.name for item in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainingConfig field(s) {unknown}; valid: {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True)
class TrainingProgress:
    """One progress report of :meth:`Trainer.iter_train`.

    Attributes:
        step: Global optimizer steps done.
        total_steps: The configured total.
        loss: The loss of this step (``"train"``), else None.
        lr: The learning rate of the last step.
        stage: ``"train"`` (after each step), ``"validate"`` (after each validation case, then once with the
            metrics) or ``"checkpoint"`` (after writing ``last`` or ``best``).
        metrics: At the end of a validation: ``dice_<class>`` per foreground class and ``mean_dice``; else empty.
        message: Human-readable, e.g. ``"step 120/1000  loss 0.4312  lr 9.8e-04"``.
    """

    step: int
    total_steps: int
    loss: float | None
    lr: float
    stage: str
    metrics: dict[str, float] = field(default_factory=dict)
    message: str = ""

    @property
    def fraction(self) -> float:
        """``step / total_steps`` in [0, 1]."""
        return min(1.0, self.step / self.total_steps) if self.total_steps else 1.0


@dataclass
class TrainingResult:
    """What a training run produced.

    Attributes:
        best_bundle: ``<output_dir>/best`` (the bundle with the best validation ``mean_dice``), or None without
            validation or output folder.
        last_checkpoint: ``<output_dir>/last`` as it is now (after a cancel: the last good one), or None.
        best_metrics: The validation metrics of the best step (with ``"step"``); empty without validation.
        history: One dict per validation or checkpoint: ``step``, ``lr``, ``train_loss`` (mean since the previous
            entry) and the validation metrics.
        steps_run: Optimizer steps run by this call.
        step: The global step reached.
        stopped_early: Early stopping ended the run.
        cancelled: ``cancel`` ended the run (no checkpoint was written for the steps after the last one).
        model: The trained model, on the training device: the weights validation scored, that is the moving
            average with ``TrainingConfig.ema_decay`` (in eval mode), else the last step's weights (in train mode).
    """

    best_bundle: Path | None
    last_checkpoint: Path | None
    best_metrics: dict[str, float]
    history: list[dict[str, Any]]
    steps_run: int
    step: int
    stopped_early: bool
    cancelled: bool
    model: nn.Module | None = field(default=None, repr=False)


@dataclass(frozen=True)
class WarmupCosineSchedule:
    """Learning rate of each global step: linear warm-up, then a half cosine from ``base_lr`` to 0 at ``total_steps``.

    Attributes:
        base_lr: The peak learning rate.
        total_steps: Steps of the whole run.
        warmup_steps: Steps of the warm-up.
    """

    base_lr: float
    total_steps: int
    warmup_steps: int = 0

    def lr_at(self, step: int) -> float:
        """The learning rate of the update from global step ``step`` to ``step + 1`` (0-based)."""
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "warmup_cosine", **dataclasses.asdict(self)}


@contextlib.contextmanager
def cpu_training_flags(device: torch.device, *, onednn: bool = False) -> Iterator[None]:
    """oneDNN off (unless ``onednn``) on the CPU for the duration (see the module docstring); nothing elsewhere.

    The flag is process-wide: do not hold this across a ``yield`` that other code resumes.
    """
    if device.type != "cpu" or onednn:
        yield
        return
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


class Trainer:
    """Trains a segmentation model on patches of labelled cases.

    Args:
        model: A registered architecture (``create_model``; or ``load_bundle(...).model``); moved to the device.
        card: Its card: class names, channel names, modality, normalisation (training normalises exactly as the
            predictor will), spacing and ``resample``; ``patch_size`` and ``metrics`` are filled in. None = a card
            with z-score normalisation and generic names.
        train_cases: Training cases: a list of :class:`TrainingCase` or a lazy sequence
            (:class:`~napari_mamba_seg.training.cases.NnUNetRawDataset`).
        val_cases: Validation cases (whole cases, predicted like inference does), or None for no validation.
        config: How to train; None = :class:`TrainingConfig` defaults.
        output_dir: Where ``last/`` and ``best/`` go; None = no checkpoints (the trained model is in the result).
        overwrite: Start a new run in an ``output_dir`` that holds one: its ``last/`` and ``best/`` are deleted now.
            Otherwise that is refused.
        voxel_weights: Loss weights per voxel, one ``(*spatial)`` array (or None = all 1) per training case, e.g.
            the voxels a clinician corrected weighted up; None = unweighted. Not saved in checkpoints
            (:meth:`resume` trains unweighted).

    Raises:
        ValueError: The model is not a registered architecture, a bad config or card, or a case that does not fit.
        FileExistsError: ``output_dir`` holds a training run and ``overwrite`` is False.
    """

    def __init__(
        self,
        model: nn.Module,
        card: ModelCard | None,
        train_cases: Sequence[TrainingCase],
        val_cases: Sequence[TrainingCase] | None = None,
        config: TrainingConfig | None = None,
        output_dir: str | os.PathLike[str] | None = None,
        *,
        overwrite: bool = False,
        voxel_weights: Sequence[np.ndarray | None] | None = None,
    ) -> None:
        output = None if output_dir is None else Path(output_dir)
        config = config or TrainingConfig()
        self._build(model, card, train_cases, val_cases, config, output, voxel_weights=voxel_weights)
        if output is not None:  # after every check passed: nothing is deleted for a run that cannot start
            _claim_output_dir(output, overwrite)

    # ---------------------------------------------------------------------------------------------- construction

    @classmethod
    def from_bundle(
        cls,
        source: str | os.PathLike[str],
        train_cases: Sequence[TrainingCase],
        val_cases: Sequence[TrainingCase] | None = None,
        config: TrainingConfig | None = None,
        output_dir: str | os.PathLike[str] | None = None,
        *,
        overwrite: bool = False,
        **card_changes: Any,
    ) -> Trainer:
        """A trainer that fine-tunes a saved bundle (a folder or the name of a bundled one).

        The checkpoints' cards record the parent bundle and its sha256 (:meth:`Bundle.fine_tuned_card`) and keep the
        parent's normalisation, spacing, class and channel names, so the fine-tuned model predicts like its parent.

        Args:
            source: The bundle to start from.
            train_cases: Training cases.
            val_cases: Validation cases, or None.
            config: How to train; None = defaults with the parent's patch size.
            output_dir: Where the checkpoints go, or None.
            overwrite: As for :class:`Trainer`.
            **card_changes: Card fields to change, e.g. ``description="fine-tuned on site B"``.
        """
        bundle = load_bundle(source)
        card_changes.setdefault("training_data", "")
        card = bundle.fine_tuned_card(**card_changes)
        return cls(bundle.model, card, train_cases, val_cases, config, output_dir, overwrite=overwrite)

    @classmethod
    def resume(
        cls,
        output_dir: str | os.PathLike[str],
        train_cases: Sequence[TrainingCase],
        val_cases: Sequence[TrainingCase] | None = None,
        *,
        check_cases: bool = True,
        **config_changes: Any,
    ) -> Trainer:
        """Continue the run saved in ``output_dir/last`` at its global step.

        The model, the optimizer (moments and step counts), the gradient scaler, the best metric, the early-stopping
        counter and the history are restored; the learning rate and the batches follow from the global step, so the
        run continues exactly as an uninterrupted one would.

        Args:
            output_dir: The output folder of the run.
            train_cases: The same training cases as the run used (data is never stored in checkpoints).
            val_cases: The same validation cases, or None.
            check_cases: Refuse cases whose names differ from the run's.
            **config_changes: :class:`TrainingConfig` fields to change, e.g. ``device="cuda"``, ``num_workers=4``, or
                ``steps=2000`` to train longer (which stretches the cosine schedule from here on).

        Raises:
            FileNotFoundError: No resumable checkpoint in ``output_dir``.
            ValueError: Damaged checkpoint, or (with ``check_cases``) other cases than the run's.
        """
        output = Path(output_dir)
        folder = recover_checkpoint(output / LAST)
        if folder is None:
            raise FileNotFoundError(
                f"{output} holds no checkpoint to resume ({LAST}/ with {CARD_FILE} and trainer_state.json); start a "
                "new run with Trainer(...) instead"
            )
        state, tensors = read_trainer_state(folder)
        if check_cases:
            _check_same_cases(state, train_cases, val_cases, folder)
        bundle = load_bundle(folder)
        config = TrainingConfig.from_dict({**state["config"], **config_changes})
        card = ModelCard.from_dict(state["base_card"], source=f"{folder}/trainer_state.json base_card")
        trainer = cls.__new__(cls)
        trainer._build(bundle.model, card, train_cases, val_cases, config, output)
        trainer._load_state(state, tensors)
        return trainer

    def _build(
        self,
        model: nn.Module,
        card: ModelCard | None,
        train_cases: Sequence[TrainingCase],
        val_cases: Sequence[TrainingCase] | None,
        config: TrainingConfig,
        output_dir: Path | None,
        *,
        voxel_weights: Sequence[np.ndarray | None] | None = None,
    ) -> None:
        _check_model(model)
        self.model: SegmentationModel = model
        self.config = config
        self.output_dir = output_dir
        self.patch_size = _patch_size(config, card, model.spatial_dims)
        self.card = _training_card(card or ModelCard(), model, self.patch_size, train_cases, val_cases, config)
        self.distributed = current_context()  # data-parallel when built inside init_distributed (torchrun)
        if self.distributed is not None:
            check_global_batch(config.batch_size, self.distributed.world_size)
        self.device = training_device(config.device)
        self.precision = resolve_precision(config.precision, self.device)
        if self.precision == "fp16" and self.device.type != "cuda":
            raise ValueError(f"precision 'fp16' needs a CUDA device (got {self.device}); use 'bf16' or 'fp32'")
        self.model.to(self.device).train()
        # the module a training step calls: the model, or DDP around it (same parameters) when data-parallel, made at
        # the first step: wrapping is a collective, and the ranks build their trainers one after the other
        self._step_model: nn.Module | None = self.model if self.distributed is None else None
        # the moving average of the weights (TrainingConfig.ema_decay): what validation scores and checkpoints save
        self.ema_model: nn.Module | None = None if config.ema_decay is None else make_ema_model(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.schedule = WarmupCosineSchedule(config.lr, config.steps, config.warmup_steps)
        self.loss_fn = DiceCELoss(
            dice_weight=config.dice_weight,
            ce_weight=config.ce_weight,
            batch_dice=config.batch_dice,
            sum_across_processes=None if self.distributed is None else partial(global_sum, context=self.distributed),
        )
        self.dataset = SegmentationDataset(
            train_cases,
            self.patch_size,
            spatial_dims=model.spatial_dims,
            in_channels=model.in_channels,
            num_classes=model.num_classes,
            normalization=self.card.normalization,
            foreground_fraction=config.foreground_fraction,
            slice_axis=config.slice_axis,
            target_spacing=self.card.spacing if self.card.resample else None,
            augmenter=Augmenter(config.augmentation),
            seed=config.seed,
            voxel_weights=voxel_weights,
            cache_size=config.cache_size,
        )
        self.train_cases = train_cases
        self.val_cases = val_cases if val_cases is not None and len(val_cases) > 0 else None
        if isinstance(self.val_cases, list | tuple):
            for case in self.val_cases:
                self.dataset._check_case(case)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best_metrics: dict[str, float] = {}
        self.last_metrics: dict[str, float] = {}
        self.validations_without_improvement = 0
        self._loss_sum, self._loss_count = 0.0, 0
        self._lr = self.schedule.lr_at(0)

    # --------------------------------------------------------------------------------------------------- training

    def train(
        self, *, progress: Callable[[TrainingProgress], None] | None = None, cancel: CancelSignal = None
    ) -> TrainingResult:
        """Train to the end (or early stop, or cancel); ``progress`` is called with every :class:`TrainingProgress`.

        Args:
            progress: Called after every step, validation case and checkpoint; it may set ``cancel``.
            cancel: None, a ``threading.Event`` or a callable returning True to stop. Checked before every step and
                validation case; the run then stops without writing a checkpoint, so ``last/`` stays the last good
                one.

        Returns:
            The :class:`TrainingResult`.
        """
        return run_to_end(self.iter_train(cancel=cancel), progress)

    def iter_train(self, *, cancel: CancelSignal = None) -> Generator[TrainingProgress, None, TrainingResult]:
        """Train step by step: yields :class:`TrainingProgress`, returns the :class:`TrainingResult`.

        Same behaviour as :meth:`train`. Closing the generator stops the run like a cancel: no checkpoint is left
        half-written, and no torch state (autocast, oneDNN flag) is held while it is suspended.
        """
        is_cancelled = cancel_predicate(cancel)
        stop_requested = agreed_predicate(is_cancelled, self.distributed)  # data-parallel: every rank stops together
        start = self.step
        stopped_early = cancelled = False
        batches = self._batches(start)
        try:
            while self.step < self.config.steps:
                if stop_requested():
                    cancelled = True
                    break
                loss = self.train_step(next(batches))
                yield self._progress("train", loss)
                if stop_requested():
                    cancelled = True
                    break
                validated = False
                if self._validation_due():
                    metrics = yield from self._validate(is_cancelled)
                    if metrics is None:
                        cancelled = True
                        break
                    validated = True
                    improved = self._record_validation(metrics)
                    yield self._progress("validate", metrics=metrics, message=_metrics_message(self.step, metrics))
                    if improved and self.output_dir is not None:
                        yield self._write_best()
                    stopped_early = self._patience_exhausted()
                if validated or self._checkpoint_due(stopped_early):
                    self._add_history_entry(self.last_metrics if validated else {})
                if self.output_dir is not None and self._checkpoint_due(stopped_early):
                    yield self._write_last()
                if stopped_early:
                    break
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        return self._result(start, stopped_early, cancelled)

    def _batches(self, start_step: int) -> Iterator[dict[str, Any]]:
        """The local batches of the global steps ``start_step ...``: samples ``step * batch_size + i``, of which a
        data-parallel rank draws only its share (:func:`~napari_mamba_seg.training.distributed.rank_slice`)."""
        context = self.distributed
        steps = GlobalBatchSampler(
            start_step,
            self.config.steps,
            self.config.batch_size,
            rank=0 if context is None else context.rank,
            world_size=1 if context is None else context.world_size,
        )
        if self.config.num_workers == 0:
            return (torch.utils.data.default_collate([self.dataset[i] for i in indices]) for indices in steps)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=steps,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        return iter(loader)

    def train_step(self, batch: dict[str, Any]) -> float:
        """One optimizer step on ``batch`` at the current global step, which it then advances.

        :meth:`iter_train` calls this for every step; call it directly only for custom loops and tests.

        Args:
            batch: ``{"image": (b, C, *patch) float32, "labels": (b, *patch) int64, "trusted": (b, *patch) bool}``
                and optionally ``"weight": (b, *patch)`` float32 voxel weights of the loss (see :class:`DiceCELoss`),
                e.g. ``torch.utils.data.default_collate([trainer.dataset[i] for i in ...])``; any device.

        Returns:
            The loss before the update.

        Raises:
            FloatingPointError: The loss is NaN or infinite (the weights are not updated).
        """
        self.model.train()
        if self._step_model is None:  # data-parallel: every rank wraps the model at its first step
            self._step_model = wrap_model(self.model, self.distributed)
        lr = self.schedule.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        image = batch["image"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        trusted = batch["trusted"].to(self.device, non_blocking=True)
        weight = batch.get("weight")
        weight = None if weight is None else weight.to(self.device, non_blocking=True)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []  # the CPU RNG is always forked
        with (
            torch.random.fork_rng(devices=devices, device_type="cuda"),
            cpu_training_flags(self.device, onednn=self.config.cpu_onednn),
        ):
            rank = 0 if self.distributed is None else self.distributed.rank
            torch.manual_seed(step_seed(self.config.seed, self.step, rank))
            with autocast_context(self.device, self.precision):
                logits = self._step_model(image)
            loss = self.loss_fn(logits.float(), labels, trusted, weight)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the loss is {loss.item()} at step {self.step + 1}: training diverged. Lower the learning rate "
                    f"(lr={self.config.lr}), set grad_clip, or use precision='fp32'; resume from the last checkpoint."
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.config.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.step += 1
        if self.ema_model is not None:
            update_ema(self.ema_model, self.model, ema_decay_at(self.config.ema_decay, self.step))
        self._lr = lr
        value = float(loss.detach())
        self._loss_sum += value
        self._loss_count += 1
        return value

    @property
    def evaluation_model(self) -> nn.Module:
        """The model validation scores and checkpoints save: the moving average of the weights with
        ``TrainingConfig.ema_decay``, else the model being trained."""
        return self.model if self.ema_model is None else self.ema_model

    # ------------------------------------------------------------------------------------------------- validation

    def validate(self, *, cancel: CancelSignal = None) -> dict[str, float] | None:
        """Validate the current model on the validation cases now; the metrics, or None when cancelled.

        Raises:
            ValueError: No validation cases.
        """
        if self.val_cases is None:
            raise ValueError("no validation cases: pass val_cases to the Trainer")
        steps = self._validate(cancel_predicate(cancel))
        while True:
            try:
                next(steps)
            except StopIteration as finished:
                return finished.value

    def _validate(self, is_cancelled: Callable[[], bool]) -> Generator[TrainingProgress, None, dict[str, float] | None]:
        """Predict every validation case as inference does; Dice per class over the cases (None: cancelled)."""
        settings = PredictionSettings(
            device=str(self.device),
            precision=self.precision,
            axis=self.config.slice_axis,
            overlap=self.config.validation_overlap,
        )
        model = self.evaluation_model
        predictor = Predictor(model, self.card, settings)
        total = len(self.val_cases)
        results = []
        cancelled = False
        sync_buffers(model, self.distributed)  # data-parallel: all ranks validate rank 0's model (BatchNorm)
        try:
            for index in split_indices(total, self.distributed):  # data-parallel: this rank's share of the cases
                if is_cancelled():
                    cancelled = True
                    break
                case = self.val_cases[index]
                with cpu_training_flags(self.device, onednn=self.config.cpu_onednn):
                    prediction = predictor.predict(case.image, case.spacing)
                results.append((index, case_metrics(prediction.labels, case, model.num_classes)))
                yield self._progress("validate", message=f"validation case {index + 1}/{total} ({case.name})")
        finally:
            self.model.train()
            if self.ema_model is not None:
                self.ema_model.eval()
        results, cancelled = gather_indexed(results, cancelled, self.distributed)  # every rank: all cases, in order
        return None if cancelled else summarize(results, self.card.class_names)

    def _validation_due(self) -> bool:
        if self.val_cases is None:
            return False
        every = self.config.val_every
        return self.step == self.config.steps or (every > 0 and self.step % every == 0)

    def _record_validation(self, metrics: dict[str, float]) -> bool:
        """Update the best metrics and the early-stopping counter; whether this validation is the best so far."""
        self.last_metrics = {**metrics, "step": self.step}
        value = metrics.get(MEAN_DICE, float("nan"))
        best = self.best_metrics.get(MEAN_DICE)
        improved = math.isfinite(value) and (best is None or value > best + self.config.early_stopping_min_delta)
        if improved:
            self.best_metrics = dict(self.last_metrics)
            self.validations_without_improvement = 0
        else:
            self.validations_without_improvement += 1
        return improved

    def _patience_exhausted(self) -> bool:
        patience = self.config.early_stopping_patience
        return patience is not None and self.validations_without_improvement >= patience

    # ------------------------------------------------------------------------------------------------ checkpoints

    def _checkpoint_due(self, stopped_early: bool) -> bool:
        every = self.config.checkpoint_every
        return stopped_early or self.step == self.config.steps or (every > 0 and self.step % every == 0)

    def _write_last(self) -> TrainingProgress:
        if not is_main_process(self.distributed):  # data-parallel: rank 0 writes
            return self._progress("checkpoint", message=f"step {self.step}: checkpoint left to process 0")
        validated_now = self.last_metrics.get("step") == self.step
        metrics = dict(self.last_metrics) if validated_now else {}
        if self.history and self.history[-1]["step"] == self.step:
            metrics["train_loss"] = self.history[-1]["train_loss"]
        metrics["step"] = self.step
        card = dataclasses.replace(self.card, metrics=json_metrics(metrics))
        state, tensors = self._state()
        folder = write_checkpoint(self.output_dir / LAST, self.evaluation_model, card, state, tensors)
        return self._progress("checkpoint", message=f"step {self.step}: checkpoint written to {folder}")

    def _write_best(self) -> TrainingProgress:
        if not is_main_process(self.distributed):  # data-parallel: rank 0 writes
            return self._progress("checkpoint", message=f"step {self.step}: best bundle left to process 0")
        card = dataclasses.replace(self.card, metrics=json_metrics(self.best_metrics))
        folder = write_checkpoint(self.output_dir / BEST, self.evaluation_model, card)
        value = self.best_metrics.get(MEAN_DICE, float("nan"))
        return self._progress("checkpoint", message=f"step {self.step}: best mean Dice {value:.4f}, saved to {folder}")

    def _state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The trainer state for ``trainer_state.json`` and its tensors for ``trainer_state.safetensors``.

        With a moving average the bundle holds the average, and the trained weights go into the tensors
        (``training_model.<name>``), so that a resumed run continues both.
        """
        optimizer_json, tensors = optimizer_state_to_files(self.optimizer)
        if self.ema_model is not None:
            tensors |= {f"{_TRAINING_MODEL_PREFIX}{k}": v for k, v in self.model.state_dict().items()}
        state = {
            "step": self.step,
            "processes": 1 if self.distributed is None else self.distributed.world_size,  # information only
            "config": self.config.to_dict(),
            "schedule": self.schedule.to_dict(),
            "optimizer": optimizer_json,
            "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": {
                "scheme": "per-step",
                "seed": self.config.seed,
                "note": "samples and torch's RNG in step s are seeded from (seed, s); no RNG state is needed",
            },
            "best_metrics": json_ready(self.best_metrics),
            "last_metrics": json_ready(self.last_metrics),
            "validations_without_improvement": self.validations_without_improvement,
            "history": json_ready(self.history),
            "loss_window": {"sum": self._loss_sum, "count": self._loss_count},
            "base_card": self.card.to_dict(),
            "train_cases": case_names(self.train_cases),
            "val_cases": case_names(self.val_cases) if self.val_cases is not None else [],
        }
        return state, tensors

    def _load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`_state` saved."""
        self.step = int(state["step"])
        trained = {
            k[len(_TRAINING_MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_TRAINING_MODEL_PREFIX)
        }
        if trained:  # the run kept an average: the bundle's weights are the average, these the trained weights
            self.model.load_state_dict(trained)
        self.optimizer.load_state_dict(optimizer_state_from_files(state["optimizer"], tensors))
        if state.get("grad_scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["grad_scaler"])
        self.best_metrics = _floats(state.get("best_metrics", {}))
        self.last_metrics = _floats(state.get("last_metrics", {}))
        self.validations_without_improvement = int(state.get("validations_without_improvement", 0))
        self.history = [_floats(entry) for entry in state.get("history", [])]
        window = state.get("loss_window", {})
        self._loss_sum, self._loss_count = float(window.get("sum", 0.0)), int(window.get("count", 0))
        self._lr = self.schedule.lr_at(max(0, self.step - 1))

    # ---------------------------------------------------------------------------------------------------- helpers

    def _add_history_entry(self, metrics: dict[str, float]) -> None:
        mean_loss = self._loss_sum / self._loss_count if self._loss_count else float("nan")
        self.history.append(
            {**metrics, "step": self.step, "lr": self._lr, "train_loss": mean_loss, "time": time.time()}
        )
        self._loss_sum, self._loss_count = 0.0, 0

    def _progress(
        self, stage: str, loss: float | None = None, *, metrics: dict[str, float] | None = None, message: str = ""
    ) -> TrainingProgress:
        if not message and loss is not None:
            message = f"step {self.step}/{self.config.steps}  loss {loss:.4f}  lr {self._lr:.2e}"
        return TrainingProgress(self.step, self.config.steps, loss, self._lr, stage, dict(metrics or {}), message)

    def _result(self, start: int, stopped_early: bool, cancelled: bool) -> TrainingResult:
        best = last = None
        if self.output_dir is not None:
            best = self.output_dir / BEST if (self.output_dir / BEST / CARD_FILE).is_file() else None
            last = self.output_dir / LAST if (self.output_dir / LAST / CARD_FILE).is_file() else None
        return TrainingResult(
            best_bundle=best,
            last_checkpoint=last,
            best_metrics=dict(self.best_metrics),
            history=list(self.history),
            steps_run=self.step - start,
            step=self.step,
            stopped_early=stopped_early,
            cancelled=cancelled,
            model=self.evaluation_model,
        )


# ------------------------------------------------------------------------------------------------------ functions


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of torch's RNG during global step ``step`` (a 63-bit integer derived from ``(seed, step)``), on
    data-parallel rank ``rank`` (ranks > 0 get their own stream, so their dropout masks differ from rank 0's)."""
    entropy = [seed, step, 0x7EA1] if rank == 0 else [seed, step, 0x7EA1, rank]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def json_ready(value: Any) -> Any:
    """``value`` with tuples as lists and non-finite floats as None (valid JSON)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _floats(values: dict[str, Any]) -> dict[str, Any]:
    """A JSON dict with None values back as ``nan``."""
    return {key: float("nan") if value is None else value for key, value in values.items()}


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _metrics_message(step: int, metrics: dict[str, float]) -> str:
    parts = [f"{key} {value:.4f}" for key, value in metrics.items()]
    return f"step {step}: validation " + ", ".join(parts)


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, SegmentationModel):
        raise TypeError(
            f"Trainer needs a SegmentationModel from create_model or load_bundle, got {type(model).__name__}"
        )
    try:
        get_model_entry(str(getattr(model, "model_name", "")))
    except ValueError as error:
        raise ValueError(
            f"the model's model_name {getattr(model, 'model_name', None)!r} is not a registered architecture, so its "
            f"checkpoints could not be loaded again; build it with napari_mamba_seg.models.create_model. {error}"
        ) from None


def card_patch_size(card: ModelCard | None, spatial_dims: int) -> tuple[int, ...]:
    """The card's patch size, or the default for a ``spatial_dims``-D model when the card has none."""
    if card is not None and card.patch_size:
        return tuple(card.patch_size)
    return DEFAULT_PATCH_2D if spatial_dims == 2 else DEFAULT_PATCH_3D


def _patch_size(config: TrainingConfig, card: ModelCard | None, spatial_dims: int) -> tuple[int, ...]:
    patch = config.patch_size or card_patch_size(card, spatial_dims)
    if len(patch) != spatial_dims:
        raise ValueError(f"patch_size {tuple(patch)} must have {spatial_dims} values for a {spatial_dims}D model")
    return tuple(int(p) for p in patch)


def _training_card(
    card: ModelCard,
    model: SegmentationModel,
    patch_size: tuple[int, ...],
    train_cases: Sequence[TrainingCase],
    val_cases: Sequence[TrainingCase] | None,
    config: TrainingConfig,
) -> ModelCard:
    """The card the checkpoints get: checked against the model, patch size and training data filled in."""
    check_normalization(card.normalization)
    check_card(card, model)
    class_names = card.class_names or ["background", *(f"class_{i}" for i in range(1, model.num_classes))]
    training_data = card.training_data or _describe_data(train_cases, val_cases, patch_size, config)
    return dataclasses.replace(
        card,
        patch_size=list(patch_size),
        class_names=class_names,
        training_data=training_data,
        metrics={},
        sha256="",
        created="",
        created_with="",
    )


def _describe_data(
    train_cases: Sequence[TrainingCase],
    val_cases: Sequence[TrainingCase] | None,
    patch_size: tuple[int, ...],
    config: TrainingConfig,
) -> str:
    names = case_names(train_cases)
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    folder = getattr(train_cases, "folder", None)
    source = f" from {folder}" if folder is not None else ""
    validation = f"; {len(val_cases)} validation case(s)" if val_cases else "; no validation cases"
    return (
        f"{len(names)} training case(s){source} ({shown}){validation}; patches {'×'.join(map(str, patch_size))}, "
        f"{config.steps} steps of batch {config.batch_size}, seed {config.seed}"
    )


def _claim_output_dir(output: Path, overwrite: bool) -> None:
    """Refuse an output folder holding a run unless ``overwrite`` (then its ``last/`` and ``best/`` are removed)."""
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"output_dir {output} is a file; give a folder")
    recover_checkpoint(output / LAST)  # a crash mid-write may have left the last good checkpoint aside
    recover_checkpoint(output / BEST)
    existing = [name for name in (LAST, BEST) if (output / name / CARD_FILE).is_file()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{output} already holds a training run ({', '.join(f'{n}/' for n in existing)}); refusing to overwrite "
            "it. Continue it with Trainer.resume(output_dir, ...), choose another folder, or pass overwrite=True."
        )
    if overwrite:
        for name in (LAST, BEST):
            if (output / name / CARD_FILE).is_file():
                shutil.rmtree(output / name)


def _first(names: Sequence[str], count: int = 5) -> str:
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "") if names else "none"


def _check_same_cases(
    state: dict[str, Any],
    train_cases: Sequence[TrainingCase],
    val_cases: Sequence[TrainingCase] | None,
    folder: Path,
) -> None:
    for what, saved, given in (
        ("training", state.get("train_cases", []), case_names(train_cases)),
        ("validation", state.get("val_cases", []), case_names(val_cases) if val_cases else []),
    ):
        if list(saved) != list(given):
            raise ValueError(
                f"the {what} cases differ from the run saved in {folder}: saved {_first(saved)}, given "
                f"{_first(given)}. Resume with the same cases, or pass "
                "check_cases=False to continue on other data."
            )
