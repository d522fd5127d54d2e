"""How images, geometry and class names travel between napari layers and the core (no napari import here).

Conventions shared by the reader, the writers, the sample data and the Segment/Correct widgets:

* An image becomes Image layers whose ``scale``/``translate`` are :meth:`ImageGeometry.napari_scale_translate`
  (spacing and origin in mm, array order; a rotation or flip of the file's axes is not shown by napari).
* The full geometry survives in ``layer.metadata[METADATA_KEY]``: ``{"affine": (n+1)×(n+1) nested list (array index
  → RAS+ mm), "spatial_shape": [...], "source": str | None, "format": str, "channel_names": [...],
  "channel_index": int | None, "series_uid": str | None}``; :func:`geometry_from_layer` reads it back, so labels
  saved from napari land on the source image's voxel grid with its exact affine.
* A Labels layer made with :func:`labels_layer_kwargs` shows the class name under the cursor (a ``features`` table
  with ``index`` and ``class`` columns) and fixed colours per class, background transparent.

This module imports numpy and :mod:`napari_mamba_seg.io._image` only: never napari, Qt or torch.
"""

from __future__ import annotations

import colorsys
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from napari_mamba_seg.io._image import ImageGeometry, MedicalImage

if TYPE_CHECKING:
    from napari_mamba_seg.interactive.review import ReviewState

__all__ = [
    "CHANNELS_AS",
    "METADATA_KEY",
    "class_colors",
    "geometry_from_layer",
    "image_layer_data",
    "labels_layer_kwargs",
    "plugin_metadata",
    "review_of",
]

METADATA_KEY = "napari_mamba_seg"
"""Key of this plugin's entry in a layer's ``metadata`` dict."""

CHANNELS_AS = ("layers", "axis")
"""How a multi-channel image (DCE phases) becomes layers: one layer per channel, or one layer with a channel axis."""

LayerData = tuple[Any, dict[str, Any], str]
"""napari's ``(data, kwargs, layer_type)`` tuple."""

# 20 distinct colours (Sasha Trubetskoy's list), ordered so the breast classes read naturally:
# 1 breast = amber, 2 fibroglandular = green, 3 lesion = red, 4 muscle = blue.
_CLASS_PALETTE_RGB = (
    (255, 190, 60), (60, 180, 75), (230, 25, 75), (0, 130, 200), (145, 30, 180), (70, 240, 240), (240, 50, 230),
    (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195),
    (128, 128, 0), (255, 215, 180), (0, 0, 128), (245, 130, 48), (220, 190, 255), (128, 128, 128),
)  # fmt: skip
_UNLISTED_LABEL_RGBA = (0.5, 0.5, 0.5, 1.0)  # labels beyond the class list: plain grey
_TRANSPARENT = (0.0, 0.0, 0.0, 0.0)
_CONTRAST_PERCENTILES = (0.5, 99.8)
_CONTRAST_SAMPLE_SIZE = 1_000_000  # voxels looked at to set the display window
_SCALE_RTOL = 1e-6
_TRANSLATE_ATOL_MM = 1e-4


# --------------------------------------------------------------------------------------------- images


def image_layer_data(
    image: MedicalImage, *, channels_as: Literal["layers", "axis"] = "layers", name: str | None = None
) -> list[LayerData]:
    """Image layer data for ``image``, placed in mm and carrying its full geometry in the metadata.

    Each channel (DCE phase) shares one grey display window (robust percentiles over all channels), so contrast
    enhancement shows as brightening from phase to phase.

    Args:
        image: The image; ``array`` ``(C, *spatial)``.
        channels_as: ``"layers"``: one layer per channel (what napari's ``channel_axis=0`` does), named
            ``"<name> (<channel name>)"``; ``"axis"``: one layer ``(C, *spatial)`` with a slider over the channels
            (scale 1, translate 0 on that axis). A single-channel image always gives one layer ``(*spatial)``.
        name: Base layer name; the image's file name without suffix (:attr:`MedicalImage.name`) when None.

    Returns:
        ``[(data, kwargs, "image"), ...]``: ``data`` is a view of ``image.array``; ``kwargs`` has ``name``,
        ``scale``, ``translate``, ``metadata`` (:data:`METADATA_KEY` entry, see the module docstring),
        ``colormap="gray"``, ``contrast_limits``, ``blending`` and ``rgb=False``.

    Raises:
        ValueError: ``channels_as`` is not one of :data:`CHANNELS_AS`.
    """
    if channels_as not in CHANNELS_AS:
        raise ValueError(f"channels_as must be one of {CHANNELS_AS}, got {channels_as!r}")
    base_name = image.name if name is None else name
    scale, translate = image.geometry.napari_scale_translate()
    common = {"colormap": "gray", "contrast_limits": _display_window(image.array), "rgb": False}
    if image.num_channels == 1 or channels_as == "axis":
        single = image.num_channels == 1
        kwargs = {
            "name": base_name,
            "scale": tuple(scale) if single else (1.0, *scale),
            "translate": tuple(translate) if single else (0.0, *translate),
            "metadata": {METADATA_KEY: plugin_metadata(image, channel_index=0 if single else None)},
            "blending": "translucent_no_depth",
            **common,
        }
        return [(image.array[0] if single else image.array, kwargs, "image")]
    layers = []
    for index, channel_name in enumerate(image.channel_names):
        kwargs = {
            "name": f"{base_name} ({channel_name})",
            "scale": tuple(scale),
            "translate": tuple(translate),
            "metadata": {METADATA_KEY: plugin_metadata(image, channel_index=index)},
            "blending": "translucent_no_depth" if index == 0 else "translucent",
            **common,
        }
        layers.append((image.array[index], kwargs, "image"))
    return layers


