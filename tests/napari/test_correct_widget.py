"""The Correct widget, opened through the manifest: each tool changes the Labels layer as the core function says,
Undo restores it bit for bit, the review state is stored with the layer, and bad input changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_mamba_seg.interactive import REVIEW_METADATA_KEY

PLUGIN = "napari-mamba-seg"
SCALE = (2.0, 0.5, 0.5)
SHAPE = (8, 40, 40)

pytestmark = pytest.mark.gui


def _disk(radius: float, centre=(20, 20), size=40) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    return (y - centre[0]) ** 2 + (x - centre[1]) ** 2 <= radius**2


def _open(make_napari_viewer, labels: np.ndarray, name: str = "mask"):
    viewer = make_napari_viewer()
    layer = viewer.add_labels(labels, name=name, scale=SCALE)
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Correct")
    widget.labels_box.setCurrentIndex(widget.labels_box.findText(name))
    return viewer, layer, widget


def _go(viewer, layer, index: int) -> None:
    viewer.dims.set_point(0, index * layer.scale[0])


def _click(widget, text: str) -> None:
    widget.buttons[text].click()


def test_fill_holes_then_undo_and_redo(make_napari_viewer) -> None:
    labels = np.zeros(SHAPE, np.uint8)
    labels[3] = _disk(10) & ~_disk(3)
    viewer, layer, widget = _open(make_napari_viewer, labels.copy())
    _go(viewer, layer, 3)
    _click(widget, "Fill holes")
    np.testing.assert_array_equal(layer.data[3], _disk(10).astype(np.uint8))
    assert widget.undo_button.isEnabled()
    widget.undo_button.click()
    np.testing.assert_array_equal(layer.data, labels)
    widget.redo_button.click()
    np.testing.assert_array_equal(layer.data[3], _disk(10).astype(np.uint8))


def test_remove_islands_and_keep_largest(make_napari_viewer) -> None:
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:5, 5:15, 5:15] = 1  # 300 voxels
    labels[6, 30:32, 30:32] = 1  # 4 voxels
    labels[1, 30:35, 30:35] = 2  # 25 voxels, another class
    _viewer, layer, widget = _open(make_napari_viewer, labels.copy())
    widget.min_voxels.setValue(10)
    _click(widget, "Remove islands smaller than")
    expected = labels.copy()
    expected[6, 30:32, 30:32] = 0
    np.testing.assert_array_equal(layer.data, expected)
    widget.undo_button.click()
    np.testing.assert_array_equal(layer.data, labels)

    _click(widget, "Keep largest component")  # one component per class already except class 1's island
    np.testing.assert_array_equal(layer.data, expected)


def test_mark_unmark_and_next_unreviewed(make_napari_viewer) -> None:
    viewer, layer, widget = _open(make_napari_viewer, np.zeros(SHAPE, np.uint8))
    for index in (0, 1, 3):
        _go(viewer, layer, index)
        _click(widget, "Mark slice reviewed")
    assert layer.metadata[REVIEW_METADATA_KEY]["reviewed"] == [0, 1, 3]
    assert "3 of 8 reviewed, 5 remaining" in widget.review_text.text()
    _click(widget, "Unmark")
    assert layer.metadata[REVIEW_METADATA_KEY]["reviewed"] == [0, 1]
    _go(viewer, layer, 0)
    _click(widget, "Next unreviewed")
    assert viewer.dims.current_step[0] == 2
    assert "slice 2: not reviewed" in widget.review_text.text()


def test_propagate_to_the_next_slice_and_interpolate(make_napari_viewer) -> None:
    labels = np.zeros(SHAPE, np.uint8)
    labels[1] = _disk(4)
    labels[5] = _disk(12)
    viewer, layer, widget = _open(make_napari_viewer, labels.copy())
    _go(viewer, layer, 1)
    _click(widget, "Copy to next slice")
    np.testing.assert_array_equal(layer.data[2], labels[1])
    assert viewer.dims.current_step[0] == 2  # napari follows the copy
    widget.undo_button.click()
    np.testing.assert_array_equal(layer.data, labels)

    for index in (1, 5):
        _go(viewer, layer, index)
        _click(widget, "Mark slice reviewed")
    _click(widget, "Interpolate between reviewed")
    areas = [int(layer.data[i].sum()) for i in range(1, 6)]
    assert areas == sorted(areas) and len(set(areas)) == 5  # grows steadily from the small to the large disk
    widget.undo_button.click()  # one undo step for the whole interpolation
    np.testing.assert_array_equal(layer.data, labels)


def test_bad_input_changes_nothing(make_napari_viewer) -> None:
    viewer, layer, widget = _open(make_napari_viewer, np.zeros(SHAPE, np.uint8))
    layer.data[2] = _disk(5)
    before = layer.data.copy()
    _click(widget, "Interpolate between reviewed")
    assert "mark at least two slices" in widget.status.text()
    _click(widget, "Add click layers")
    viewer.layers["positive clicks"].add([2, 10, 10])
    _click(widget, "Refine from clicks")
    assert "not made by the Segment widget" in widget.status.text()
    np.testing.assert_array_equal(layer.data, before)

    flat = viewer.add_labels(np.zeros((40, 40), np.uint8), name="flat")
    widget.labels_box.setCurrentIndex(widget.labels_box.findText(flat.name))
    _click(widget, "Fill holes")
    assert "3D label volumes" in widget.status.text()


def _segmented(make_napari_viewer, qtbot, tmp_path):
    """A viewer with a random scan segmented by a tiny untrained U-Net through the Segment widget, and Correct."""
    import torch

    from napari_mamba_seg.bundles import ModelCard, save_bundle
    from napari_mamba_seg.models import create_model

    torch.manual_seed(0)
    bundle = tmp_path / "tiny"
    save_bundle(create_model("test_unet", in_channels=1, num_classes=2), bundle, ModelCard(class_names=["bg", "fg"]))
    viewer = make_napari_viewer()
    image = viewer.add_image(np.random.default_rng(0).random(SHAPE, dtype=np.float32), name="scan", scale=SCALE)
    _dock, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    segment.add_bundle_folder(str(bundle))
    segment.device_box.setCurrentIndex(segment.device_box.findData("cpu"))
    segment.layer_list.item(0).setSelected(True)
    segment.run_button.click()
    qtbot.waitUntil(lambda: segment.worker is None, timeout=60_000)
    labels = viewer.layers[-1]
    assert labels.name == f"{image.name} · tiny"
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Correct")
    widget.labels_box.setCurrentIndex(widget.labels_box.findText(labels.name))
    return viewer, labels, widget


def test_clicks_refine_a_segmentation_with_the_models_probabilities(make_napari_viewer, qtbot, tmp_path) -> None:
    viewer, labels, widget = _segmented(make_napari_viewer, qtbot, tmp_path)
    labels.data[:] = 0
    viewer.dims.set_point(0, 4 * SCALE[0])
    _click(widget, "Add click layers")
    viewer.layers["positive clicks"].add([4, 20, 20])  # data coordinates of the click layer (the labels grid)
    labels.selected_label = 1
    _click(widget, "Refine from clicks")
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert labels.data[4, 20, 20] == 1, widget.status.text()  # the clicked voxel and the model region around it
    region = ndimage.label(labels.data[4] == 1)[0]
    assert region[20, 20] > 0 and (labels.data[:4] == 0).all() and (labels.data[5:] == 0).all()
    assert len(viewer.layers["positive clicks"].data) == 0  # clicks are consumed
    widget.undo_button.click()
    assert not labels.data.any()


def test_most_uncertain_goes_to_the_unreviewed_slice_with_the_most_expected_errors(
    make_napari_viewer, qtbot, tmp_path
) -> None:
    from napari_mamba_seg.interactive import DEFAULT_SPREAD_MM, ReviewState, most_uncertain_unreviewed, slices_within

    viewer, labels, widget = _segmented(make_napari_viewer, qtbot, tmp_path)
    _go(viewer, labels, 0)
    _click(widget, "Mark slice reviewed")
    _click(widget, "Most uncertain")  # computes the probabilities in a worker first
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    (probabilities,) = widget.probabilities.values()
    doubt = (1.0 - probabilities.max(axis=0)).sum(axis=(1, 2))  # expected wrong voxels per slice along z
    spread = slices_within(DEFAULT_SPREAD_MM, SCALE, 0)
    assert spread == 5  # 10 mm over 2 mm slices
    reviewed = {0}
    for _ in range(4):
        index = widget.slice_axis_and_index(labels)[1]
        assert index == most_uncertain_unreviewed(ReviewState(0, SHAPE[0], reviewed), doubt, spread=spread)
        assert index not in reviewed
        assert f"slice {index}: the model expects about {doubt[index]:.0f} wrong voxels" in widget.status.text()
        assert f"{SHAPE[0] - len(reviewed)} unreviewed" in widget.status.text()
        assert widget.review_text.text().endswith(f"the model expects about {doubt[index]:.0f} wrong voxels here")
        far = [i for i in range(SHAPE[0]) if all(abs(i - j) > spread for j in reviewed)]
        if far and doubt[far].max() >= 0.1 * doubt[[i for i in range(SHAPE[0]) if i not in reviewed]].max():
            assert index == max(far, key=lambda i: doubt[i]) and "more than 10 mm" in widget.status.text()
        reviewed.add(index)
        _click(widget, "Mark slice reviewed")
        _click(widget, "Most uncertain")  # cached now: no worker
        assert widget.worker is None
    assert len(reviewed) == 5
    widget.spread_mm.setValue(0.0)  # anywhere: the most expected errors of all unreviewed slices
    _click(widget, "Most uncertain")
    index = widget.slice_axis_and_index(labels)[1]
    assert index == most_uncertain_unreviewed(ReviewState(0, SHAPE[0], reviewed), doubt)
    assert doubt[index] == max(doubt[i] for i in range(SHAPE[0]) if i not in reviewed)
    assert "(all; 3 unreviewed)" in widget.status.text()


def test_most_uncertain_with_nothing_reviewed_says_it_looked_at_all_slices(make_napari_viewer, qtbot, tmp_path) -> None:
    viewer, labels, widget = _segmented(make_napari_viewer, qtbot, tmp_path)
    _go(viewer, labels, 0)
    _click(widget, "Most uncertain")
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    (probabilities,) = widget.probabilities.values()
    doubt = (1.0 - probabilities.max(axis=0)).sum(axis=(1, 2))
    assert widget.slice_axis_and_index(labels)[1] == int(np.argmax(doubt))
    assert f"(all; {SHAPE[0]} unreviewed)" in widget.status.text()  # no reviewed slice to be far from


def test_most_uncertain_needs_a_segmentation_by_the_plugin(make_napari_viewer) -> None:
    viewer, layer, widget = _open(make_napari_viewer, np.zeros(SHAPE, np.uint8))
    _go(viewer, layer, 2)
    _click(widget, "Most uncertain")
    assert "was not made by the Segment widget" in widget.status.text()
    assert widget.slice_axis_and_index(layer)[1] == 2 and widget.worker is None


def test_a_new_labels_layer_becomes_the_chosen_one(make_napari_viewer) -> None:
    viewer, _layer, widget = _open(make_napari_viewer, np.zeros(SHAPE, np.uint8))
    viewer.add_image(np.zeros(SHAPE), name="scan")
    assert widget.labels_box.currentText() == "mask"  # an image layer changes nothing
    viewer.add_labels(np.zeros(SHAPE, np.uint8), name="new segmentation")
    assert widget.labels_box.currentText() == "new segmentation"
    viewer.layers.remove("new segmentation")
    assert widget.labels_box.currentText() == "mask"


def test_labels_off_the_image_grid_are_refused_for_click_refinement(make_napari_viewer) -> None:
    from napari_mamba_seg._napari._segment_widget import RESULT_KEY

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((8, 32, 32), np.float32), name="scan", scale=SCALE)
    record = {"model": "breast-dce", "model_sha256": "", "image_layers": ["scan"]}
    layer = viewer.add_labels(np.zeros(SHAPE, np.uint8), name="mask", scale=SCALE, metadata={RESULT_KEY: record})
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Correct")
    viewer.dims.set_point(0, 2 * SCALE[0])
    _click(widget, "Add click layers")
    viewer.layers["positive clicks"].add([2, 10, 10])
    _click(widget, "Refine from clicks")
    assert "need labels on the image's grid" in widget.status.text()
    assert widget.worker is None and not layer.data.any()


def test_keep_largest_component_and_undo(make_napari_viewer) -> None:
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:5, 5:15, 5:15] = 1
    labels[6, 30:34, 30:34] = 1
    _viewer, layer, widget = _open(make_napari_viewer, labels.copy())
    _click(widget, "Keep largest component")
    assert layer.data.sum() == 300 and not layer.data[6].any()
    widget.undo_button.click()
    np.testing.assert_array_equal(layer.data, labels)


def test_corrections_survive_a_crash_and_are_offered_on_reopening(make_napari_viewer, qtbot) -> None:
    """Edits of the widget, a napari brush stroke and review marks are journalled as they happen; a new napari (the
    old one "crashed": never closed or saved) opening the same layer offers them back, and Restore brings them all."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[3] = _disk(10) & ~_disk(3)
    viewer, layer, widget = _open(make_napari_viewer, labels.copy(), name="crash test")
    _go(viewer, layer, 3)
    _click(widget, "Fill holes")
    _click(widget, "Mark slice reviewed")
    layer.selected_label = 2
    layer.paint((5, 30, 30), 2)  # a brush dab as napari's brush makes it (history item -> paint event)
    layer.paint((5, 31, 30), 2)
    expected = layer.data.copy()
    assert (expected[5] == 2).any()

    _viewer2, layer2, widget2 = _open(make_napari_viewer, labels.copy(), name="crash test")
    assert widget2.recovery_box.isVisibleTo(widget2)
    assert "not saved" in widget2.recovery_text.text()
    _click(widget2, "Fill holes")  # nothing may change while the offer is pending
    assert "restore or discard" in widget2.status.text()
    np.testing.assert_array_equal(layer2.data, labels)
    widget2.restore_button.click()
    np.testing.assert_array_equal(layer2.data, expected)
    assert layer2.metadata[REVIEW_METADATA_KEY]["reviewed"] == [3]
    widget2.undo_button.click()  # the restore is one undo step
    np.testing.assert_array_equal(layer2.data, labels)


