"""The Export widget's work without Qt: turn a corrected Labels layer (and, for an nnU-Net case, its image layers)
into a call of :func:`napari_mamba_seg.io.export_labels`.

What each format needs from napari:

* NIfTI / TIFF: the labels and their geometry (the layer's :data:`METADATA_KEY` entry); a NIfTI source that still
  exists lends its header, so the labels carry its qform/sform bit for bit; a DICOM source's files, as the reader
  listed them, are hashed into the provenance record one by one.
* DICOM-SEG: the source series' files (the SEG references their instances), so the source is read again from the
  folder named in the metadata (in the worker thread); it must still hold the same slices on the same grid.
* nnU-Net: the image channels too: the image layers the labels were segmented from (or the ones chosen).

The labels are copied when the request is made (in the UI thread), so editing the layer during an export changes
nothing in the files. Imports numpy and :mod:`napari_mamba_seg.io` only: never napari, Qt or torch.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_mamba_seg._napari._layer_data import METADATA_KEY, geometry_from_layer, review_of
from napari_mamba_seg.interactive.review import ReviewState
from napari_mamba_seg.io import ImageGeometry, MedicalImage

__all__ = [
    "EXPORT_CHOICES",
    "SEGMENTATION_KEY",
    "ExportRequest",
    "default_target",
    "export_job",
    "export_request",
    "source_image",
]

EXPORT_CHOICES = {
    "NIfTI (.nii.gz)": "nifti",
    "OME-TIFF (.ome.tif)": "tiff",
    "DICOM-SEG (.dcm)": "dicom-seg",
    "nnU-Net v2 data set (folder)": "nnunet",
}
"""Format menu text → format name of :func:`~napari_mamba_seg.io.export_labels`."""
FILE_SUFFIXES = {"nifti": ".nii.gz", "tiff": ".ome.tif", "dicom-seg": ".dcm"}
SEGMENTATION_KEY = "napari_mamba_seg_segmentation"
"""The Segment widget's record in a result layer's metadata (model, model_sha256, image_layers)."""
_GEOMETRY_ATOL_MM = 1e-3


@dataclass
class ExportRequest:
    """Everything one export needs, gathered from the layers in the UI thread.

    Attributes:
        layer_name: The Labels layer's name.
        labels: ``(*spatial)`` copy of the layer's labels.
        geometry: Their geometry (from the layer's metadata, or its scale/translate).
        entry: The layer's :data:`METADATA_KEY` entry (source file, format, series UID, class names...).
        class_names: One name per label value, background first.
        target: The file (NIfTI, TIFF, DICOM-SEG) or data set folder (nnU-Net).
        format: A value of :data:`EXPORT_CHOICES`.
        review: The layer's reviewed slices, or None when nothing was marked.
        reviewed_only: Export only the reviewed slices (with the review mask).
        case_name: nnU-Net case name (sanitised by the exporter); None = the layer's name.
        channels: nnU-Net: ``(C, *spatial)`` image channels; None for the other formats.
        channel_names: Their names.
        provenance: What the plugin knows of the labels' history (model, its sha256, image layers, layer name).
        overwrite: Replace existing files.
    """

    layer_name: str
    labels: np.ndarray
    geometry: ImageGeometry
    entry: dict[str, Any]
    class_names: list[str]
    target: Path
    format: str
    review: ReviewState | None = None
    reviewed_only: bool = False
    case_name: str | None = None
    channels: np.ndarray | None = None
    channel_names: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False


def default_target(layer_name: str, format: str, folder: str | Path | None) -> Path:
    """A file name for the export of ``layer_name`` in ``folder`` (the home folder when None), safe on every OS.

    nnU-Net exports go to a data set folder the user chooses; this proposes ``Dataset001_<name>``.
    """
    from napari_mamba_seg.io.nnunet import sanitize_case_name

    base = Path(folder) if folder else Path.home()
    stem = sanitize_case_name(layer_name)
    if format == "nnunet":
        return base / f"Dataset001_{stem}"
    return base / f"{stem}{FILE_SUFFIXES[format]}"


def export_request(
    labels_layer: Any,
    target: str | Path,
    format: str,
    *,
    image_layers: Sequence[Any] = (),
    reviewed_only: bool = False,
    case_name: str | None = None,
    overwrite: bool = False,
) -> ExportRequest:
    """Gather an export of ``labels_layer`` (checked and copied here; written later by :func:`export_job`).

    Args:
        labels_layer: A napari Labels layer (or anything with ``name``, ``data``, ``metadata``, ``scale``...).
        target: The target file, or the data set folder for nnU-Net.
        format: A value of :data:`EXPORT_CHOICES`.
        image_layers: nnU-Net: the image layers, in channel order (default: those the labels were segmented from).
        reviewed_only: Export only the reviewed slices, with the review mask.
        case_name: nnU-Net case name; None = the layer's name.
        overwrite: Replace existing files of the export.

    Returns:
        The request.

    Raises:
        ValueError: An unknown format, no target, labels that are not integer 2D/3D, a damaged review record,
            missing image layers for an nnU-Net case, or image layers off the labels' grid. Nothing is written.
    """
    if format not in EXPORT_CHOICES.values():
        raise ValueError(f"unknown export format {format!r}; choose one of {sorted(EXPORT_CHOICES.values())}")
    if not str(target).strip():
        raise ValueError("choose where to export: a file, or a data set folder for nnU-Net")
    name = labels_layer.name
    labels = np.array(labels_layer.data, copy=True)
    if labels.ndim not in (2, 3) or labels.dtype.kind not in "biu":
        raise ValueError(
            f"layer {name!r}: labels must be 2D or 3D integers, got shape {labels.shape} and dtype {labels.dtype}"
        )
    entry = dict((labels_layer.metadata or {}).get(METADATA_KEY) or {})
    geometry = geometry_from_layer(labels_layer, labels.ndim)
    record = dict((labels_layer.metadata or {}).get(SEGMENTATION_KEY) or {})
    request = ExportRequest(
        layer_name=name,
        labels=labels,
        geometry=geometry,
        entry=entry,
        class_names=_class_names(entry, labels),
        target=Path(target).expanduser(),
        format=format,
        review=review_of(labels_layer),
        reviewed_only=reviewed_only,
        case_name=case_name or None,
        provenance=_provenance(name, record),
        overwrite=overwrite,
    )
    if format == "nnunet":
        request.channels, request.channel_names = _channels(labels_layer, image_layers, record, labels.shape)
    return request


def _class_names(entry: dict[str, Any], labels: np.ndarray) -> list[str]:
    """The layer's class names; for labels made elsewhere, ``background, class 1, ...`` up to the largest value."""
    names = entry.get("class_names")
    if names:
        return [str(name) for name in names]
    highest = int(labels.max()) if labels.size else 0
    return ["background", *(f"class {value}" for value in range(1, max(highest, 1) + 1))]


def _provenance(layer_name: str, record: dict[str, Any]) -> dict[str, Any]:
    facts: dict[str, Any] = {"labels_layer": layer_name, "exported_from": "napari (napari-mamba-seg Export widget)"}
    if record:
        facts["segmented_with"] = {
            "model": record.get("model"),
            "model_sha256": record.get("model_sha256"),
            "image_layers": list(record.get("image_layers") or []),
        }
    return facts


def _channels(
    labels_layer: Any, image_layers: Sequence[Any], record: dict[str, Any], shape: tuple[int, ...]
) -> tuple[np.ndarray, list[str]]:
    """``((C, *spatial) channels, names)`` for an nnU-Net case, from the image layers."""
    from napari_mamba_seg._napari._segment import model_input_from_layers

    if not image_layers:
        raise ValueError(
            f"an nnU-Net case needs the image too: choose the image layers of {labels_layer.name!r} "
            f"(it was segmented from {record.get('image_layers') or 'layers that are not recorded'})"
        )
    model_input = model_input_from_layers(image_layers)
    if model_input.image.shape[1:] != tuple(shape):
        raise ValueError(
            f"the image layers {model_input.names} have the shape {model_input.image.shape[1:]}, the labels "
            f"{labels_layer.name!r} {tuple(shape)}: choose the image the labels were drawn on"
        )
    if not np.allclose(model_input.spacing, labels_layer.scale[-len(shape) :], rtol=1e-4):
        raise ValueError(
            f"the image layers {model_input.names} (scale {model_input.spacing}) and the labels {labels_layer.name!r} "
            f"(scale {tuple(labels_layer.scale)}) lie on different grids: choose the image the labels were drawn on"
        )
    return np.array(model_input.image, copy=True), _channel_names(image_layers, model_input.image.shape[0])


def _channel_names(image_layers: Sequence[Any], num_channels: int) -> list[str]:
    """The channel names the reader recorded, when they name each channel once; else the layer names (or none)."""
    entries = [(layer.metadata or {}).get(METADATA_KEY) or {} for layer in image_layers]
    if len(image_layers) == 1 and num_channels > 1:  # one layer with a channel axis
        recorded = [str(name) for name in entries[0].get("channel_names") or []]
    else:
        recorded = [_recorded_name(entry) or layer.name for entry, layer in zip(entries, image_layers, strict=True)]
    return recorded if len(recorded) == num_channels and len(set(recorded)) == num_channels else []


def _recorded_name(entry: dict[str, Any]) -> str | None:
    index, names = entry.get("channel_index"), entry.get("channel_names") or []
    return str(names[index]) if isinstance(index, int) and 0 <= index < len(names) else None


def source_image(request: ExportRequest) -> MedicalImage:
    """The source image the exporter writes against (may read the source series from disk).

    Raises:
        ValueError: DICOM-SEG for labels whose source is not a DICOM series that still exists with the same grid.
    """
    if request.format == "dicom-seg":
        return _dicom_source(request)
    source = request.entry.get("source")
    source_path = Path(source) if source else None
    fmt = request.entry.get("format") or "array"
    metadata: dict[str, Any] = {}
    header = _nifti_header(request) if fmt == "nifti" else None
    if header is not None:
        metadata["nifti_header"] = header
    if fmt == "dicom" and request.entry.get("source_files"):
        metadata["files"] = request.entry["source_files"]  # the provenance records each file's sha256
    if request.channels is not None:
        array = request.channels
        names = request.channel_names or [f"channel {c}" for c in range(array.shape[0])]
    else:  # only the grid is used: a zero-size-in-memory stand-in of the right shape
        array = np.broadcast_to(np.zeros((), dtype=np.uint8), (1, *request.labels.shape))
        names = ["labels grid"]
    return MedicalImage(array, request.geometry, names, source=source_path, format=fmt, metadata=metadata)


def _nifti_header(request: ExportRequest) -> Any:
    """The header of the NIfTI source when it still exists with the labels' grid, else None."""
    source = request.entry.get("source")
    if not source or not Path(source).is_file():
        return None
    import nibabel as nib

    try:
        header = nib.load(source).header.copy()
        geometry = ImageGeometry.from_nifti_affine(header.get_best_affine())
    except Exception:  # changed into something unreadable: the metadata's geometry is written
        return None
    voxel_shape = tuple(int(n) for n in header.get_data_shape()[: request.labels.ndim])
    if voxel_shape[::-1] != request.labels.shape or not geometry.is_close(request.geometry):
        return None
    return header


def _dicom_source(request: ExportRequest) -> MedicalImage:
    from napari_mamba_seg.io import read_image

    source, fmt = request.entry.get("source"), request.entry.get("format")
    if fmt != "dicom" or not source:
        raise ValueError(
            f"layer {request.layer_name!r} was not read from a DICOM series (its source: {source or 'none'}, "
            f"{fmt or 'unknown format'}); a DICOM-SEG must reference the DICOM images it segments: export it as "
            "NIfTI or TIFF instead"
        )
    if not Path(source).exists():
        raise ValueError(
            f"the DICOM series {source} of layer {request.layer_name!r} is gone; the DICOM-SEG must reference its "
            "files: put the series back there, or export as NIfTI or TIFF"
        )
    image = read_image(source, series_uid=request.entry.get("series_uid"))
    if image.spatial_shape != request.labels.shape or not image.geometry.is_close(
        request.geometry, atol=_GEOMETRY_ATOL_MM
    ):
        raise ValueError(
            f"the DICOM series {source} no longer matches layer {request.layer_name!r} (shape {image.spatial_shape} "
            f"vs {request.labels.shape}, or another position): the SEG would point at the wrong slices; open the "
            "series again and redo the export, or export as NIfTI"
        )
    return image


def export_job(request: ExportRequest) -> Generator[str, None, Any]:
    """Write the export: yields what it is doing, returns the :class:`~napari_mamba_seg.io.ExportResult`.

    Raises:
        ValueError, PermissionError, FileExistsError: From :func:`~napari_mamba_seg.io.export_labels` or
            :func:`source_image`; nothing is written then.
    """
    from napari_mamba_seg.io import export_labels

    yield "reading the source series" if request.format == "dicom-seg" else "checking the export"
    source = source_image(request)
    yield f"writing {request.target}"
    return export_labels(
        request.labels,
        source,
        request.target,
        class_names=request.class_names,
        format=request.format,
        review=request.review,
        reviewed_only=request.reviewed_only,
        case_name=request.case_name or request.layer_name,
        channel_names=request.channel_names or None,
        provenance=request.provenance,
        overwrite=request.overwrite,
    )