def plugin_metadata(image: MedicalImage, *, channel_index: int | None = None) -> dict[str, Any]:
    """The :data:`METADATA_KEY` entry for a layer showing ``image`` (or one of its channels).

    Args:
        image: The image the layer shows.
        channel_index: The channel the layer shows, None when it shows all (a channel axis) or none (labels).

    Returns:
        ``{"affine", "spatial_shape", "source", "format", "channel_names", "channel_index", "series_uid",
        "source_files"}``: plain Python values (lists, str, int, None), so napari can copy and save them.
        ``source_files``: for a DICOM image, the files read, one list per channel the layer shows (so an export can
        record each file's sha256 without reading the series again); else None.
    """
    series_uids = image.metadata.get("series_uids") or []
    files = image.metadata.get("files") if image.format == "dicom" else None
    if files and channel_index is not None:
        files = [files[channel_index]] if channel_index < len(files) else None
    return {
        "affine": image.geometry.affine.tolist(),
        "spatial_shape": list(image.spatial_shape),
        "source": None if image.source is None else str(image.source),
        "format": image.format,
        "channel_names": list(image.channel_names),
        "channel_index": channel_index,
        # DICOM: the series read, so read_image(source, series_uid=...) reads the same image again (None: all).
        "series_uid": series_uids[0] if len(set(series_uids)) == 1 else None,
        "source_files": [[str(f) for f in channel] for channel in files] if files else None,
    }


def _display_window(array: np.ndarray) -> tuple[float, float]:
    """A grey window ``(low, high)`` from robust percentiles of (a regular grid sample of) the whole array."""
    step = max(1, math.ceil((array.size / _CONTRAST_SAMPLE_SIZE) ** (1.0 / max(array.ndim, 1))))
    sample = np.asarray(array[(slice(None, None, step),) * array.ndim]).reshape(-1)  # copies the sample only
    if sample.dtype.kind == "f":
        sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(sample, _CONTRAST_PERCENTILES))
    if high <= low:  # (nearly) constant or binary data: fall back to the full range
        low, high = float(sample.min()), float(sample.max())
    if high <= low:
        high = low + 1.0
    return low, high


# --------------------------------------------------------------------------------------------- geometry


