"""Training cases: an image, its labels and which voxels of the labels are trusted; in memory or from an nnU-Net v2
raw folder.

A :class:`TrainingCase` holds one case in memory. :class:`NnUNetRawDataset` reads the cases of an nnU-Net v2 raw
data set folder one at a time, on access (``dataset[i]``), so a folder larger than the memory can be streamed;
:func:`load_nnunet_raw` reads them all.

nnU-Net v2 raw layout (what :class:`NnUNetRawDataset` reads)::

    Dataset001_Breast/
        dataset.json     {"channel_names": {"0": "pre", "1": "post"}, "labels": {"background": 0, "lesion": 1},
                          "numTraining": 2, "file_ending": ".nii.gz"}
        imagesTr/        <case>_0000.nii.gz, <case>_0001.nii.gz, ...   (one file per channel)
        labelsTr/        <case>.nii.gz

An ``"ignore"`` entry in ``labels`` (nnU-Net's partial-annotation label, the highest value) marks voxels whose label
is unknown: they become ``trusted=False`` (and label 0) in the case.

This module imports numpy and :mod:`napari_mamba_seg.io` only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

from napari_mamba_seg._spacing import checked_spacing
from napari_mamba_seg.io import MedicalImage, read_image

__all__ = ["NnUNetRawDataset", "TrainingCase", "load_nnunet_raw"]

IGNORE_LABEL_NAME = "ignore"
_GEOMETRY_ATOL_MM = 1e-3


@dataclass
class TrainingCase:
    """One training (or validation) case in memory.

    Attributes:
        image: ``(C, *spatial)`` image, channels first, spatial axes in array order (2 or 3 of them); any real
            dtype (normalised by the data set as the model card says, never modified).
        labels: ``(*spatial)`` integer (or bool) class indices, 0 = background.
        trusted: ``(*spatial)`` bool: True where the label is known to be right (e.g. reviewed slices); voxels with
            False contribute nothing to the loss or the metrics. None = every voxel trusted.
        spacing: Voxel size in mm per spatial axis (array order); None when unknown. Chooses the slice axis of 2D
            models (the coarsest axis) and the resampling when the card asks for it.
        name: A short name for messages and the model card.

    Raises:
        ValueError: Shapes that do not match, non-integer labels, a non-bool trust mask or a bad spacing; the message
            names the case.
    """

    image: np.ndarray
    labels: np.ndarray
    trusted: np.ndarray | None = None
    spacing: tuple[float, ...] | None = None
    name: str = "case"

    def __post_init__(self) -> None:
        """Check the shapes, dtypes and spacing."""
        self.image = np.asarray(self.image)
        self.labels = np.asarray(self.labels)
        name = self.name
        if self.image.ndim not in (3, 4) or self.image.dtype.kind not in "biuf":
            raise ValueError(
                f"case {name!r}: image must be a real array (C, H, W) or (C, D, H, W) with the channels first, got "
                f"shape {self.image.shape} and dtype {self.image.dtype}; add a channel axis with image[None]"
            )
        spatial = self.image.shape[1:]
        if self.labels.shape != spatial:
            raise ValueError(
                f"case {name!r}: labels have shape {self.labels.shape} but the image's spatial shape is {spatial} "
                "(image is channels first); they must lie on the same voxel grid"
            )
        if self.labels.dtype.kind not in "biu":
            raise ValueError(
                f"case {name!r}: labels must be integers, got dtype {self.labels.dtype}; convert them, e.g. "
                "np.rint(labels).astype(np.uint8)"
            )
        if self.trusted is not None:
            self.trusted = np.asarray(self.trusted)
            if self.trusted.dtype != bool or self.trusted.shape != spatial:
                raise ValueError(
                    f"case {name!r}: trusted must be a bool array of the spatial shape {spatial}, got shape "
                    f"{self.trusted.shape} and dtype {self.trusted.dtype}"
                )
        if self.spacing is not None:
            self.spacing = checked_spacing(self.spacing, len(spatial), name=f"case {name!r}: spacing")

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """The spatial shape (array order)."""
        return tuple(self.image.shape[1:])

    @property
    def num_channels(self) -> int:
        """Number of image channels."""
        return int(self.image.shape[0])

    @classmethod
    def from_images(
        cls,
        image: MedicalImage,
        labels: MedicalImage | np.ndarray,
        trusted: np.ndarray | None = None,
        *,
        name: str | None = None,
    ) -> TrainingCase:
        """A case from an image read with :func:`napari_mamba_seg.io.read_image` and its labels.

        Args:
            image: The image; its spacing is taken from its geometry.
            labels: ``(*spatial)`` labels, or a one-channel :class:`MedicalImage` on the same voxel grid.
            trusted: ``(*spatial)`` bool trust mask, or None.
            name: Case name; the image's name when None.

        Raises:
            ValueError: The labels lie on another voxel grid than the image.
        """
        name = name or image.name
        if isinstance(labels, MedicalImage):
            _check_same_grid(labels, image, f"labels of case {name!r}", f"its image {image.source or name}")
            labels = _single_channel(labels, f"labels of case {name!r}")
        return cls(image.array, labels, trusted, image.geometry.spacing, name)


# --------------------------------------------------------------------------------------------- nnU-Net raw folders


class NnUNetRawDataset(Sequence[TrainingCase]):
    """The training cases of an nnU-Net v2 raw data set folder, each read from disk when accessed.

    The folder's structure (dataset.json, every channel file and every label file) is checked when the data set is
    opened; the voxel data when a case is read.

    Args:
        folder: The data set folder (holding ``dataset.json``, ``imagesTr/`` and ``labelsTr/``).

    Attributes:
        folder: The folder.
        channel_names: One name per image channel (``dataset.json`` ``channel_names``, in channel order).
        class_names: One name per class, background first (``dataset.json`` ``labels`` by value, without
            ``"ignore"``).
        ignore_label: The value of the ``"ignore"`` label, or None.
        file_ending: The image file suffix, e.g. ``".nii.gz"``.
        case_names: The case identifiers, sorted.

    Raises:
        FileNotFoundError: No such folder, or no ``dataset.json``, ``imagesTr`` or ``labelsTr`` in it.
        ValueError: An invalid ``dataset.json``, a case missing a channel or label file, or an image without a label
            file; the message names the files and the fix.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        info = _read_dataset_json(self.folder)
        self.channel_names: list[str] = info["channel_names"]
        self.class_names: list[str] = info["class_names"]
        self.ignore_label: int | None = info["ignore_label"]
        self.file_ending: str = info["file_ending"]
        self.case_names: list[str] = _find_cases(self.folder, self.file_ending, len(self.channel_names))
        expected = info["num_training"]
        if expected is not None and expected != len(self.case_names):
            raise ValueError(
                f"{self.folder / 'dataset.json'}: numTraining is {expected} but labelsTr holds "
                f"{len(self.case_names)} label file(s); fix numTraining or add the missing cases"
            )

    @property
    def num_classes(self) -> int:
        """Number of classes, background included."""
        return len(self.class_names)

    def image_files(self, case: str) -> list[Path]:
        """The channel files of ``case``: ``imagesTr/<case>_0000<ending>``, ...."""
        return [
            self.folder / "imagesTr" / f"{case}_{channel:04d}{self.file_ending}"
            for channel in range(len(self.channel_names))
        ]

    def label_file(self, case: str) -> Path:
        """The label file of ``case``: ``labelsTr/<case><ending>``."""
        return self.folder / "labelsTr" / f"{case}{self.file_ending}"

    def __len__(self) -> int:
        return len(self.case_names)

    @overload
    def __getitem__(self, index: int) -> TrainingCase: ...

    @overload
    def __getitem__(self, index: slice) -> list[TrainingCase]: ...

    def __getitem__(self, index: int | slice) -> TrainingCase | list[TrainingCase]:
        """Read case ``index`` (or a slice of cases) from disk."""
        if isinstance(index, slice):
            return [self.read_case(name) for name in self.case_names[index]]
        return self.read_case(self.case_names[index])

    def __iter__(self) -> Iterator[TrainingCase]:
        for name in self.case_names:
            yield self.read_case(name)

    def read_case(self, case: str) -> TrainingCase:
        """Read one case by name.

        Raises:
            napari_mamba_seg.io.ImageReadError: A file cannot be read.
            ValueError: The channel files and the label file lie on different voxel grids, a channel file holds
                several channels, or the labels hold values that are not classes of ``dataset.json``.
        """
        label_path = self.label_file(case)
        labels_image = read_image(label_path)
        labels = _single_channel(labels_image, str(label_path))
        channels = []
        for path in self.image_files(case):
            channel = read_image(path)
            _check_same_grid(channel, labels_image, str(path), str(label_path))
            channels.append(_single_channel(channel, str(path)))
        image = np.stack(channels)
        labels, trusted = self._labels_and_trust(labels, label_path)
        return TrainingCase(image, labels, trusted, labels_image.geometry.spacing, case)

    def _labels_and_trust(self, values: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray | None]:
        """Integer labels in [0, num_classes) and the trust mask (False at the ignore label)."""
        if values.dtype.kind == "f":
            if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
                raise ValueError(f"{path}: label values must be whole numbers, got non-integer values")
            values = values.astype(np.int64)
        elif values.dtype.kind not in "biu":
            raise ValueError(f"{path}: labels must be integers, got dtype {values.dtype}")
        trusted = None
        if self.ignore_label is not None:
            ignored = values == self.ignore_label
            if ignored.any():
                trusted = ~ignored
                values = np.where(ignored, 0, values)
        present = np.unique(values)
        invalid = [int(v) for v in present if v < 0 or v >= self.num_classes]
        if invalid:
            raise ValueError(
                f"{path}: label value(s) {invalid} are not classes of dataset.json (valid: 0 to "
                f"{self.num_classes - 1}{f', ignore = {self.ignore_label}' if self.ignore_label is not None else ''}); "
                "fix the labels or add the classes to dataset.json"
            )
        dtype = np.uint8 if self.num_classes <= 256 else np.int32
        return values.astype(dtype, copy=False), trusted


