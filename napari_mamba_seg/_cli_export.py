"""``napari-mamba-seg export``: export corrected labels from files as NIfTI, TIFF, DICOM-SEG or an nnU-Net case
(what the Export widget does, from a script). Standard library only at import time; numpy and the readers are
imported when the command runs (torch only for ``--model``, to read the bundle's card).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = (
    "Export the labels drawn on an image for a retraining pipeline, with a provenance record (source files and "
    "exported files with their sha256, classes, reviewed slices, software version, model). -o names a .nii.gz/.nii, "
    ".ome.tif/.tif, .dcm (DICOM-SEG: the image must be a DICOM series) file or, for nnU-Net, the data set folder "
    "(created when missing; the case is appended). --labels is a NIfTI/TIFF file on the image's grid or a DICOM-SEG "
    "of the image. --reviewed (slice indices like 10,20,31 along --axis, or a JSON review record {'axis', "
    "'num_slices', 'reviewed'} as the Correct widget stores it) is recorded; with --reviewed-only only those slices "
    "are exported: other slices are 0 with a <name>_reviewed mask beside the labels (NIfTI/TIFF), or nnU-Net's "
    "'ignore' label. Nothing is overwritten without --overwrite, and a refused export writes nothing. Exit status: 0 "
    "exported, 2 usage or data error (one line on stderr), 130 interrupted."
)
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, MemoryError, ImportError)
"""As ``inference.files.USER_ERRORS`` (which imports torch), plus ImportError: highdicom missing for DICOM-SEG."""
_SEG_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.66"  # Segmentation Storage (.4) and Label Map Segmentation (.7)
FORMAT_CHOICES = ("nifti", "tiff", "dicom-seg", "nnunet")
"""``io.export.EXPORT_FORMATS``, spelled out: ``--help`` imports no numpy or nibabel (a test keeps them equal)."""


def add_export_parser(subcommands: argparse._SubParsersAction) -> None:
    """Register ``export``."""
    parser = subcommands.add_parser(
        "export", help="export corrected labels as NIfTI, TIFF, DICOM-SEG or an nnU-Net case", description=DESCRIPTION
    )
    parser.add_argument("--image", required=True, metavar="SRC", help="the image the labels were drawn on")
    parser.add_argument("--labels", required=True, metavar="LABELS", help="the labels file (or DICOM-SEG)")
    parser.add_argument("--output", "-o", required=True, metavar="TARGET", help="labels file or nnU-Net folder")
    parser.add_argument("--format", choices=FORMAT_CHOICES, default=None, help="default: from TARGET's suffix")
    parser.add_argument(
        "--class-names",
        metavar="A,B,C",
        help="one name per label value, background first (default: the DICOM-SEG's segments, the labels file's "
        "provenance record, the --model's classes, or 'background,class 1,...')",
    )
    parser.add_argument("--reviewed", metavar="SLICES_OR_JSON", help="reviewed slices: 10,20,31 or a review .json")
    parser.add_argument("--axis", default="auto", help="slice axis of --reviewed indices: auto (coarsest) or 0-2")
    parser.add_argument("--reviewed-only", action="store_true", help="export only the reviewed slices")
    parser.add_argument("--case-name", metavar="NAME", help="nnU-Net case name (default: the image's name)")
    parser.add_argument("--channel-names", metavar="A,B", help="nnU-Net channel names (default: the image's)")
    parser.add_argument("--series", metavar="UID", help="SeriesInstanceUID when the DICOM folder holds several")
    parser.add_argument(
        "--model", "-m", metavar="NAME_OR_FOLDER", help="the model bundle that made the labels (recorded with its sha)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export of the same files")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    """Read the image and the labels, export them, print the files written; one line per user error."""
    from napari_mamba_seg.cli import _one_line
    from napari_mamba_seg.io import export_labels

    try:
        image, labels, label_names = read_inputs(args)
        facts, model_classes = _model_facts(args.model)
        facts["exported_from"] = "command line (napari-mamba-seg export)"
        facts["labels_file"] = str(Path(args.labels).absolute())
        result = export_labels(
            labels,
            image,
            args.output,
            class_names=_class_names(args, labels, label_names or model_classes),
            format=args.format,
            review=_review(args, image) if args.reviewed else None,
            reviewed_only=args.reviewed_only,
            case_name=args.case_name,
            channel_names=_split(args.channel_names) if args.channel_names else None,
            provenance=facts,
            overwrite=args.overwrite,
            progress=None if args.quiet else _print_progress,
        )
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return 130
    except _USER_ERRORS as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    for path in (*result.files, result.provenance_file):
        print(f"wrote {path}")
    if result.case_name is not None:
        print(f"nnU-Net case {result.case_name!r} in {args.output}")
    return 0


def _print_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_inputs(args: argparse.Namespace) -> tuple[Any, Any, list[str] | None]:
    """``(image, labels (*spatial) integers, class names from the labels file or None)``."""
    from napari_mamba_seg.io import read_image

    image = read_image(args.image, series_uid=args.series)
    labels_path = Path(args.labels)
    if _is_dicom_seg(labels_path):
        from napari_mamba_seg.io import read_dicom_seg

        labels, segments = read_dicom_seg(labels_path, reference=image if image.format == "dicom" else None)
        if labels.shape != image.spatial_shape:
            raise ValueError(
                f"{labels_path}: the DICOM-SEG's labels have shape {labels.shape} but {args.image} has "
                f"{image.spatial_shape}; give the DICOM series the SEG was made from as --image"
            )
        return image, labels, ["background", *segments]
    labels_image = read_image(labels_path)
    if labels_image.num_channels != 1:
        raise ValueError(f"{labels_path} holds {labels_image.num_channels} channels; a labels file holds one volume")
    if labels_image.spatial_shape != image.spatial_shape or not labels_image.geometry.is_close(image.geometry):
        raise ValueError(
            f"{labels_path} (shape {labels_image.spatial_shape}, {labels_image.geometry}) does not lie on the voxel "
            f"grid of {args.image} (shape {image.spatial_shape}, {image.geometry}); resample the labels onto the "
            "image first"
        )
    return image, _integer_labels(labels_image.array[0], labels_path), _recorded_class_names(labels_path)


def _is_dicom_seg(path: Path) -> bool:
    """Whether ``path`` is a DICOM Segmentation file (not an image series)."""
    from napari_mamba_seg.io import is_dicom_file

    if not path.is_file() or not is_dicom_file(path):
        return False
    import pydicom

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # unreadable: read_image reports it properly
        return False
    return str(header.get("SOPClassUID", "")).startswith(_SEG_SOP_CLASS_PREFIX)


def _integer_labels(array: Any, path: Path) -> Any:
    """Integer labels; float files with whole values (as some tools write them) are converted."""
    import numpy as np

    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise ValueError(f"{path} holds non-integer values; a labels file holds whole class numbers")
        return array.astype(np.int32)
    return array


def _recorded_class_names(labels_path: Path) -> list[str] | None:
    """The class names in the provenance record written beside an exported labels file, if any."""
    from napari_mamba_seg.io.export import PROVENANCE_SUFFIX

    record = labels_path.with_name(labels_path.name + PROVENANCE_SUFFIX)
    try:
        names = json.loads(record.read_text(encoding="utf-8")).get("class_names")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(name) for name in names] if isinstance(names, list) else None


def _class_names(args: argparse.Namespace, labels: Any, known: list[str] | None) -> list[str]:
    if args.class_names:
        return _split(args.class_names)
    highest = int(labels.max()) if labels.size else 0
    if known and len(known) > highest:
        return list(known)
    return ["background", *(f"class {value}" for value in range(1, max(highest, 1) + 1))]


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",")]


def _review(args: argparse.Namespace, image: Any) -> Any:
    """The :class:`ReviewState` of ``--reviewed`` (indices along ``--axis``, or a JSON record)."""
    from napari_mamba_seg._cli_finetune import _review as parse_review

    shape = image.spatial_shape
    if args.axis == "auto":  # the coarsest axis, the lowest on ties: as inference.predictor.slice_axis_for
        spacing = image.geometry.spacing
        axis = max(range(len(spacing)), key=lambda index: (spacing[index], -index))
    else:
        try:
            axis = int(args.axis)
        except ValueError:
            raise ValueError(f"--axis must be 'auto' or a spatial axis 0-{len(shape) - 1}, got {args.axis!r}") from None
        if not 0 <= axis < len(shape):
            raise ValueError(f"--axis must be 'auto' or a spatial axis 0-{len(shape) - 1}, got {axis}")
    return parse_review(args.reviewed, axis, shape)


def _model_facts(model: str | None) -> tuple[dict[str, Any], list[str] | None]:
    """``({"segmented_with": {model, model_sha256, architecture}}, the card's class names)``, or nothing."""
    if not model:
        return {}, None
    from napari_mamba_seg.bundles import read_card

    card = read_card(model)
    facts = {"model": model, "model_sha256": card.sha256, "model_architecture": card.architecture}
    return {"segmented_with": facts}, list(card.class_names) or None