def geometry_from_layer(layer_or_metadata: Any, spatial_ndim: int) -> ImageGeometry:
    """The geometry of a layer's last ``spatial_ndim`` axes, for writing its data to a file.

    Sources, first match wins:

    1. The :data:`METADATA_KEY` entry written by :func:`image_layer_data` / :func:`labels_layer_kwargs`: the file's
       exact affine (orientation included). When the layer's scale/translate (or data shape) are known too, they
       must still agree with it; a layer moved or resized since it was read raises rather than writing a file that
       is silently off.
    2. The layer's ``scale`` and ``translate`` (last ``spatial_ndim`` axes): spacing and origin survive, a negative
       scale becomes a flipped axis, but the *orientation* is lost: the array axes are taken as the world axes
       (identity direction), so a file written from it has an axis-aligned affine. A ``UserWarning`` says so.
       A layer with a rotation, shear or extra affine is refused (napari's world frame is not RAS+ then).

    Args:
        layer_or_metadata: A napari layer, the ``kwargs``/``meta`` dict of a layer data tuple (what npe2 writers
            get: ``metadata``, ``scale``, ``translate``, ...), a layer's ``metadata`` dict, or the
            :data:`METADATA_KEY` entry itself.
        spatial_ndim: Number of spatial axes (2 or 3); leading axes (channels, time) are ignored.

    Returns:
        The geometry (array order, RAS+ mm).

    Raises:
        ValueError: No geometry anywhere; metadata for another number of axes, or disagreeing with the layer's
            scale/translate/shape; a rotated or sheared layer; a scale of 0.
    """
    if spatial_ndim not in (2, 3):
        raise ValueError(f"spatial_ndim must be 2 or 3, got {spatial_ndim}")
    parts = _layer_parts(layer_or_metadata)
    entry = parts["entry"]
    if entry.get("affine") is not None:
        geometry = _geometry_from_entry(entry, spatial_ndim)
        _check_layer_agrees(geometry, entry, parts, spatial_ndim)
        return geometry
    if parts["scale"] is None:
        raise ValueError(
            f"No geometry for {parts['what']}: it has no {METADATA_KEY!r} metadata (layers opened with "
            "napari-mamba-seg have it) and no scale/translate. Pass the layer itself, or its layer data kwargs."
        )
    return _geometry_from_scale_translate(parts, spatial_ndim)


def _layer_parts(source: Any) -> dict[str, Any]:
    """``{"entry", "scale", "translate", "shape", "extra_transforms", "what"}`` from a layer, a dict of layer kwargs,
    a metadata dict or a plugin entry (missing parts are None / empty)."""
    if isinstance(source, Mapping):
        if "metadata" in source or "scale" in source:  # layer data kwargs / npe2 writer meta
            kwargs = source
            metadata = kwargs.get("metadata") or {}
            name = kwargs.get("name")
            return {
                "entry": dict(metadata.get(METADATA_KEY) or {}),
                "scale": kwargs.get("scale"),
                "translate": kwargs.get("translate"),
                "shape": None,
                "extra_transforms": _extra_transforms(kwargs.get("rotate"), kwargs.get("shear"), kwargs.get("affine")),
                "what": f"layer {name!r}" if name else "the layer",
            }
        entry = source.get(METADATA_KEY, source)
        return {
            "entry": dict(entry or {}),
            "scale": None,
            "translate": None,
            "shape": None,
            "extra_transforms": [],
            "what": "the metadata",
        }
    if hasattr(source, "metadata") and hasattr(source, "scale"):  # a napari layer (duck-typed: no napari import)
        affine = getattr(source, "affine", None)
        return {
            "entry": dict((source.metadata or {}).get(METADATA_KEY) or {}),
            "scale": source.scale,
            "translate": source.translate,
            "shape": None if getattr(source, "multiscale", False) else tuple(np.shape(source.data)),
            "extra_transforms": _extra_transforms(
                getattr(source, "rotate", None),
                getattr(source, "shear", None),
                getattr(affine, "affine_matrix", affine),
            ),
            "what": f"layer {getattr(source, 'name', '')!r}",
        }
    raise TypeError(
        f"expected a napari layer, a layer data kwargs dict or a metadata dict, got {type(source).__name__}"
    )


def _extra_transforms(rotate: Any, shear: Any, affine: Any) -> list[str]:
    """Names of the non-identity transforms among a layer's rotate, shear and extra affine."""
    found = []
    if rotate is not None and not np.allclose(np.asarray(rotate, dtype=float), np.eye(np.shape(rotate)[0])):
        found.append("rotate")
    if shear is not None and np.size(shear) and not np.allclose(np.asarray(shear, dtype=float), 0.0):
        found.append("shear")
    if affine is not None and not np.allclose(np.asarray(affine, dtype=float), np.eye(np.shape(affine)[0])):
        found.append("affine")
    return found


def _geometry_from_entry(entry: Mapping[str, Any], spatial_ndim: int) -> ImageGeometry:
    geometry = ImageGeometry(np.asarray(entry["affine"], dtype=np.float64))
    if geometry.spatial_dims != spatial_ndim:
        raise ValueError(
            f"The layer's {METADATA_KEY!r} metadata describes a {geometry.spatial_dims}D image, but the data to "
            f"write has {spatial_ndim} spatial axes; the metadata belongs to another image. Write labels with the "
            "shape of the image they were drawn on, or remove the metadata entry."
        )
    return geometry