def load_nnunet_raw(folder: str | os.PathLike[str]) -> list[TrainingCase]:
    """Read every training case of an nnU-Net v2 raw data set folder into memory.

    Args:
        folder: The data set folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``).

    Returns:
        The cases, sorted by name; ``trusted`` is False where the labels hold the ``"ignore"`` label.

    Raises:
        FileNotFoundError: Missing folder or ``dataset.json`` / ``imagesTr`` / ``labelsTr``.
        ValueError: See :class:`NnUNetRawDataset` and :meth:`NnUNetRawDataset.read_case`.
    """
    return list(NnUNetRawDataset(folder))


def _read_dataset_json(folder: Path) -> dict[str, Any]:
    """The parts of ``dataset.json`` the reader needs, checked."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder; give the nnU-Net raw data set folder (DatasetXXX_Name)")
    path = folder / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no dataset.json; an nnU-Net v2 raw data set folder holds dataset.json, imagesTr/ and "
            "labelsTr/ (see nnU-Net's dataset_format documentation)"
        )
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(info).__name__}")
    missing = [key for key in ("channel_names", "labels", "file_ending") if key not in info]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; nnU-Net v2 needs channel_names, labels and file_ending")
    num_training = info.get("numTraining")
    return {
        "channel_names": _channel_names(info["channel_names"], path),
        **_class_names(info["labels"], path),
        "file_ending": str(info["file_ending"]),
        "num_training": int(num_training) if num_training is not None else None,
    }


def _channel_names(channels: Any, path: Path) -> list[str]:
    if not isinstance(channels, dict) or not channels:
        raise ValueError(f'{path}: channel_names must be a non-empty object like {{"0": "T1"}}, got {channels!r}')
    try:
        indices = sorted(int(key) for key in channels)
    except ValueError:
        raise ValueError(
            f"{path}: channel_names keys must be channel numbers '0', '1', ..., got {list(channels)}"
        ) from None
    if indices != list(range(len(indices))):
        raise ValueError(f"{path}: channel_names keys must be 0 to {len(indices) - 1} without gaps, got {indices}")
    return [str(channels[str(index)]) for index in indices]


def _class_names(labels: Any, path: Path) -> dict[str, Any]:
    """``{"class_names": [...], "ignore_label": int | None}`` from ``dataset.json``'s ``labels``."""
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f'{path}: labels must be an object like {{"background": 0, "lesion": 1}}, got {labels!r}')
    regions = [name for name, value in labels.items() if not isinstance(value, int) or isinstance(value, bool)]
    if regions:
        raise ValueError(
            f"{path}: label(s) {regions} are not single integer values; region-based labels (lists of values) are "
            "not supported: give each class its own value"
        )
    ignore = labels.get(IGNORE_LABEL_NAME)
    by_value = sorted((value, name) for name, value in labels.items() if name != IGNORE_LABEL_NAME)
    values = [value for value, _ in by_value]
    if values != list(range(len(values))):
        raise ValueError(f"{path}: label values must be 0, 1, 2, ... without gaps (background = 0), got {values}")
    if ignore is not None and ignore != len(values):
        raise ValueError(f"{path}: the ignore label must be the highest value ({len(values)}), got {ignore}")
    return {"class_names": [name for _, name in by_value], "ignore_label": ignore}


