"""The predictor: numpy image in, labels (and optionally class probabilities) out.

Pipeline of :meth:`Predictor.iter_predict`:

1. check the image (channels, dimensions, values) and plan the run (:meth:`Predictor.plan`: device, precision,
   mode, tile, batch, memory);
2. normalise each channel as the model card says (:mod:`.normalization`);
3. when resampling, resample the normalised image linearly to the card's spacing (:mod:`.resampling`; for a 2D
   model only the two in-plane axes);
4. predict softmax probabilities: a 2D model on a volume slice by slice along the chosen axis (slices batched; a
   slice larger than the tile with a 2D sliding window), a 2D model on a 2D image or a 3D model on a volume with a
   sliding window (:mod:`.sliding_window`); optionally averaged over all flips (test-time augmentation);
5. resample the probabilities back to the image grid (per slice for 2D models), take the argmax.

The output always has the input's spatial shape. Slice-wise prediction keeps only the slices in flight: no
float32 ``(num_classes, *volume)`` array exists unless probabilities are asked for. Results do not depend on the
batch size, and the same call twice gives identical results.

Example:
    >>> predictor = Predictor.from_bundle("runs/breast_v1", PredictionSettings(device="auto"))
    >>> print(predictor.plan(image.shape, spacing=(2.0, 0.7, 0.7)).summary())
    >>> prediction = predictor.predict(image, spacing=(2.0, 0.7, 0.7), progress=print)
    >>> prediction.labels.shape == image.shape[1:]
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from napari_mamba_seg._generators import CancelSignal, cancel_predicate, run_to_end
from napari_mamba_seg._spacing import checked_spacing
from napari_mamba_seg.bundles import ModelCard, load_bundle
from napari_mamba_seg.inference.device import PRECISIONS, resolve_precision, select_device
from napari_mamba_seg.inference.device import autocast as autocast_context
from napari_mamba_seg.inference.memory import (
    MAX_BATCH_SIZE,
    MB,
    ForwardCost,
    activation_bytes_per_voxel,
    choose_batch_and_tile,
    cpu_batch_cap,
    default_memory_budget_mb,
    model_weight_bytes,
)
from napari_mamba_seg.inference.normalization import check_normalization, normalize_channel
from napari_mamba_seg.inference.resampling import resample_to_shape, resampled_shape
from napari_mamba_seg.inference.sliding_window import TileGrid, num_batches, run_tiles
from napari_mamba_seg.io import MedicalImage
from napari_mamba_seg.models import SegmentationModel

__all__ = [
    "CancelSignal",
    "Prediction",
    "PredictionCancelled",
    "PredictionPlan",
    "PredictionProgress",
    "PredictionSettings",
    "Predictor",
    "check_card",
    "slice_axis_for",
]


Mode = Literal["slices", "volume", "image"]


class PredictionCancelled(RuntimeError):
    """The prediction was cancelled; no partial result exists."""


@dataclass
class PredictionSettings:
    """How to run a prediction (the command line's options and the widget's form).

    Attributes:
        device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        precision: ``"auto"`` (bf16 autocast on CUDA, fp16 where bf16 is unsupported, fp32 elsewhere), ``"fp32"``,
            ``"bf16"`` or ``"fp16"``.
        axis: Slice axis (array axis of the spatial shape) for a 2D model on a volume; ``"auto"`` = the axis with
            the coarsest spacing (ties: the lowest axis; axis 0 without spacing).
        tile_size: None = the card's patch size (the whole image/slice when the card has none); ``"whole"`` =
            never tile; or explicit sizes (2 for a 2D model, in-plane in array order; 3 for a 3D model). Automatic
            tiles shrink when memory is short; explicit ones and ``"whole"`` do not.
        overlap: Minimum overlap of neighbouring tiles, a fraction of the tile in [0, 1).
        batch_size: Slices (2D) or tiles per forward pass; None = the largest that fits the memory budget
            (at most 32).
        memory_budget_mb: Memory the run may use; None = 80 % of the free GPU memory on CUDA, half the available
            RAM on the CPU.
        tta: Average the softmax over all flips of the spatial axes (4 in 2D, 8 in 3D).
        return_probabilities: Also return the ``(num_classes, *spatial)`` float32 probabilities.
        resample: Resample to the card's spacing and back; None = as the card says.
        blank_slices_background: Label background every slice of a volume (along the slice axis: the chosen one
            for a 2D model, the coarsest spacing for a 3D one) in which every channel is constant: outside the
            scanner's field of view, where the network gets no signal but can still draw shapes (the bundled
            mr-tumour model drew a 15,000-voxel tumour on the five empty end slices of sarcoma case STS_004). The
            probabilities there become background 1. A 2D model slicing along that axis does not predict those
            slices at all (the plan of the prediction counts only the slices it predicts).
    """

    device: str = "auto"
    precision: str = "auto"
    axis: int | str = "auto"
    tile_size: tuple[int, ...] | str | None = None
    overlap: float = 0.5
    batch_size: int | None = None
    memory_budget_mb: float | None = None
    tta: bool = False
    return_probabilities: bool = False
    resample: bool | None = None
    blank_slices_background: bool = True


@dataclass(frozen=True)
class PredictionProgress:
    """One progress report of :meth:`Predictor.iter_predict`.

    Attributes:
        done: Steps of this stage done.
        total: Steps of this stage.
        stage: ``"normalising"``, ``"resampling"`` or ``"predicting"``.
        message: Human-readable, e.g. ``"batch 3/12"``.
    """

    done: int
    total: int
    stage: str
    message: str = ""

    @property
    def fraction(self) -> float:
        """``done / total`` of this stage, in [0, 1]."""
        return min(1.0, self.done / self.total) if self.total > 0 else 1.0


@dataclass
class PredictionPlan:
    """What a prediction will do, computed before running it (shown by the command line and the widget).

    Attributes:
        device: Torch device string, e.g. ``"cuda:0"``.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        mode: ``"slices"`` (2D model along ``axis`` of a volume), ``"volume"`` (3D model) or ``"image"``
            (2D model, 2D image).
        axis: The slice axis in ``"slices"`` mode, else None.
        tile_size: The tile the model sees (in-plane for slices), capped at the (resampled) image.
        batch_size: Tiles (slices) per forward pass.
        num_steps: Forward batches (each runs every flip under TTA).
        estimated_peak_mb: Estimated peak memory: the device's for CUDA; device and host arrays together on the
            CPU and MPS (one memory).
        memory_budget_mb: The budget it was planned against.
        resample_to: Spatial shape the image is resampled to, or None without resampling.
        spatial_shape: The image's spatial shape (the output's).
        num_tiles: Tiles in total (all slices).
        tiles_per_item: Tiles per slice (slices mode) or per image.
        overlap: Minimum tile overlap.
        tta: Whether the flips are averaged.
        device_mb: Estimated model weights + activations of one batch.
        host_mb: Estimated host arrays: normalised (and resampled) image, accumulators, labels, probabilities.
        accumulator_mb: Of ``host_mb``, the float32 probability accumulators (blending, per slice or per volume).
        probability_volume: Whether a float32 ``(num_classes, *spatial)`` array of the whole image is allocated
            (3D or 2D-image sliding window, or probabilities asked for); False for slice-wise labels only.
    """

    device: str
    precision: str
    mode: Mode
    axis: int | None
    tile_size: tuple[int, ...]
    batch_size: int
    num_steps: int
    estimated_peak_mb: float
    memory_budget_mb: float
    resample_to: tuple[int, ...] | None
    spatial_shape: tuple[int, ...] = ()
    num_tiles: int = 1
    tiles_per_item: int = 1
    overlap: float = 0.5
    tta: bool = False
    device_mb: float = 0.0
    host_mb: float = 0.0
    accumulator_mb: float = 0.0
    probability_volume: bool = False

    def summary(self) -> str:
        """One line for a log or a status bar."""
        where = f"slices along axis {self.axis}" if self.mode == "slices" else self.mode
        resample = f", resampled to {'×'.join(map(str, self.resample_to))}" if self.resample_to else ""
        return (
            f"{where} of {'×'.join(map(str, self.spatial_shape))}{resample}: {self.num_tiles} tile(s) of "
            f"{'×'.join(map(str, self.tile_size))} in {self.num_steps} batch(es) of {self.batch_size}"
            f"{' ×' + str(2 ** len(self.tile_size)) + ' flips' if self.tta else ''} on {self.device} "
            f"({self.precision}); about {self.estimated_peak_mb:,.0f} MB of a {self.memory_budget_mb:,.0f} MB budget"
        )


@dataclass
class Prediction:
    """The result of a prediction.

    Attributes:
        labels: ``(*spatial)`` uint8 class indices (uint16 when num_classes > 255), the input's spatial shape.
        probabilities: ``(num_classes, *spatial)`` float32 softmax probabilities when asked for, else None.
        class_names: One name per class, background first.
        plan: What ran.
    """

    labels: np.ndarray
    probabilities: np.ndarray | None
    class_names: list[str]
    plan: PredictionPlan


@dataclass(frozen=True)
class _Layout:
    """How an image maps onto the model: mode, slice axis, grids and items."""

    mode: Mode
    axis: int | None
    spatial: tuple[int, ...]  # the image's spatial shape
    grid: tuple[int, ...]  # spatial shape the model sees (after resampling)
    resample: bool

    @property
    def num_items(self) -> int:
        return self.grid[self.axis] if self.mode == "slices" else 1

    @property
    def item_shape(self) -> tuple[int, ...]:
        """Spatial shape of one item on the model grid (a slice's in-plane shape, or the whole grid)."""
        return _drop(self.grid, self.axis) if self.mode == "slices" else self.grid

    @property
    def output_item_shape(self) -> tuple[int, ...]:
        return _drop(self.spatial, self.axis) if self.mode == "slices" else self.spatial

    def item_view(self, array: np.ndarray) -> np.ndarray:
        """``(N, *spatial)`` -> ``(N, items, *item)`` view (the slice axis moved to position 1)."""
        return np.moveaxis(array, 1 + self.axis, 1) if self.mode == "slices" else array[:, None]


def _drop(shape: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
    return tuple(s for a, s in enumerate(shape) if a != axis)


class Predictor:
    """Runs a segmentation model on numpy images as its model card says.

    Args:
        model: The network; moved to the settings' device and put in eval mode for each prediction.
        card: Its card (normalisation, patch size, spacing, class and channel names); None = z-score
            normalisation, whole-image prediction, generic class names.
        settings: How to run; None = the defaults. The device is chosen here; the other settings are read at
            every :meth:`plan` / :meth:`predict`.

    Raises:
        ValueError: Invalid settings, a card that does not fit the model, or an invalid normalisation schema.
        DeviceUnavailableError: The requested device does not exist here.
    """

    def __init__(
        self, model: SegmentationModel, card: ModelCard | None = None, settings: PredictionSettings | None = None
    ) -> None:
        if not isinstance(model, SegmentationModel):
            raise TypeError(f"Predictor needs a SegmentationModel, got {type(model).__name__}")
        self.settings = settings if settings is not None else PredictionSettings()
        self.card = card if card is not None else ModelCard()
        self.normalization = check_normalization(self.card.normalization)
        check_card(self.card, model)
        _check_settings(self.settings, model.spatial_dims)
        self.device = select_device(self.settings.device)
        self.model = model.to(self.device)
        self.model.eval()
        self.folder: Path | None = None

    @classmethod
    def from_bundle(
        cls, name_or_folder: str | os.PathLike[str], settings: PredictionSettings | None = None
    ) -> Predictor:
        """A predictor for a saved bundle (a folder, or the name of a bundled one), loaded on the chosen device."""
        settings = settings if settings is not None else PredictionSettings()
        bundle = load_bundle(name_or_folder, device=select_device(settings.device))
        predictor = cls(bundle.model, bundle.card, settings)
        predictor.folder = bundle.folder
        return predictor

    # ------------------------------------------------------------------------------------------------ properties

    @property
    def spatial_dims(self) -> int:
        return self.model.spatial_dims

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def class_names(self) -> list[str]:
        """The card's class names, or ``background, class_1, ...``."""
        return list(self.card.class_names) or ["background", *(f"class_{i}" for i in range(1, self.num_classes))]

    @property
    def precision(self) -> str:
        """The concrete precision of the current settings on this device."""
        return resolve_precision(self.settings.precision, self.device)

    # ------------------------------------------------------------------------------------------------- checking

    def check_image(self, image: np.ndarray, spacing: Sequence[float] | None = None) -> None:
        """Raise a ValueError saying how to fix an image this predictor cannot take.

        Checks the dtype (real numbers), the dimensions (``(C, H, W)`` or ``(C, D, H, W)`` for a 2D model,
        ``(C, D, H, W)`` for a 3D one), the channel count against the card, empty axes, NaN/inf values and the
        spacing.
        """
        image = _as_array(image)
        if image.dtype.kind not in "biuf":
            raise ValueError(
                f"the image has dtype {image.dtype}, not real numbers; convert it first "
                "(e.g. np.abs(image) for complex MR data, or image.astype(np.float32))"
            )
        self._check_shape(image.shape)
        self._check_spacing(spacing, image.ndim - 1)
        if image.dtype.kind == "f":
            for channel in range(image.shape[0]):
                values = image[channel]
                # a float64 sum is finite exactly when no value is NaN/inf (barring float64 overflow: checked then)
                if not np.isfinite(np.sum(values, dtype=np.float64)) and not np.isfinite(values).all():
                    bad = int(np.count_nonzero(~np.isfinite(values)))
                    raise ValueError(
                        f"channel {channel} ({self._channel_name(channel)}) of the image has {bad} NaN or infinite "
                        "value(s); replace them first, e.g. np.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0)"
                    )

    def _channel_name(self, channel: int) -> str:
        names = self.card.channel_names
        return names[channel] if channel < len(names) else f"channel {channel}"

    def _check_shape(self, shape: Sequence[int]) -> None:
        shape = tuple(int(s) for s in shape)
        expected_channels = self.model.in_channels
        names = self.card.channel_names
        spatial = len(shape) - 1
        layouts = "(C, H, W) or (C, D, H, W)" if self.spatial_dims == 2 else "(C, D, H, W)"
        if self.spatial_dims == 3 and spatial == 2:
            raise ValueError(
                f"this is a 3D model and needs a volume (C, D, H, W), but the image is 2D with shape {shape}; "
                "use a 2D model for 2D images, or pass the whole volume"
            )
        if spatial not in ((2, 3) if self.spatial_dims == 2 else (3,)):
            hint = " Add a channel axis first: image[None]." if len(shape) in (2, 3) and expected_channels == 1 else ""
            raise ValueError(
                f"the image has shape {shape}, but a {self.spatial_dims}D model takes channel-first arrays "
                f"{layouts}.{hint}"
            )
        if shape[0] != expected_channels:
            listed = f" ({', '.join(names)})" if names else ""
            raise ValueError(
                f"the model expects {expected_channels} input channel(s){listed} but the image has {shape[0]} "
                f"(shape {shape}, channels first); stack the {expected_channels} channel(s) in this order as axis 0"
            )
        if min(shape[1:]) < 1:
            raise ValueError(f"the image has an empty axis: shape {shape}")

    def _check_spacing(self, spacing: Sequence[float] | None, spatial_dims: int) -> tuple[float, ...] | None:
        if spacing is None:
            return None
        return checked_spacing(spacing, spatial_dims)

    # -------------------------------------------------------------------------------------------------- planning

    def plan(self, image_shape: Sequence[int], spacing: Sequence[float] | None = None) -> PredictionPlan:
        """What a prediction of an image of ``image_shape`` would do, without running it.

        Runs one small probe forward the first time (to measure the activation memory; cached).

        Args:
            image_shape: The image's full shape ``(C, *spatial)``.
            spacing: Voxel size per spatial axis (mm), array order; needed for ``axis="auto"`` and resampling.

        Returns:
            The plan.

        Raises:
            ValueError: The image shape or spacing does not fit the model, or resampling lacks a spacing.
            MemoryError: Nothing fits the memory budget.
        """
        self._check_shape(image_shape)
        layout = self._layout(
            tuple(int(s) for s in image_shape[1:]), self._check_spacing(spacing, len(image_shape) - 1)
        )
        return self._plan(layout)

    def _layout(self, spatial: tuple[int, ...], spacing: tuple[float, ...] | None) -> _Layout:
        if self.spatial_dims == 3:
            mode, axis = "volume", None
        elif len(spatial) == 2:
            mode, axis = "image", None
        else:
            mode, axis = "slices", self._slice_axis(spacing)
        resample = self.settings.resample if self.settings.resample is not None else self.card.resample
        if not resample:
            return _Layout(mode, axis, spatial, spatial, False)
        if self.card.spacing is None:
            raise ValueError(
                "resampling needs the spacing the model was trained at, but the card has none; set resample=False"
            )
        if spacing is None:
            raise ValueError(
                f"this model resamples images to its spacing {tuple(self.card.spacing)} mm and needs the image's "
                "spacing: pass spacing=(...) (array order, mm), or set resample=False"
            )
        in_model = [a for a in range(len(spatial)) if a != axis]
        target = resampled_shape([spatial[a] for a in in_model], [spacing[a] for a in in_model], self.card.spacing)
        grid = list(spatial)
        for a, size in zip(in_model, target, strict=True):
            grid[a] = size
        return _Layout(mode, axis, spatial, tuple(grid), True)

    def _slice_axis(self, spacing: tuple[float, ...] | None) -> int:
        return slice_axis_for(spacing, self.settings.axis)

    def _requested_tile(self, layout: _Layout) -> tuple[tuple[int, ...], bool]:
        """The tile before memory planning (capped at the item) and whether it may shrink."""
        item = layout.item_shape
        requested = self.settings.tile_size
        if requested == "whole":
            return item, False
        if requested is None:
            tile = tuple(self.card.patch_size) if self.card.patch_size else item
            explicit = False
        else:
            tile = (requested,) * len(item) if isinstance(requested, int) else tuple(int(t) for t in requested)
            explicit = True
        return tuple(min(t, s) for t, s in zip(tile, item, strict=True)), not explicit

    def _plan(self, layout: _Layout) -> PredictionPlan:
        settings = self.settings
        _check_settings(settings, self.spatial_dims)
        precision = self.precision
        cost = ForwardCost(
            weight_bytes=model_weight_bytes(self.model),
            activation_bytes_per_voxel=activation_bytes_per_voxel(self.model, self.device, precision),
            in_channels=self.model.in_channels,
            num_classes=self.num_classes,
            size_divisor=tuple(self.model.size_divisor),
            tta=settings.tta,
        )
        shared_memory = self.device.type != "cuda"  # CPU / MPS: device and host arrays share one memory

        def peak_bytes(batch: int, tile: tuple[int, ...]) -> float:
            grid = TileGrid.build(layout.item_shape, tile, settings.overlap)
            host = self._host_bytes(layout, grid, batch)[0]
            return cost.device_bytes(batch, tile) + (host if shared_memory else 0)

        def max_batch(tile: tuple[int, ...]) -> int:
            tiles = TileGrid.build(layout.item_shape, tile, settings.overlap).num_tiles
            if settings.batch_size is not None:  # as asked, up to the number of tiles
                return layout.num_items * tiles
            cap = MAX_BATCH_SIZE if self.device.type == "cuda" else cpu_batch_cap(cost.device_bytes(1, tile) / MB)
            return min(cap, layout.num_items * tiles)

        budget_mb = settings.memory_budget_mb or default_memory_budget_mb(self.device)
        tile, may_shrink = self._requested_tile(layout)
        batch, tile, peak = choose_batch_and_tile(
            peak_bytes,
            tile,
            budget_mb=budget_mb,
            divisor=self.model.size_divisor,
            max_batch=max_batch,
            batch_size=settings.batch_size,
            allow_shrink=may_shrink,
        )
        grid = TileGrid.build(layout.item_shape, tile, settings.overlap)
        host, accumulators, probability_volume = self._host_bytes(layout, grid, batch)
        return PredictionPlan(
            device=str(self.device),
            precision=precision,
            mode=layout.mode,
            axis=layout.axis,
            tile_size=grid.tile,
            batch_size=batch,
            num_steps=num_batches(grid, layout.num_items, batch),
            estimated_peak_mb=peak / MB,
            memory_budget_mb=float(budget_mb),
            resample_to=layout.grid if layout.resample else None,
            spatial_shape=layout.spatial,
            num_tiles=layout.num_items * grid.num_tiles,
            tiles_per_item=grid.num_tiles,
            overlap=settings.overlap,
            tta=settings.tta,
            device_mb=cost.device_bytes(batch, grid.tile) / MB,
            host_mb=host / MB,
            accumulator_mb=accumulators / MB,
            probability_volume=probability_volume,
        )

    def _host_bytes(self, layout: _Layout, grid: TileGrid, batch: int) -> tuple[float, float, bool]:
        """``(host bytes, of which accumulators, whole-image probability array?)`` of a run."""
        channels, classes = self.model.in_channels, self.num_classes
        voxels, grid_voxels, item_voxels = math.prod(layout.spatial), math.prod(layout.grid), math.prod(grid.shape)
        host = 4 * channels * voxels + voxels * _labels_dtype(classes).itemsize  # normalised image, labels
        host += 4 * channels * grid_voxels if layout.resample else 0
        host += 4 * batch * math.prod(grid.tile) * (channels + classes)  # stacked tiles in, probabilities out
        wants_probabilities = self.settings.return_probabilities
        if layout.mode == "slices":
            blended = grid.num_tiles > 1
            in_flight = min(layout.num_items, math.ceil(batch / grid.num_tiles) + 1) if blended else 0
            accumulators = 4 * (in_flight * classes * item_voxels + (item_voxels if blended else 0))
            output = 4 * classes * voxels if wants_probabilities else 0
            return host + accumulators + output, accumulators, wants_probabilities
        accumulators = 4 * (classes * grid_voxels + (grid_voxels if grid.num_tiles > 1 else 0))
        if layout.resample:  # back to the image grid: all classes, or class by class into a running argmax
            output = 4 * classes * voxels if wants_probabilities else 8 * voxels
        else:
            output = 0 if wants_probabilities else 5 * voxels  # running maximum and mask of the argmax
        return host + accumulators + output, accumulators, True

    # ------------------------------------------------------------------------------------------------ predicting

    def predict(
        self,
        image: np.ndarray | MedicalImage,
        spacing: Sequence[float] | None = None,
        *,
        progress: Callable[[PredictionProgress], None] | None = None,
        cancel: CancelSignal = None,
    ) -> Prediction:
        """Segment ``image``.

        Args:
            image: ``(C, *spatial)`` numpy array, any real dtype; or a :class:`~napari_mamba_seg.io.MedicalImage`
                (from ``read_image``), whose spacing is used when ``spacing`` is None.
            spacing: Voxel size per spatial axis in mm (array order); for ``axis="auto"`` and resampling.
            progress: Called with every :class:`PredictionProgress`.
            cancel: None, a ``threading.Event`` or a callable returning True to stop; checked before every batch.

        Returns:
            The :class:`Prediction`.

        Raises:
            ValueError: The image does not fit the model (the message says how to fix it).
            MemoryError: Nothing fits the memory budget.
            PredictionCancelled: ``cancel`` asked to stop.
        """
        return run_to_end(self.iter_predict(image, spacing, cancel=cancel), progress)

    def iter_predict(
        self, image: np.ndarray | MedicalImage, spacing: Sequence[float] | None = None, *, cancel: CancelSignal = None
    ) -> Generator[PredictionProgress, None, Prediction]:
        """Segment ``image`` step by step: yields progress, returns the :class:`Prediction` (``StopIteration.value``).

        Same arguments and errors as :meth:`predict`. Closing the generator early is safe; no torch state
        (inference mode, autocast) is held while it is suspended.
        """
        check_cancel = _cancel_checker(cancel)
        if isinstance(image, MedicalImage):
            spacing = image.geometry.spacing if spacing is None else spacing
            image = image.array
        image = _as_array(image)
        self.check_image(image, spacing)
        check_cancel()
        spacing = self._check_spacing(spacing, image.ndim - 1)
        layout = self._layout(tuple(image.shape[1:]), spacing)
        plan = self._plan(layout)
        blank_axis, blank = None, None
        if self.settings.blank_slices_background and image.ndim == 4:
            blank_axis = layout.axis if layout.axis is not None else slice_axis_for(spacing)
            blank = blank_slices(image, blank_axis)
        grid = TileGrid.build(layout.item_shape, plan.tile_size, plan.overlap)
        items, plan = _items_to_predict(layout, grid, plan, blank_axis, blank)
        check_cancel()
        was_training = self.model.training
        self.model.eval()
        try:
            normalised = yield from self._normalise(image, check_cancel)
            if layout.resample:
                yield PredictionProgress(0, 1, "resampling", f"image to {'×'.join(map(str, layout.grid))}")
                normalised = resample_to_shape(normalised, layout.grid)
                yield PredictionProgress(1, 1, "resampling", f"image to {'×'.join(map(str, layout.grid))}")
            writer = _OutputWriter(layout, self.num_classes, self.settings.return_probabilities)
            view = layout.item_view(normalised)
            steps = run_tiles(
                grid,
                items,
                plan.batch_size,
                _tile_reader(view),
                self._predict_batch,
                writer.on_item_done,
                self.num_classes,
                check_cancel,
            )
            for done in steps:
                yield PredictionProgress(done, plan.num_steps, "predicting", f"batch {done}/{plan.num_steps}")
            del normalised, view
            resample_back = layout.resample and layout.mode != "slices"
            if resample_back:
                yield PredictionProgress(0, 1, "resampling", "probabilities back to the image grid")
            writer.finish()
            if resample_back:
                yield PredictionProgress(1, 1, "resampling", "probabilities back to the image grid")
        finally:
            self.model.train(was_training)
        if blank is not None:
            _set_background(writer.labels, writer.probabilities, blank_axis, blank)
        return Prediction(writer.labels, writer.probabilities, self.class_names, plan)

    def _normalise(
        self, image: np.ndarray, check_cancel: Callable[[], None]
    ) -> Generator[PredictionProgress, None, np.ndarray]:
        """``(C, *spatial)`` float32 normalised image, channel by channel (the input is never modified)."""
        channels = image.shape[0]
        if self.normalization["method"] == "none" and image.dtype == np.float32:
            yield PredictionProgress(channels, channels, "normalising", "float32 input used as is")
            return image
        out = np.empty(image.shape, dtype=np.float32)
        for channel in range(channels):
            check_cancel()
            normalize_channel(image[channel], self.normalization, out=out[channel])
            message = f"channel {channel + 1}/{channels}" + (
                f" ({self.card.channel_names[channel]})" if self.card.channel_names else ""
            )
            yield PredictionProgress(channel + 1, channels, "normalising", message)
        return out

    def _predict_batch(self, inputs: np.ndarray) -> np.ndarray:
        """``(b, C, *tile)`` float32 -> ``(b, K, *tile)`` float32 softmax probabilities (mean over flips with TTA)."""
        x = torch.from_numpy(np.ascontiguousarray(inputs)).to(self.device)
        flips = _flip_sets(x.ndim - 2) if self.settings.tta else [()]
        precision = self.precision
        with torch.inference_mode(), _cudnn_benchmark_off():
            total = None
            for dims in flips:
                with autocast_context(self.device, precision):
                    logits = self.model(x.flip(dims) if dims else x)
                probabilities = torch.softmax(logits.float(), dim=1)
                del logits
                if dims:
                    probabilities = probabilities.flip(dims)
                total = probabilities if total is None else total.add_(probabilities)
            if len(flips) > 1:
                total /= len(flips)
            return total.cpu().numpy()


# ------------------------------------------------------------------------------------------------------ helpers


class _OutputWriter:
    """Turns each item's probabilities into labels (and probabilities) on the image grid."""

    def __init__(self, layout: _Layout, num_classes: int, return_probabilities: bool) -> None:
        self.layout = layout
        self.return_probabilities = return_probabilities
        self.labels = np.zeros(layout.spatial, dtype=_labels_dtype(num_classes))
        self._labels_view = layout.item_view(self.labels[None])[0]
        self.probabilities: np.ndarray | None = None
        self._probabilities_view = None
        if return_probabilities and layout.mode == "slices":
            self.probabilities = np.zeros((num_classes, *layout.spatial), dtype=np.float32)
            self._probabilities_view = layout.item_view(self.probabilities)
        self._pending: np.ndarray | None = None

    def on_item_done(self, item: int, probabilities: np.ndarray) -> None:
        """``probabilities``: ``(K, *item_shape)`` on the model grid."""
        if self.layout.mode != "slices":  # one item: finished in finish(), after the last progress report
            self._pending = probabilities
            return
        if self.layout.resample:
            probabilities = resample_to_shape(probabilities, self.layout.output_item_shape)
        if self._probabilities_view is not None:
            self._probabilities_view[:, item] = probabilities
        _argmax_into((p for p in probabilities), self._labels_view[item])

    def finish(self) -> None:
        probabilities, self._pending = self._pending, None
        if probabilities is None:
            return
        shape = self.layout.spatial
        if self.return_probabilities:
            self.probabilities = resample_to_shape(probabilities, shape) if self.layout.resample else probabilities
            _argmax_into((p for p in self.probabilities), self.labels)
        elif self.layout.resample:  # class by class, so no (K, *image) float32 array exists
            channels = (resample_to_shape(probabilities[k : k + 1], shape)[0] for k in range(len(probabilities)))
            _argmax_into(channels, self.labels)
        else:
            _argmax_into((p for p in probabilities), self.labels)


def _items_to_predict(
    layout: _Layout, grid: TileGrid, plan: PredictionPlan, blank_axis: int | None, blank: np.ndarray | None
) -> tuple[list[int], PredictionPlan]:
    """The items to predict and the plan for them: a 2D model slicing along ``blank_axis`` (on the image's own slices)
    skips the blank ones; otherwise every item (the blank slices are set to background afterwards)."""
    items = list(range(layout.num_items))
    skips = (
        blank is not None
        and blank.any()
        and layout.mode == "slices"
        and layout.axis == blank_axis
        and layout.num_items == blank.size
    )
    if not skips:
        return items, plan
    items = [int(i) for i in np.flatnonzero(~blank)]
    steps = num_batches(grid, len(items), plan.batch_size)
    return items, dataclasses.replace(plan, num_tiles=len(items) * grid.num_tiles, num_steps=steps)


def blank_slices(image: np.ndarray, axis: int) -> np.ndarray:
    """``(size,)`` bool: the slices of the ``(C, *spatial)`` image along spatial ``axis`` in which every channel is
    constant (no signal: outside the field of view)."""
    others = tuple(a for a in range(1, image.ndim) if a != axis + 1)
    constant = np.max(image, axis=others) == np.min(image, axis=others)  # (C, size)
    return constant.all(axis=0)


def _set_background(labels: np.ndarray, probabilities: np.ndarray | None, axis: int, blank: np.ndarray) -> None:
    """Background (label 0, probability 1) on the ``blank`` slices along ``axis``, in place."""
    if not blank.any():
        return
    region = (slice(None),) * axis + (np.flatnonzero(blank),)
    labels[region] = 0
    if probabilities is not None:
        probabilities[(slice(None), *region)] = 0.0
        probabilities[(0, *region)] = 1.0


def _as_array(image: Any) -> np.ndarray:
    """``image`` as a numpy array (array-likes such as dask or zarr arrays are read into memory)."""
    if isinstance(image, np.ndarray):
        return image
    if not hasattr(image, "__array__"):
        raise ValueError(f"the image must be a numpy array (C, *spatial), got {type(image).__name__}")
    return np.asarray(image)


def _tile_reader(view: np.ndarray) -> Callable[[int, tuple[slice, ...]], np.ndarray]:
    """``read_tile(item, region)`` of a ``(C, items, *item)`` view: the ``(C, *tile)`` input of one tile."""
    return lambda item, region: view[(slice(None), item, *region)]


def _argmax_into(channels: Iterable[np.ndarray], out: np.ndarray) -> None:
    """``out[...] = argmax over channels`` (the first maximum on ties, as np.argmax), one channel at a time."""
    iterator = iter(channels)
    best = np.array(next(iterator), dtype=np.float32, copy=True)
    out[...] = 0
    for index, channel in enumerate(iterator, start=1):
        better = channel > best
        out[better] = index
        np.maximum(best, channel, out=best)


def _labels_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint8 if num_classes <= 255 else np.uint16)


def _flip_sets(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every subset of the spatial dimensions of a ``(b, C, *spatial)`` tensor, the empty one first."""
    dims = range(2, 2 + spatial_dims)
    return [combo for r in range(spatial_dims + 1) for combo in itertools.combinations(dims, r)]


@contextlib.contextmanager
def _cudnn_benchmark_off() -> Iterator[None]:
    """cuDNN autotuning off (it may pick different algorithms per call: results would not repeat exactly)."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def slice_axis_for(spacing: Sequence[float] | None, axis: int | str = "auto") -> int:
    """The slice axis of a 2D model on a volume (training samples its slices along the same axis).

    Args:
        spacing: The volume's voxel size per axis (array order), or None.
        axis: ``"auto"`` (the coarsest axis, the lowest one on ties; axis 0 without spacing) or an axis 0 to 2
            (negative counts from the end).
    """
    if axis == "auto":
        return 0 if spacing is None else int(np.argmax(spacing))
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer) or not -3 <= axis < 3:
        raise ValueError(f"slice axis must be 'auto' or a spatial axis 0, 1 or 2, got {axis!r}")
    return int(axis) % 3


def _cancel_checker(cancel: CancelSignal) -> Callable[[], None]:
    """A no-argument function raising :class:`PredictionCancelled` when ``cancel`` asks to stop."""
    is_cancelled = cancel_predicate(cancel)

    def check() -> None:
        if is_cancelled():
            raise PredictionCancelled("prediction cancelled")

    return check


def check_card(card: ModelCard, model: SegmentationModel) -> None:
    """ValueError when the card does not describe ``model`` (channels, classes, names, patch size, spacing)."""
    dims = model.spatial_dims
    if card.in_channels is not None and card.in_channels != model.in_channels:
        raise ValueError(f"the card says {card.in_channels} input channel(s) but the model has {model.in_channels}")
    if card.num_classes is not None and card.num_classes != model.num_classes:
        raise ValueError(f"the card says {card.num_classes} classes but the model has {model.num_classes}")
    if card.class_names and len(card.class_names) != model.num_classes:
        raise ValueError(
            f"the card has {len(card.class_names)} class names but the model has {model.num_classes} classes"
        )
    if card.channel_names and len(card.channel_names) != model.in_channels:
        raise ValueError(
            f"the card has {len(card.channel_names)} channel names but the model has {model.in_channels} input channels"
        )
    if card.patch_size is not None and len(card.patch_size) != dims:
        raise ValueError(f"the card's patch_size {card.patch_size} does not have {dims} values for this {dims}D model")
    if card.spacing is not None and len(card.spacing) != dims:
        what = "the in-plane (y, x) spacing" if dims == 2 else "(z, y, x)"
        raise ValueError(f"the card's spacing {card.spacing} must give {what} for this {dims}D model")


def _check_settings(settings: PredictionSettings, spatial_dims: int) -> None:
    """ValueError naming the bad setting and its valid values."""
    if settings.precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {settings.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if settings.axis != "auto" and not (
        isinstance(settings.axis, int | np.integer) and not isinstance(settings.axis, bool) and -3 <= settings.axis < 3
    ):
        raise ValueError(
            f"axis must be 'auto' or a spatial axis 0, 1 or 2 (negative counts from the end), got {settings.axis!r}"
        )
    tile = settings.tile_size
    if isinstance(tile, str):
        if tile != "whole":
            raise ValueError(f"tile_size must be None, 'whole' or {spatial_dims} sizes, got {tile!r}")
    elif tile is not None:
        sizes = (tile,) * spatial_dims if isinstance(tile, int) else tuple(tile)
        if len(sizes) != spatial_dims or not all(isinstance(s, int | np.integer) and s >= 1 for s in sizes):
            raise ValueError(
                f"tile_size must give {spatial_dims} positive sizes for a {spatial_dims}D model, got {tile!r}"
            )
    if not 0 <= settings.overlap < 1:
        raise ValueError(f"overlap must be a fraction in [0, 1), got {settings.overlap}")
    if settings.batch_size is not None and (isinstance(settings.batch_size, bool) or settings.batch_size < 1):
        raise ValueError(f"batch_size must be None (automatic) or >= 1, got {settings.batch_size}")
    if settings.memory_budget_mb is not None and not settings.memory_budget_mb > 0:
        raise ValueError(f"memory_budget_mb must be None (automatic) or > 0, got {settings.memory_budget_mb}")