def _check_layer_agrees(
    geometry: ImageGeometry, entry: Mapping[str, Any], parts: Mapping[str, Any], spatial_ndim: int
) -> None:
    """ValueError when the layer's scale, translate or shape no longer match the geometry in its metadata."""
    what = parts["what"]
    expected_shape = entry.get("spatial_shape")
    if parts["shape"] is not None and expected_shape is not None:
        shape = tuple(parts["shape"][-spatial_ndim:])
        if shape != tuple(expected_shape):
            raise ValueError(
                f"{what} has spatial shape {shape} but its {METADATA_KEY!r} metadata describes an image of shape "
                f"{tuple(expected_shape)}; it no longer lies on that image's voxel grid. Resample it onto the image, "
                "or remove the metadata entry to use the layer's scale and translate."
            )
    if parts["scale"] is None:
        return
    scale = np.asarray(parts["scale"], dtype=float)[-spatial_ndim:]
    translate = np.asarray(parts["translate"] if parts["translate"] is not None else np.zeros(spatial_ndim))
    translate = translate.astype(float)[-spatial_ndim:]
    expected_scale, expected_translate = (np.asarray(v) for v in geometry.napari_scale_translate())
    scale_ok = np.allclose(scale, expected_scale, rtol=_SCALE_RTOL, atol=0.0)
    translate_ok = np.allclose(translate, expected_translate, rtol=0.0, atol=_TRANSLATE_ATOL_MM)
    if not (scale_ok and translate_ok) or parts["extra_transforms"]:
        moved = ", ".join(parts["extra_transforms"]) or "scale/translate"
        raise ValueError(
            f"{what} was moved or rescaled in napari ({moved}: scale {scale.tolist()}, translate "
            f"{translate.tolist()}) but its {METADATA_KEY!r} metadata says the image has spacing "
            f"{expected_scale.tolist()} and origin {expected_translate.tolist()} mm; writing it would put the voxels "
            "in the wrong place. Reset the layer's scale/translate, or remove the metadata entry to use the layer's "
            "own scale and translate."
        )


def _geometry_from_scale_translate(parts: Mapping[str, Any], spatial_ndim: int) -> ImageGeometry:
    what = parts["what"]
    if parts["extra_transforms"]:
        raise ValueError(
            f"{what} has a {', '.join(parts['extra_transforms'])} transform and no {METADATA_KEY!r} metadata; its "
            "geometry cannot be written faithfully. Remove the rotation/shear/affine, or open the image with "
            "napari-mamba-seg so the file's geometry is kept."
        )
    scale = np.asarray(parts["scale"], dtype=float)
    if scale.size < spatial_ndim:
        raise ValueError(f"{what} has {scale.size} axes; {spatial_ndim} spatial axes are needed")
    scale = scale[-spatial_ndim:]
    translate = parts["translate"]
    translate = np.zeros(spatial_ndim) if translate is None else np.asarray(translate, dtype=float)[-spatial_ndim:]
    if np.any(scale == 0) or not np.all(np.isfinite(scale)) or not np.all(np.isfinite(translate)):
        raise ValueError(f"{what} has an unusable scale {scale.tolist()} / translate {translate.tolist()}")
    warnings.warn(
        f"{what} has no {METADATA_KEY!r} geometry metadata: using its scale {scale.tolist()} (mm) and translate "
        f"{translate.tolist()} (mm) with the array axes as the world axes. Spacing and origin are kept; the "
        "orientation (direction cosines) of the original scan is lost. Open the image with napari-mamba-seg to "
        "keep it.",
        UserWarning,
        stacklevel=3,
    )
    return ImageGeometry.from_spacing(np.abs(scale), translate, np.diag(np.sign(scale)))


# --------------------------------------------------------------------------------------------- labels


def class_colors(num_classes: int) -> dict[int | None, tuple[float, float, float, float]]:
    """Fixed RGBA colours (0-1) per label value: 0 transparent, 1.. from a 20-colour palette, ``None`` grey.

    Beyond the palette, colours continue along the golden-angle hue sequence (still distinct, less so).

    Args:
        num_classes: Number of classes including background (label values ``0 .. num_classes - 1``).

    Returns:
        ``{0: transparent, 1: rgba, ..., None: grey}``, a direct label colormap napari accepts as ``colormap``
        (the ``None`` entry colours label values outside the class list).
    """
    colors: dict[int | None, tuple[float, float, float, float]] = {None: _UNLISTED_LABEL_RGBA, 0: _TRANSPARENT}
    for label in range(1, num_classes):
        if label <= len(_CLASS_PALETTE_RGB):
            red, green, blue = (c / 255.0 for c in _CLASS_PALETTE_RGB[label - 1])
        else:
            hue = (label * 0.618033988749895) % 1.0
            red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
        colors[label] = (red, green, blue, 1.0)
    return colors


