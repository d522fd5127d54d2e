"""The Segment widget's work without Qt: gather image layers into one model input, run the predictor as a
generator, and describe the Labels layer of the result.

Kept apart from the widget so it can be tested without a window; it imports torch only inside
:func:`segmentation_job` (when a run starts).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_mamba_seg._generators import CancelSignal

__all__ = ["ModelInput", "SegmentationResult", "labels_layer_name", "model_input_from_layers", "segmentation_job"]


@dataclass
class ModelInput:
    """What the model gets: the image layers stacked as channels, and where to put the result.

    Attributes:
        image: ``(C, *spatial)`` array, one channel per layer (or the channel axis of one 4D layer).
        spacing: Voxel size per spatial axis: the first layer's spatial ``scale`` (mm for layers from our readers),
            also the Labels layer's ``scale``.
        translate: ``translate`` of the Labels layer.
        names: The layer names, in channel order.
        first_layer: The first layer: the Labels layer takes its placement and geometry metadata.
    """

    image: np.ndarray
    spacing: tuple[float, ...]
    translate: tuple[float, ...]
    names: list[str] = field(default_factory=list)
    first_layer: Any = None


@dataclass
class SegmentationResult:
    """A finished run: the labels, the class names and where they came from."""

    labels: np.ndarray
    class_names: list[str]
    model_name: str
    model_sha256: str
    probabilities: np.ndarray | None = None


def model_input_from_layers(layers: Sequence[Any]) -> ModelInput:
    """Stack image layers as the channels of one model input.

    Args:
        layers: napari Image layers, in channel order: several 2D/3D layers of one shape (e.g. the DCE phases), or
            one layer (a 4D one is read as ``(C, z, y, x)``).

    Returns:
        The :class:`ModelInput`.

    Raises:
        ValueError: No layer, an RGB layer, a layer without data, layers of different shapes or scales; the message
            names the layer and says what to do.
    """
    if not layers:
        raise ValueError("choose at least one image layer")
    arrays = [_layer_array(layer) for layer in layers]
    first = layers[0]
    if len(layers) == 1 and arrays[0].ndim == 4:
        image = arrays[0]
        spatial_scale = tuple(float(s) for s in first.scale[1:])
        spatial_translate = tuple(float(t) for t in first.translate[1:])
    else:
        _check_same_grid(layers, arrays)
        image = np.stack(arrays)
        spatial_scale = tuple(float(s) for s in first.scale)
        spatial_translate = tuple(float(t) for t in first.translate)
    return ModelInput(
        image=image,
        spacing=spatial_scale,
        translate=spatial_translate,
        names=[layer.name for layer in layers],
        first_layer=first,
    )


def _layer_array(layer: Any) -> np.ndarray:
    if getattr(layer, "rgb", False):
        raise ValueError(
            f"layer {layer.name!r} is an RGB image; the models take grey-level images: choose the scan's layers "
            "(or convert it, e.g. layer.data.mean(-1))"
        )
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    array = np.asarray(data)
    if array.size == 0:
        raise ValueError(f"layer {layer.name!r} has no data (shape {array.shape}); choose a layer with an image")
    if array.ndim not in (2, 3, 4):
        raise ValueError(
            f"layer {layer.name!r} has {array.ndim} dimensions; the models take 2D or 3D images (or one 4D layer "
            "with the channels first)"
        )
    return array


def _check_same_grid(layers: Sequence[Any], arrays: Sequence[np.ndarray]) -> None:
    first, shape = layers[0], arrays[0].shape
    for layer, array in zip(layers[1:], arrays[1:], strict=True):
        if array.shape != shape:
            raise ValueError(
                f"layers {first.name!r} {shape} and {layer.name!r} {array.shape} differ in shape; channels must lie "
                "on one voxel grid (resample them first, or choose layers of one series)"
            )
        if not np.allclose(layer.scale, first.scale, rtol=1e-4):
            raise ValueError(
                f"layers {first.name!r} (scale {tuple(first.scale)}) and {layer.name!r} (scale {tuple(layer.scale)}) "
                "have different voxel sizes; channels must lie on one voxel grid"
            )


def labels_layer_name(image_names: Sequence[str], model_name: str) -> str:
    """Name of the result layer, e.g. ``"phantom pre-contrast · breast-dce"``."""
    return f"{image_names[0]} · {Path(model_name).name}"


def segmentation_job(
    model: str,
    device: str,
    model_input: ModelInput,
    axis: int | str = "auto",
    *,
    probabilities: bool = False,
    cancel: CancelSignal = None,
) -> Generator[Any, None, SegmentationResult]:
    """Load the model and segment: yields :class:`~napari_mamba_seg.inference.PredictionProgress`, returns the
    :class:`SegmentationResult`.

    Args:
        model: A bundled or user bundle name, or a bundle folder.
        device: ``"auto"``, ``"cpu"``, ``"cuda:N"``, ``"mps"``.
        model_input: From :func:`model_input_from_layers`.
        axis: Slice axis of 2D models (``"auto"``: the coarsest spacing).
        probabilities: Also return the class probabilities ``(num_classes, *spatial)`` (click refinement).
        cancel: Stops the run before the next batch (raises ``PredictionCancelled``).

    Raises:
        ValueError: The image does not fit the model (the message says how); unknown model.
        PredictionCancelled: ``cancel`` asked to stop.
    """
    from napari_mamba_seg.inference import PredictionSettings, Predictor

    settings = PredictionSettings(device=device, axis=axis, return_probabilities=probabilities)
    predictor = Predictor.from_bundle(model, settings)
    predictor.check_image(model_input.image, model_input.spacing)
    prediction = yield from predictor.iter_predict(model_input.image, model_input.spacing, cancel=cancel)
    return SegmentationResult(
        labels=prediction.labels,
        class_names=list(prediction.class_names),
        model_name=str(model),
        model_sha256=predictor.card.sha256,
        probabilities=prediction.probabilities,
    )
