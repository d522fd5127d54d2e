"""discover_inputs: files, DICOM folders and nested trees to a deterministic list of inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from napari_mamba_seg.io import ImageReadError, discover_inputs

DICOM_BYTES = bytes(128) + b"DICM" + bytes(32)


def make_tree(root: Path) -> None:
    """A study tree as users have them: cases with NIfTI/TIFF files, DICOM folders, clutter, empty folders."""
    files = {
        "cases/case10/image.nii.gz": b"x",
        "cases/case2/image.nii.gz": b"x",
        "cases/case2/image.tif": b"x",
        "cases/case2/notes.txt": b"x",
        "cases/case2/segmentations/old.nii.gz": b"x",  # not searched: case2 holds images itself
        "dicom/patient1/study/series_b/IM0002": DICOM_BYTES,  # no suffix: found by the magic
        "dicom/patient1/study/series_b/IM0001": DICOM_BYTES,
        "dicom/patient1/study/series_a/1.dcm": b"any",
        "dicom/patient1/DICOMDIR": DICOM_BYTES,  # the index file alone is no series
        "dicom/patient1/README.md": b"x",
        "misc/.hidden.nii.gz": b"x",  # hidden: temporary or system file
        "misc/scan.OME.TIFF": b"x",
        "misc/readme.txt": b"x",
    }
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    (root / "empty" / "nothing").mkdir(parents=True)


def test_nested_tree(tmp_path: Path) -> None:
    make_tree(tmp_path)
    found = discover_inputs([tmp_path])
    expected = [
        "cases/case2/image.nii.gz",
        "cases/case2/image.tif",
        "cases/case10/image.nii.gz",
        "dicom/patient1/study/series_a",
        "dicom/patient1/study/series_b",
        "misc/scan.OME.TIFF",
    ]
    assert found == [tmp_path / name for name in expected]
    assert discover_inputs([str(tmp_path)]) == found  # str or Path, same answer each time


def test_files_folders_and_duplicates(tmp_path: Path) -> None:
    make_tree(tmp_path)
    case2 = tmp_path / "cases" / "case2"
    series_b = tmp_path / "dicom" / "patient1" / "study" / "series_b"
    found = discover_inputs(
        [
            case2 / "image.tif",
            case2,  # adds image.nii.gz; image.tif is already listed
            series_b / "IM0001",  # a DICOM file stands for its folder
            series_b,  # the same series again
            tmp_path / "cases" / ".." / "cases" / "case2" / "image.nii.gz",  # same file, other spelling
        ]
    )
    assert found == [case2 / "image.tif", case2 / "image.nii.gz", series_b]


def test_folder_without_images_is_an_error(tmp_path: Path) -> None:
    make_tree(tmp_path)
    with pytest.raises(ImageReadError, match=r"empty: no NIfTI, TIFF or DICOM files found"):
        discover_inputs([tmp_path / "empty"])


def test_missing_path_and_unsupported_file(tmp_path: Path) -> None:
    make_tree(tmp_path)
    with pytest.raises(ImageReadError, match=r"nowhere.*no such file or folder"):
        discover_inputs([tmp_path / "cases", tmp_path / "nowhere"])
    with pytest.raises(ImageReadError, match=r"readme\.txt: unsupported file type.*\.nii\.gz"):
        discover_inputs([tmp_path / "misc" / "readme.txt"])


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="the platform has no symbolic links")
def test_symbolic_link_loop_terminates(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "scan.nii").write_bytes(b"x")
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a")
    assert discover_inputs([tmp_path]) == [tmp_path / "a" / "b" / "scan.nii"]


def test_dicom_without_suffix_needs_the_magic(tmp_path: Path) -> None:
    series = tmp_path / "series"
    series.mkdir()
    for index in range(3):
        (series / f"IM{index}").write_bytes(bytes(128) + b"NOPE")
    with pytest.raises(ImageReadError, match="no NIfTI, TIFF or DICOM"):
        discover_inputs([series])
    (series / "IM0").write_bytes(DICOM_BYTES)
    assert discover_inputs([series]) == [series]