def test_discarding_the_offer_forgets_the_journal(make_napari_viewer) -> None:
    labels = np.zeros(SHAPE, np.uint8)
    labels[3] = _disk(10) & ~_disk(3)
    viewer, layer, widget = _open(make_napari_viewer, labels.copy(), name="to discard")
    _go(viewer, layer, 3)
    _click(widget, "Fill holes")
    _viewer2, _layer2, widget2 = _open(make_napari_viewer, labels.copy(), name="to discard")
    assert widget2.recovery_box.isVisibleTo(widget2)
    widget2.discard_button.click()
    assert not widget2.recovery_box.isVisibleTo(widget2)
    _viewer3, _layer3, widget3 = _open(make_napari_viewer, labels.copy(), name="to discard")
    assert not widget3.recovery_box.isVisibleTo(widget3)


def test_saving_the_labels_discards_their_journal(make_napari_viewer, tmp_path) -> None:
    """After a save nothing is "unsaved": reopening offers no restore, and later edits start a new journal."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[3] = _disk(10) & ~_disk(3)
    viewer, layer, widget = _open(make_napari_viewer, labels.copy(), name="saved")
    _go(viewer, layer, 3)
    _click(widget, "Fill holes")
    layer.save(str(tmp_path / "saved.nii.gz"), plugin="napari-mamba-seg")
    _viewer2, _layer2, widget2 = _open(make_napari_viewer, labels.copy(), name="saved")
    assert not widget2.recovery_box.isVisibleTo(widget2)

    _click(widget, "Remove islands smaller than")  # nothing to remove: no edit
    layer.paint((6, 5, 5), 1)  # a stroke after the save goes to a new journal
    expected = layer.data.copy()
    _viewer3, layer3, widget3 = _open(make_napari_viewer, labels.copy(), name="saved")
    assert widget3.recovery_box.isVisibleTo(widget3)
    widget3.restore_button.click()
    np.testing.assert_array_equal(layer3.data, expected)