def _find_cases(folder: Path, ending: str, num_channels: int) -> list[str]:
    """The case names (from labelsTr), every channel file checked, every image checked to have labels."""
    images, labels = folder / "imagesTr", folder / "labelsTr"
    for sub in (images, labels):
        if not sub.is_dir():
            raise FileNotFoundError(f"{folder} has no {sub.name}/ folder; an nnU-Net v2 raw data set needs it")
    cases = sorted(p.name[: -len(ending)] for p in labels.iterdir() if p.name.endswith(ending))
    if not cases:
        raise ValueError(f"{labels} holds no label files ending in {ending!r} (dataset.json file_ending)")
    missing = [
        f"imagesTr/{case}_{channel:04d}{ending}"
        for case in cases
        for channel in range(num_channels)
        if not (images / f"{case}_{channel:04d}{ending}").is_file()
    ]
    if missing:
        raise ValueError(
            f"{folder}: {len(missing)} channel file(s) missing for cases in labelsTr: {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; every case needs one file per channel of dataset.json "
            f"channel_names ({num_channels})"
        )
    known = set(cases)
    unlabelled = sorted(
        p.name
        for p in images.iterdir()
        if p.name.endswith(ending) and p.name[: -len(ending)].rpartition("_")[0] not in known
    )
    if unlabelled:
        expected = [f"labelsTr/{name[: -len(ending)].rpartition('_')[0]}{ending}" for name in unlabelled[:5]]
        raise ValueError(
            f"{folder}: {len(unlabelled)} image file(s) in imagesTr have no label file: {', '.join(unlabelled[:5])} "
            f"(expected {', '.join(expected)}); add the label files or move those images to imagesTs"
        )
    return cases


