"""The Fine-tune widget, opened through the manifest: segment -> correct -> review -> fine-tune -> re-segment through
the real widgets, a cancelled run that saves nothing, refusals with a message, and the versions list."""

from __future__ import annotations

import html
import json

import numpy as np
import pytest

from napari_mamba_seg._napari import _finetune_widget
from napari_mamba_seg._napari._segment_widget import RESULT_KEY
from napari_mamba_seg.interactive import REVIEW_METADATA_KEY, ReviewState
from napari_mamba_seg.training.finetune import ModelVersions

PLUGIN = "napari-mamba-seg"
SCALE = (2.0, 0.5, 0.5)
SHAPE = (6, 32, 32)
CLASSES = ["background", "lesion"]

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A 1-channel, 2-class test_unet bundle with random (seeded) weights and 32x32 training patches."""
    import torch

    from napari_mamba_seg.bundles import ModelCard, save_bundle
    from napari_mamba_seg.models import create_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bundle") / "tiny"
    model = create_model("test_unet", in_channels=1, num_classes=len(CLASSES))
    save_bundle(model, folder, ModelCard(class_names=CLASSES, patch_size=[32, 32]))
    return folder


@pytest.fixture
def models_root(tmp_path, monkeypatch):
    """versions_root() for this test: an empty folder of its own."""
    root = tmp_path / "models"
    monkeypatch.setenv("NAPARI_MAMBA_SEG_MODELS", str(root))
    return root


@pytest.fixture
def errors(monkeypatch):
    """The error notifications the widget raised (through its status line)."""
    from napari_mamba_seg._napari import _status

    shown: list[str] = []
    monkeypatch.setattr(_status, "show_error", shown.append)
    return shown


def _disk(radius: float, centre=(16, 16)) -> np.ndarray:
    y, x = np.mgrid[: SHAPE[1], : SHAPE[2]]
    return (y - centre[0]) ** 2 + (x - centre[1]) ** 2 <= radius**2


def _scan() -> np.ndarray:
    """A bright disk in noise, on every slice."""
    image = np.random.default_rng(0).normal(0.2, 0.05, SHAPE).astype(np.float32)
    image[:, _disk(7)] += 0.6
    return image


def _corrected_layer(viewer, model: str, reviewed: list[int] | None, name: str = "scan · tiny"):
    """A Labels layer as the Segment and Correct widgets leave it: the model, the image layer, the review state."""
    if "scan" not in viewer.layers:
        viewer.add_image(_scan(), name="scan", scale=SCALE)
    metadata = {RESULT_KEY: {"model": model, "model_sha256": "", "image_layers": ["scan"]}}
    if reviewed is not None:
        metadata[REVIEW_METADATA_KEY] = ReviewState(0, SHAPE[0], set(reviewed)).to_dict()
    labels = np.broadcast_to(_disk(7), SHAPE).astype(np.uint8)
    return viewer.add_labels(labels, name=name, scale=SCALE, metadata=metadata)


def _open(viewer, steps: int):
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    widget.device_box.setCurrentIndex(widget.device_box.findData("cpu"))
    widget.steps.setValue(steps)
    return widget


def _finish(qtbot, widget) -> None:
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)


def _segment(viewer, qtbot, bundle):
    _dock, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    segment.add_bundle_folder(str(bundle))
    segment.device_box.setCurrentIndex(segment.device_box.findData("cpu"))
    segment.layer_list.item(0).setSelected(True)
    segment.run_button.click()
    _finish(qtbot, segment)
    return viewer.layers[-1]


def _status(widget) -> str:
    """The status line as the user reads it (the label holds rich text)."""
    return html.unescape(widget.status.text())


def _line_pixels(widget, colour=None) -> int:
    """How many pixels of the plot have the colour of the loss line (or ``colour``)."""
    image = widget.grab().toImage()
    colour = colour or _finetune_widget.LOSS_COLOUR
    found = 0
    for x in range(image.width()):
        for y in range(image.height()):
            pixel = image.pixelColor(x, y)
            differences = (pixel.red() - colour.red(), pixel.green() - colour.green(), pixel.blue() - colour.blue())
            found += max(abs(d) for d in differences) < 20
    return found


def test_segment_correct_review_finetune_then_resegment_unreviewed_slices(
    make_napari_viewer, qtbot, tiny_bundle, models_root, errors
) -> None:
    """The acceptance test of the issue, through the real Segment, Correct and Fine-tune widgets."""
    from napari_mamba_seg.bundles import read_card
    from napari_mamba_seg.inference import PredictionSettings, Predictor

    viewer = make_napari_viewer()
    image = viewer.add_image(_scan(), name="scan", scale=SCALE)
    labels = _segment(viewer, qtbot, tiny_bundle)
    assert labels.metadata[RESULT_KEY]["model"] == str(tiny_bundle)

    _dock, correct = viewer.window.add_plugin_dock_widget(PLUGIN, "Correct")
    assert correct.labels_box.currentText() == labels.name
    for index in (1, 4):  # the clinician corrects two slices and marks them reviewed
        viewer.dims.set_point(0, index * SCALE[0])
        labels.data[index] = _disk(7 + index)
        correct.buttons["Mark slice reviewed"].click()
    assert labels.metadata[REVIEW_METADATA_KEY]["reviewed"] == [1, 4]
    labels.data[2] = 1  # a slice scribbled on but not reviewed: re-segmenting replaces it
    reviewed_slices = labels.data[[1, 4]].copy()

    widget = _open(viewer, steps=3)
    assert [layer.name for layer in widget.chosen_layers()] == [labels.name]
    assert "2 reviewed slice(s), 1 to train on, 1 held out" in widget.summary.text()
    assert not widget.resegment_button.isEnabled()
    widget.run_button.click()
    assert widget.worker is not None and not widget.run_button.isEnabled()  # runs in the background
    _finish(qtbot, widget)

    version = models_root / "tiny-ft1"
    assert not errors, errors
    assert (version / "card.json").is_file() and (version / "model.safetensors").is_file()
    provenance = json.loads((version / "provenance.json").read_text())
    study = provenance["studies"][0]
    assert (study["name"], study["train_slices"], study["holdout_slices"]) == (labels.name, [1], [4])
    assert [step for step, _loss in widget.loss_plot.points] == [1, 2, 3]
    assert all(np.isfinite(loss) for _step, loss in widget.loss_plot.points)
    assert _line_pixels(widget.loss_plot) > 20  # the polyline is drawn
    before, after = provenance["holdout_mean_dice_before"], provenance["holdout_mean_dice_after"]
    assert widget.loss_plot.dice_points == [(0, before), (3, after)]  # the parent's score, then after the last step
    assert _line_pixels(widget.loss_plot, _finetune_widget.DICE_COLOUR) > 20
    assert f"before {before:.3f} → after {after:.3f}" in widget.dice_label.text()
    assert provenance["reason"] in _status(widget) and "tiny-ft1" in _status(widget)
    assert widget.progress.value() == 100 and widget.resegment_button.isEnabled()

    # the versions list shows the new version and which one is active; activating another switches it
    versions = ModelVersions(models_root)
    active = versions.active("tiny")
    assert active == ("tiny-ft1" if provenance["activated"] else "tiny")
    assert widget.versions_shown() == [("tiny", active == "tiny"), ("tiny-ft1", active == "tiny-ft1")]
    assert "holdout_mean_dice_after" in widget.versions_list.item(1).text()
    assert "not readable" not in widget.versions_list.item(0).text()  # the original's card, found via the parent
    other = "tiny" if active == "tiny-ft1" else "tiny-ft1"
    widget.versions_list.clearSelection()
    widget.versions_list.item([name for name, _ in widget.versions_shown()].index(other)).setSelected(True)
    widget.activate_button.click()
    assert versions.active("tiny") == other
    assert dict(widget.versions_shown()) == {other: True, active: False}

    # re-segment: the new version's prediction on the unreviewed slices, the reviewed ones untouched bit for bit
    widget.resegment_button.click()
    _finish(qtbot, widget)
    assert not errors, errors
    expected = Predictor.from_bundle(version, PredictionSettings(device="cpu")).predict(image.data[None], SCALE)
    unreviewed = [0, 2, 3, 5]
    np.testing.assert_array_equal(labels.data[unreviewed], expected.labels[unreviewed])
    np.testing.assert_array_equal(labels.data[[1, 4]], reviewed_slices)
    assert labels.metadata[RESULT_KEY]["model"] == str(version)  # later fine-tunes start from the new version
    assert labels.metadata[RESULT_KEY]["model_sha256"] == read_card(version).sha256
    assert "re-segmented with tiny-ft1" in _status(widget)


def test_cancel_mid_run_saves_nothing_and_keeps_the_active_model(
    make_napari_viewer, qtbot, tiny_bundle, models_root, errors
) -> None:
    from napari_mamba_seg.bundles import load_bundle, save_bundle

    parent = load_bundle(tiny_bundle)  # an earlier fine-tuned version, the active one
    save_bundle(parent.model, models_root / "tiny-ft1", parent.fine_tuned_card())
    versions = ModelVersions(models_root)
    versions.add("tiny", "tiny-ft1", "tiny", activate=True)
    viewer = make_napari_viewer()
    _corrected_layer(viewer, str(models_root / "tiny-ft1"), reviewed=[1, 3])
    widget = _open(viewer, steps=10_000)
    assert widget.versions_shown() == [("tiny", False), ("tiny-ft1", True)]
    assert "not readable" not in widget.versions_list.item(0).text()

    widget.run_button.click()
    qtbot.waitUntil(lambda: len(widget.loss_plot.points) >= 1, timeout=60_000)
    widget.cancel_button.click()
    _finish(qtbot, widget)

    assert len(widget.loss_plot.points) < 10_000
    assert sorted(path.name for path in models_root.iterdir() if path.is_dir()) == ["tiny-ft1"]
    assert versions.versions("tiny") == ["tiny", "tiny-ft1"] and versions.active("tiny") == "tiny-ft1"
    assert "cancelled" in _status(widget) and "nothing was saved" in _status(widget)
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert not widget.resegment_button.isEnabled() and not errors


def test_layers_that_cannot_be_fine_tuned_are_refused_with_a_message(
    make_napari_viewer, tiny_bundle, models_root, errors
) -> None:
    viewer = make_napari_viewer()
    unreviewed = _corrected_layer(viewer, str(tiny_bundle), reviewed=None, name="not reviewed")
    widget = _open(viewer, steps=3)
    assert [layer.name for layer in widget.chosen_layers()] == ["not reviewed"]
    assert "has no reviewed slice" in widget.summary.text()
    widget.run_button.click()
    assert widget.worker is None
    assert "'not reviewed' has no reviewed slice" in _status(widget)
    assert len(errors) == 1 and "Mark slice reviewed" in errors[0]

    unreviewed.metadata = {**unreviewed.metadata, REVIEW_METADATA_KEY: ReviewState(0, SHAPE[0], {2}).to_dict()}
    assert "1 reviewed slice(s), 1 to train on, 0 held out" in widget.summary.text()  # follows the review state

    _corrected_layer(viewer, "another-model", reviewed=[1], name="other model")
    widget.choose(["not reviewed", "other model"])
    widget.run_button.click()
    assert "different models" in _status(widget) and widget.worker is None

    viewer.add_labels(np.zeros(SHAPE, np.uint8), name="hand drawn")
    assert [layer.name for layer in widget.chosen_layers()] == ["hand drawn"]  # a new layer becomes the choice
    widget.run_button.click()
    assert "not made by the Segment widget" in _status(widget) and widget.worker is None
    assert not widget.activate_button.isEnabled() and widget.versions_list.count() == 0
    assert len(errors) == 3 and not models_root.exists()


def test_changed_voxels_weighted_and_encoder_frozen_from_the_form(
    make_napari_viewer, qtbot, tiny_bundle, models_root, errors
) -> None:
    """With "Changed voxels ×" above 1 the widget predicts the study again to find the voxels the clinician changed;
    with "freeze the encoder" the new version's encoder weights equal the parent's; "anchor" uses that prediction."""
    import torch

    from napari_mamba_seg.bundles import load_bundle

    viewer = make_napari_viewer()
    viewer.add_image(_scan(), name="scan", scale=SCALE)
    labels = _segment(viewer, qtbot, tiny_bundle)
    predicted = labels.data.copy()
    labels.data[1] = _disk(8)
    labels.data[4] = _disk(11)
    changed_on_train_slice = int((labels.data[1] != predicted[1]).sum())
    labels.metadata = {
        **labels.metadata,
        REVIEW_METADATA_KEY: ReviewState(axis=0, num_slices=SHAPE[0], reviewed={1, 4}).to_dict(),
    }
    widget = _open(viewer, steps=2)
    widget.changed_weight.setValue(4.0)
    widget.freeze_encoder.setChecked(True)
    widget.anchor.setChecked(True)
    widget.run_button.click()
    _finish(qtbot, widget)
    assert not errors, errors

    version = models_root / "tiny-ft1"
    provenance = json.loads((version / "provenance.json").read_text())
    assert provenance["changed_voxels_weighted"] is True
    assert provenance["studies"][0]["changed_train_voxels"] == changed_on_train_slice > 0
    assert provenance["settings"]["changed_weight"] == 4.0 and provenance["settings"]["freeze_encoder"] is True
    assert provenance["settings"]["anchor"] is True
    assert provenance["studies"][0]["anchor_labels"] == "the study's prediction"  # the widget's own prediction
    parent, child = load_bundle(tiny_bundle).model, load_bundle(version).model
    encoder_ids = {id(parameter) for parameter in parent.encoder_parameters()}
    encoder = {name for name, parameter in parent.named_parameters() if id(parameter) in encoder_ids}
    child_parameters = dict(child.named_parameters())
    assert encoder and all(torch.equal(p, child_parameters[n]) for n, p in parent.named_parameters() if n in encoder)
    assert any(not torch.equal(p, child_parameters[n]) for n, p in parent.named_parameters() if n not in encoder)


def test_the_form_scrolls_in_a_short_dock_instead_of_squeezing(make_napari_viewer, qtbot) -> None:
    """The form is about 800 px tall; in a 300 px dock it scrolls, every part at its own height, none overlapping."""
    viewer = make_napari_viewer()
    widget = _open(viewer, steps=3)
    widget.setParent(None)  # out of the dock, to set its height
    widget.resize(420, 300)
    widget.show()
    qtbot.waitExposed(widget)
    content = widget.scroll.widget()
    assert widget.minimumSizeHint().height() < 300
    assert content.height() >= content.minimumSizeHint().height() > 300  # not squeezed: taller than the view
    assert widget.scroll.verticalScrollBar().maximum() > 0
    assert widget.scroll.viewport().width() >= content.minimumSizeHint().width()  # nothing cut off at the side
    parts = [widget.layer_list, widget.summary, widget.steps, widget.controls, widget.loss_plot, widget.versions_list]
    tops = [part.mapTo(content, part.rect().topLeft()).y() for part in parts]
    bottoms = [top + part.height() for top, part in zip(tops, parts, strict=True)]
    assert all(bottom <= next_top for bottom, next_top in zip(bottoms, tops[1:], strict=False))
    widget.close()