def labels_layer_kwargs(class_names: Sequence[str], *, like: MedicalImage | Any | None = None) -> dict[str, Any]:
    """Keyword arguments for a napari Labels layer that names and colours the classes.

    ``napari.layers.Labels(labels, **labels_layer_kwargs(names, like=image_layer))`` (or ``viewer.add_labels``)
    gives a layer whose status bar shows ``class: <name>`` under the cursor, with fixed colours per class
    (:func:`class_colors`; background transparent) and, with ``like``, the image's scale/translate and geometry
    metadata, so saving it with the napari-mamba-seg writers reproduces the image's affine.

    Args:
        class_names: One name per label value, index = value; ``class_names[0]`` is the background.
        like: The image the labels belong to: a :class:`MedicalImage`, a napari layer or layer data kwargs made by
            :func:`image_layer_data` (with or without a channel axis). Without its metadata, its scale/translate
            (last 2 or 3 axes) are copied and no geometry metadata is added.

    Returns:
        ``{"features": {"index": (n,) int array, "class": [names]}, "colormap": {value: rgba, None: rgba},
        "metadata": {METADATA_KEY: {"class_names": [...], ...geometry}}}`` plus ``"scale"`` and ``"translate"``
        when ``like`` is given.

    Raises:
        ValueError: Empty or non-string class names, or duplicates.
    """
    names = [str(name) for name in class_names]
    if not names or len(set(names)) != len(names) or not all(names):
        raise ValueError(f"class_names must be distinct non-empty names, background first; got {list(class_names)}")
    entry: dict[str, Any] = {"class_names": names}
    kwargs: dict[str, Any] = {
        "features": {"index": np.arange(len(names)), "class": names},
        "colormap": class_colors(len(names)),
    }
    if like is not None:
        placement, image_entry = _placement_of(like)
        kwargs.update(placement)
        entry.update(image_entry)
    kwargs["metadata"] = {METADATA_KEY: entry}
    return kwargs


def _placement_of(like: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``({"scale", "translate"}, geometry entry for the labels)`` of the spatial axes of ``like``."""
    if isinstance(like, MedicalImage):
        scale, translate = like.geometry.napari_scale_translate()
        entry = plugin_metadata(like, channel_index=None)
    else:
        parts = _layer_parts(like)
        image_entry = parts["entry"]
        if image_entry.get("affine") is not None:
            spatial_ndim = len(image_entry["affine"]) - 1
            scale, translate = geometry_from_layer(like, spatial_ndim).napari_scale_translate()
            entry = {key: value for key, value in image_entry.items() if key != "class_names"}
            entry["channel_index"] = None
        else:
            if parts["scale"] is None:
                raise ValueError(f"{parts['what']} has no scale/translate to copy")
            scale_all = np.asarray(parts["scale"], dtype=float)
            spatial_ndim = 3 if scale_all.size >= 3 else scale_all.size
            scale = tuple(float(v) for v in scale_all[-spatial_ndim:])
            translate_all = parts["translate"] if parts["translate"] is not None else np.zeros(spatial_ndim)
            translate = tuple(float(v) for v in np.asarray(translate_all, dtype=float)[-spatial_ndim:])
            entry = {}
    return {"scale": tuple(scale), "translate": tuple(translate)}, entry


def recovery_key(metadata: Mapping[str, Any] | None, shape: tuple[int, ...], name: str) -> str:
    """The recovery-journal key of a Labels layer (:func:`napari_mamba_seg.interactive.journal_key` of its source
    file, shape, affine and name): the Correct widget journals under it, and saving the layer discards it."""
    from napari_mamba_seg.interactive import journal_key

    entry = (metadata or {}).get(METADATA_KEY) or {}
    return journal_key(entry.get("source"), tuple(shape), entry.get("affine"), name)


def review_of(layer: Any) -> ReviewState | None:
    """The reviewed slices stored in a Labels layer's metadata by the Correct widget (None: nothing ever marked).

    Raises:
        ValueError: A damaged record, or one for labels of another shape; the message names the layer.
    """
    from napari_mamba_seg.interactive.review import REVIEW_METADATA_KEY, ReviewState  # scipy: only when needed

    record = (layer.metadata or {}).get(REVIEW_METADATA_KEY)
    if record is None:
        return None
    try:
        state = ReviewState.from_dict(record)
        state.check_fits(np.shape(layer.data))
    except ValueError as error:
        raise ValueError(f"layer {layer.name!r}: {error}") from error
    return state