def _single_channel(image: MedicalImage, what: str) -> np.ndarray:
    if image.num_channels != 1:
        raise ValueError(
            f"{what} holds {image.num_channels} channels (shape {image.array.shape}); expected one: nnU-Net stores "
            "each channel in its own file and labels as one volume"
        )
    return image.array[0]


def _check_same_grid(image: MedicalImage, reference: MedicalImage, what: str, reference_name: str) -> None:
    if image.spatial_shape != reference.spatial_shape:
        raise ValueError(
            f"{what} has spatial shape {image.spatial_shape} but {reference_name} has {reference.spatial_shape}; "
            "they must lie on the same voxel grid (resample one onto the other first)"
        )
    if not image.geometry.is_close(reference.geometry, atol=_GEOMETRY_ATOL_MM):
        raise ValueError(
            f"{what} has geometry {image.geometry!r} but {reference_name} has {reference.geometry!r} (affines differ "
            f"by more than {_GEOMETRY_ATOL_MM} mm); they must lie on the same voxel grid (resample one onto the "
            "other first)"
        )


def case_names(cases: Sequence[TrainingCase]) -> list[str]:
    """The names of ``cases``, without reading lazily stored ones from disk."""
    if isinstance(cases, NnUNetRawDataset):
        return list(cases.case_names)
    return [case.name for case in cases]
