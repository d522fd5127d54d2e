"""Files in, files out: the headless ``predict`` job the command line runs (read → predict → write).

A job never overwrites a file unless asked, checks that before any computation, and writes each result under a
temporary name renamed into place, so an interrupted or failed job leaves no file that looks complete.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_mamba_seg.io import (
    ImageReadError,
    MedicalImage,
    discover_inputs,
    read_image,
    write_dicom_seg,
    write_image,
    write_labels,
)
from napari_mamba_seg.io._image import matching_suffix

__all__ = ["OUTPUT_FORMATS", "USER_ERRORS", "FileJob", "output_stem_and_suffix", "plan_jobs", "predict_job"]

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, MemoryError)
"""Errors caused by the input, the model, the settings or the disk (ImageReadError, BundleNotFoundError,
FileExistsError, PermissionError, PredictionCancelled's siblings...): reported in one line, never as a traceback."""


@dataclass(frozen=True)
class FileJob:
    """One input and where its results go.

    Attributes:
        source: A NIfTI or TIFF file, or a DICOM series folder.
        labels_path: ``<outdir>/<name>_labels<suffix>``.
        probabilities_path: ``<outdir>/<name>_probabilities<suffix>`` when asked for (NIfTI beside a DICOM-SEG),
            else None.
    """

    source: Path
    labels_path: Path
    probabilities_path: Path | None

    @property
    def outputs(self) -> list[Path]:
        """Every file the job writes."""
        return [self.labels_path] + ([self.probabilities_path] if self.probabilities_path else [])


OUTPUT_FORMATS = ("auto", ".nii.gz", ".nii", ".tif", ".dcm")
"""``auto`` = the input's format (DICOM-SEG ``.dcm`` for a DICOM series), or one suffix for every input."""


def output_stem_and_suffix(source: Path, output_format: str = "auto") -> tuple[str, str]:
    """The name results are written under and their labels suffix.

    With ``"auto"``: NIfTI stays NIfTI (``.nii`` or ``.nii.gz`` as given), TIFF becomes ``.tif``, and a DICOM
    series (folder or file) gives a DICOM-SEG ``.dcm`` named after the folder. Any other format is used as given
    (``.dcm`` needs DICOM input).
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    suffix = matching_suffix(source)
    if suffix and source.is_file():
        stem, auto = source.name[: -len(suffix)], suffix.lower() if suffix.lower().startswith(".nii") else ".tif"
    else:  # a DICOM folder, or a DICOM file read as its folder's series
        stem, auto = (source.resolve().name if source.is_dir() else source.stem), ".dcm"
    if output_format == ".dcm" and auto != ".dcm":
        raise ValueError(f"{source}: DICOM-SEG output needs a DICOM series as input; write .nii.gz or .tif instead")
    return stem, auto if output_format == "auto" else output_format


def plan_jobs(
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    *,
    save_probabilities: bool = False,
    output_format: str = "auto",
) -> tuple[list[FileJob], list[tuple[Path, str]]]:
    """The jobs for the given inputs: files and folders expanded, output names fixed, the output folder made.

    Args:
        inputs: Files or folders (see :func:`napari_mamba_seg.io.discover_inputs`).
        output_dir: Folder for the results; created when missing.
        save_probabilities: Whether each job also writes a probability map.
        output_format: See :func:`output_stem_and_suffix`.

    Returns:
        The jobs, and ``(input, reason)`` for each input that holds nothing readable (a missing path, a folder
        without images): the other inputs still run.

    Raises:
        ValueError: Two inputs would write the same file.
        OSError: The output folder is a file or cannot be created.
    """
    sources, unusable = [], []
    for item in inputs:
        try:
            sources += [source for source in discover_inputs([item]) if source not in sources]
        except ImageReadError as error:
            unusable.append((Path(item), str(error)))
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output folder {out} is a file; pass a folder with -o/--output")
    jobs, owners = [], {}
    for source in sources:
        try:
            stem, suffix = output_stem_and_suffix(source, output_format)
        except ValueError as error:
            unusable.append((source, str(error)))
            continue
        labels = out / f"{stem}_labels{suffix}"
        probability_suffix = ".nii.gz" if suffix == ".dcm" else suffix
        probabilities = out / f"{stem}_probabilities{probability_suffix}" if save_probabilities else None
        if labels in owners:
            raise ValueError(
                f"{source} and {owners[labels]} would both be written to {labels}; segment them into different "
                "output folders or rename one"
            )
        owners[labels] = source
        jobs.append(FileJob(source, labels, probabilities))
    out.mkdir(parents=True, exist_ok=True)
    return jobs, unusable


def predict_job(
    predictor: Any,
    job: FileJob,
    *,
    series_uid: str | None = None,
    overwrite: bool = False,
    progress: Callable[[Any], None] | None = None,
    cancel: Any = None,
    model_name: str | None = None,
    observe: Callable[[MedicalImage, Any], None] | None = None,
) -> list[Path]:
    """Read ``job.source``, predict with ``predictor``, write the labels (and probabilities) in its geometry.

    Args:
        predictor: A :class:`napari_mamba_seg.inference.Predictor`.
        job: From :func:`plan_jobs`.
        series_uid: For a DICOM folder holding several series, the one to read.
        overwrite: Replace existing result files.
        progress: Called with each ``PredictionProgress``.
        cancel: A ``threading.Event`` or a callable; when set, ``PredictionCancelled`` is raised and nothing
            is written.
        model_name: Recorded in a DICOM-SEG's algorithm identification.
        observe: Called with the image read and its ``Prediction`` once the results are written (e.g. the review
            report of ``napari-mamba-seg predict --review-report``).

    Returns:
        The files written, labels first.

    Raises:
        FileExistsError: A result file exists and ``overwrite`` is False (checked before reading the input).
        ImageReadError: The input cannot be read.
        ValueError: The image does not fit the model (channels, dimensions, NaN...).
    """
    if not overwrite:
        existing = [str(path) for path in job.outputs if path.exists()]
        if existing:
            raise FileExistsError(
                f"{', '.join(existing)} already exist(s); refusing to overwrite. Use another output folder or "
                "--overwrite."
            )
    image = read_image(job.source, series_uid=series_uid)
    prediction = predictor.predict(image.array, image.geometry.spacing, progress=progress, cancel=cancel)
    written = []
    if job.probabilities_path is not None and prediction.probabilities is not None:
        write_image(prediction.probabilities, job.probabilities_path, image, overwrite=overwrite)
        written.append(job.probabilities_path)
    if job.labels_path.suffix.lower() == ".dcm":
        write_dicom_seg(
            prediction.labels,
            job.labels_path,
            image,
            class_names=prediction.class_names,
            model_name=model_name,
            overwrite=overwrite,
        )
    else:
        write_labels(prediction.labels, job.labels_path, image, overwrite=overwrite)
    if observe is not None:
        observe(image, prediction)
    return [job.labels_path, *written]
