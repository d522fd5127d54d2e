"""The Export widget, opened through the manifest: corrected labels of images opened with the plugin's reader
(NIfTI, a DICOM series, a two-phase NIfTI) exported as NIfTI, DICOM-SEG and an nnU-Net case, read back with the
plugin's readers; refusals (existing file, empty labels, DICOM-SEG of a non-DICOM image) write nothing."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_mamba_seg._napari._layer_data import labels_layer_kwargs
from napari_mamba_seg._napari._segment_widget import RESULT_KEY
from napari_mamba_seg.interactive import REVIEW_METADATA_KEY, ReviewState
from napari_mamba_seg.io import read_dicom_seg, read_image

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "io"))
from dicom_factory import write_dicom_series
from nifti_cases import write_nifti_case

PLUGIN = "napari-mamba-seg"
CLASSES = ["background", "tumour", "oedema"]

pytestmark = pytest.mark.gui


@pytest.fixture
def errors(monkeypatch):
    """The error notifications the widget raised (through its status line)."""
    from napari_mamba_seg._napari import _status

    shown: list[str] = []
    monkeypatch.setattr(_status, "show_error", shown.append)
    return shown


def _blob(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Two nested random ellipsoids: class 2 around class 1."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    centre = np.array(shape) / 2 + rng.uniform(-1, 1, len(shape))
    radius = (np.array(shape) / 3).reshape(-1, *([1] * len(shape)))
    distance = np.sqrt((((grid - centre.reshape(-1, *([1] * len(shape)))) / radius) ** 2).sum(0))
    return np.where(distance < 0.5, 1, np.where(distance < 0.9, 2, 0)).astype(np.uint8)


def _add_labels(viewer, image_layer, *, reviewed=(), name="corrected"):
    labels = _blob(image_layer.data.shape[-3:])
    layer = viewer.add_labels(labels, name=name, **labels_layer_kwargs(CLASSES, like=image_layer))
    layer.metadata = {
        **layer.metadata,
        RESULT_KEY: {"model": "test-model", "model_sha256": "ab" * 32, "image_layers": [image_layer.name]},
        REVIEW_METADATA_KEY: ReviewState(axis=0, num_slices=labels.shape[0], reviewed=set(reviewed)).to_dict(),
    }
    return layer


def _export_widget(viewer):
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Export")
    return widget


def _export(qtbot, widget, target, format, **options):
    widget.choose_format(format)
    widget.target_edit.setText(str(target))
    widget.reviewed_only.setChecked(options.get("reviewed_only", False))
    widget.overwrite.setChecked(options.get("overwrite", False))
    widget.last_result = None
    widget.run()
    qtbot.waitUntil(widget.export_button.isEnabled, timeout=60_000)
    return widget.last_result


def _listing(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_nifti_export_keeps_the_source_affine_and_writes_provenance(make_napari_viewer, qtbot, tmp_path, errors):
    source = tmp_path / "case.nii.gz"
    write_nifti_case(source)
    viewer = make_napari_viewer()
    [image_layer] = viewer.open(source, plugin=PLUGIN)
    layer = _add_labels(viewer, image_layer, reviewed={1, 3})
    widget = _export_widget(viewer)
    assert widget.labels_layer().name == layer.name
    assert "2 of 6 slices reviewed" in widget.summary.text()

    assert _export(qtbot, widget, tmp_path / "out" / "labels.nii.gz", "nifti") is None  # no such folder
    assert "does not exist" in errors.pop()
    (tmp_path / "out").mkdir()
    result = _export(qtbot, widget, tmp_path / "out" / "labels.nii.gz", "nifti")
    assert not errors
    written = read_image(result.files[0])
    np.testing.assert_array_equal(written.array[0], layer.data)
    assert written.geometry.is_close(read_image(source).geometry, atol=1e-6)
    record = json.loads(result.provenance_file.read_text())
    text = json.dumps(record)
    assert hashlib.sha256(source.read_bytes()).hexdigest() in text  # the source file and its hash
    assert hashlib.sha256(result.files[0].read_bytes()).hexdigest() in text  # the exported file's hash
    assert "test-model" in text and "ab" * 32 in text  # the model that segmented it

    before = _listing(tmp_path / "out")
    layer.data = np.zeros_like(layer.data) + 1
    assert _export(qtbot, widget, tmp_path / "out" / "labels.nii.gz", "nifti") is None  # exists: refused
    assert errors and "labels.nii.gz" in errors[-1]
    assert _listing(tmp_path / "out") == before

    replaced = _export(qtbot, widget, tmp_path / "out" / "labels.nii.gz", "nifti", overwrite=True)
    assert (read_image(replaced.files[0]).array[0] == 1).all()


def test_reviewed_only_export_writes_the_review_mask(make_napari_viewer, qtbot, tmp_path, errors):
    source = tmp_path / "case.nii.gz"
    write_nifti_case(source)
    viewer = make_napari_viewer()
    [image_layer] = viewer.open(source, plugin=PLUGIN)
    layer = _add_labels(viewer, image_layer, reviewed={2, 3})
    widget = _export_widget(viewer)

    result = _export(qtbot, widget, tmp_path / "reviewed.nii.gz", "nifti", reviewed_only=True)
    assert not errors
    assert result.reviewed_slices == (2, 3)
    volumes = {path.name: read_image(path).array[0] for path in result.files}
    labels = volumes["reviewed.nii.gz"]
    [mask] = [volume for name, volume in volumes.items() if name != "reviewed.nii.gz"]
    np.testing.assert_array_equal(labels[2:4], layer.data[2:4])
    assert not labels[[0, 1, 4, 5]].any()
    assert mask[2:4].all() and not mask[[0, 1, 4, 5]].any()


def test_nnunet_case_from_a_two_phase_image(make_napari_viewer, qtbot, tmp_path, errors):
    from napari_mamba_seg.training import NnUNetRawDataset

    source = tmp_path / "dce.nii.gz"
    write_nifti_case(source, phases=2)
    viewer = make_napari_viewer()
    phases = viewer.open(source, plugin=PLUGIN)
    assert len(phases) == 2
    layer = _add_labels(viewer, phases[0], name="patient 7 / left?")
    layer.metadata = {
        **layer.metadata,
        RESULT_KEY: {**layer.metadata[RESULT_KEY], "image_layers": [p.name for p in phases]},
    }
    widget = _export_widget(viewer)
    widget._on_layer_changed()
    assert [layer.name for layer in widget.chosen_image_layers()] == [p.name for p in phases]
    assert "/" not in Path(widget.target_edit.text()).name and "?" not in widget.target_edit.text()

    folder = tmp_path / "Dataset007_Corrected"
    result = _export(qtbot, widget, folder, "nnunet")
    assert not errors
    dataset = NnUNetRawDataset(folder)
    assert dataset.case_names == [result.case_name]
    assert "/" not in result.case_name and "?" not in result.case_name
    assert dataset.class_names[: len(CLASSES)] == CLASSES
    case = dataset[0]
    np.testing.assert_array_equal(case.labels, layer.data)
    np.testing.assert_array_equal(case.image, np.stack([p.data for p in phases]))
    assert read_image(result.files[-1]).geometry.is_close(read_image(source).geometry, atol=1e-5)


def test_dicom_seg_references_the_source_series(make_napari_viewer, qtbot, tmp_path, errors):
    series = tmp_path / "series"
    volume = np.random.default_rng(1).integers(0, 800, (5, 16, 16)).astype(np.int16)
    files = write_dicom_series(series, volume, spacing=(3.0, 0.8, 0.8), origin_lps=(-20.0, 10.0, 5.0))
    viewer = make_napari_viewer()
    [image_layer] = viewer.open(series, plugin=PLUGIN)
    layer = _add_labels(viewer, image_layer)
    widget = _export_widget(viewer)

    result = _export(qtbot, widget, tmp_path / "seg.dcm", "dicom-seg")
    assert not errors
    labels, class_names = read_dicom_seg(result.files[0], reference=read_image(series))
    np.testing.assert_array_equal(labels, layer.data)
    assert class_names == CLASSES[1:]  # the segment labels of values 1, 2
    import pydicom

    seg = pydicom.dcmread(result.files[0])
    referenced = {
        item.ReferencedSOPInstanceUID
        for frame in seg.PerFrameFunctionalGroupsSequence
        for derivation in frame.DerivationImageSequence
        for item in derivation.SourceImageSequence
    }
    source_uids = {pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in files}
    assert referenced and referenced <= source_uids

    # a NIfTI export of the same labels records every file of the series with its sha256 (without re-reading it)
    nifti = _export(qtbot, widget, tmp_path / "labels.nii.gz", "nifti")
    assert not errors
    recorded = json.loads(nifti.provenance_file.read_text())["source"]["files"]
    assert sorted(entry["path"] for entry in recorded) == sorted(str(Path(f).absolute()) for f in files)
    for entry in recorded:
        assert entry["sha256"] == hashlib.sha256(Path(entry["path"]).read_bytes()).hexdigest()


def test_refusals_write_nothing(make_napari_viewer, qtbot, tmp_path, errors):
    source = tmp_path / "case.nii.gz"
    write_nifti_case(source)
    viewer = make_napari_viewer()
    [image_layer] = viewer.open(source, plugin=PLUGIN)
    layer = _add_labels(viewer, image_layer)
    widget = _export_widget(viewer)
    out = tmp_path / "out"
    out.mkdir()

    assert _export(qtbot, widget, out / "seg.dcm", "dicom-seg") is None  # the source is not DICOM
    assert "DICOM" in errors[-1] and "NIfTI" in errors[-1]
    assert _export(qtbot, widget, out / "labels.nii.gz", "nifti", reviewed_only=True) is None  # nothing reviewed
    assert "review" in errors[-1]
    layer.data = np.zeros_like(layer.data)
    assert _export(qtbot, widget, out / "labels.nii.gz", "nifti") is None  # empty labels
    assert "empty" in errors[-1] or "nothing" in errors[-1]
    assert _listing(out) == {}
