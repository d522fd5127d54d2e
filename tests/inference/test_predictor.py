"""The predictor end to end with tiny registered models: whole-image paths, batch independence, determinism,
the slice axis, TTA, cancellation, progress, input errors and bundles."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_mamba_seg.bundles import ModelCard, save_bundle
from napari_mamba_seg.inference import (
    Prediction,
    PredictionCancelled,
    PredictionProgress,
    PredictionSettings,
    Predictor,
    normalize_image,
)
from napari_mamba_seg.inference.predictor import blank_slices
from napari_mamba_seg.io import ImageGeometry, MedicalImage
from napari_mamba_seg.models import create_model


def _direct_probabilities(model, image: np.ndarray) -> np.ndarray:
    """Softmax of one forward of the whole z-score-normalised image: ``(K, *spatial)``."""
    with torch.inference_mode():
        logits = model.eval()(torch.from_numpy(normalize_image(image, {}))[None])
    return torch.softmax(logits.float(), dim=1)[0].numpy()


def _count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# ------------------------------------------------------------------------------- whole image vs sliding window


def test_2d_image_in_one_tile_matches_the_model_applied_directly(vm_unet, make_image) -> None:
    image = make_image((2, 28, 30))
    card = ModelCard(patch_size=[32, 32])  # larger than the image: one tile, padded by the model
    prediction = Predictor(vm_unet, card, PredictionSettings(return_probabilities=True)).predict(image)
    assert prediction.plan.mode == "image" and prediction.plan.num_tiles == 1
    np.testing.assert_allclose(prediction.probabilities, _direct_probabilities(vm_unet, image), atol=1e-5)
    np.testing.assert_array_equal(prediction.labels, prediction.probabilities.argmax(0))


def test_3d_volume_in_one_tile_matches_the_model_applied_directly(unet_3d, make_image) -> None:
    image = make_image((2, 7, 18, 15))
    prediction = Predictor(
        unet_3d, ModelCard(patch_size=[8, 32, 32]), PredictionSettings(return_probabilities=True)
    ).predict(image)
    assert prediction.plan.mode == "volume" and prediction.plan.tile_size == (7, 18, 15)
    np.testing.assert_allclose(prediction.probabilities, _direct_probabilities(unet_3d, image), atol=1e-5)


def test_slices_equal_the_model_applied_to_each_slice(vm_unet, image_4d) -> None:
    prediction = Predictor(vm_unet, None, PredictionSettings(return_probabilities=True, axis=0)).predict(image_4d)
    normalised = normalize_image(image_4d, {})
    with torch.inference_mode():
        logits = vm_unet(torch.from_numpy(np.moveaxis(normalised, 1, 0).copy()))
    expected = np.moveaxis(torch.softmax(logits, dim=1).numpy(), 0, 1)  # (K, slices, H, W)
    np.testing.assert_allclose(prediction.probabilities, expected, atol=1e-5)
    np.testing.assert_allclose(prediction.probabilities.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(prediction.labels, expected.argmax(0))
    assert prediction.labels.dtype == np.uint8 and prediction.labels.shape == image_4d.shape[1:]
    assert prediction.class_names == ["background", "class_1", "class_2"]


# --------------------------------------------------------------------------- batch independence, determinism


def test_slice_results_do_not_depend_on_the_batch_size(vm_unet, image_4d) -> None:
    runs = {}
    for batch_size in (1, 3, 7):
        settings = PredictionSettings(batch_size=batch_size, return_probabilities=True)
        runs[batch_size] = Predictor(vm_unet, None, settings).predict(image_4d)
        assert runs[batch_size].plan.batch_size == batch_size
        assert runs[batch_size].plan.num_steps == -(-7 // batch_size)
    for batch_size in (3, 7):
        np.testing.assert_array_equal(runs[batch_size].labels, runs[1].labels)
        np.testing.assert_allclose(runs[batch_size].probabilities, runs[1].probabilities, atol=1e-5)


def test_tiled_slice_results_do_not_depend_on_the_batch_size(vm_unet, image_4d) -> None:
    def run(batch_size: int) -> Prediction:
        settings = PredictionSettings(tile_size=(16, 16), batch_size=batch_size, return_probabilities=True)
        return Predictor(vm_unet, None, settings).predict(image_4d[:, :3])

    one, five = run(1), run(5)
    assert one.plan.tiles_per_item == 4 and five.plan.num_steps == 3
    np.testing.assert_array_equal(one.labels, five.labels)
    np.testing.assert_allclose(one.probabilities, five.probabilities, atol=1e-5)


def test_the_same_call_twice_gives_identical_results(vm_unet, image_4d) -> None:
    predictor = Predictor(vm_unet, None, PredictionSettings(tile_size=(16, 16), return_probabilities=True))
    first, second = predictor.predict(image_4d), predictor.predict(image_4d)
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.probabilities, second.probabilities)


# -------------------------------------------------------------------------------------------------- slice axis


def test_auto_axis_is_the_coarsest_spacing(per_pixel) -> None:
    predictor = Predictor(per_pixel(2), None, PredictionSettings())
    assert predictor.plan((2, 10, 12, 14), spacing=(0.7, 2.0, 0.7)).axis == 1
    assert predictor.plan((2, 10, 12, 14), spacing=(0.7, 0.7, 3.0)).axis == 2
    assert predictor.plan((2, 10, 12, 14), spacing=(1.0, 1.0, 1.0)).axis == 0  # ties: axis 0
    assert predictor.plan((2, 10, 12, 14)).axis == 0  # no spacing
    assert predictor.plan((2, 12, 14)).axis is None  # a 2D image has no slice axis


def test_a_medical_image_brings_its_spacing(vm_unet, image_4d) -> None:
    geometry = ImageGeometry.from_spacing((0.7, 0.7, 3.0))
    medical = MedicalImage(image_4d, geometry)
    from_image = Predictor(vm_unet, None, PredictionSettings()).predict(medical)
    from_array = Predictor(vm_unet, None, PredictionSettings()).predict(image_4d, spacing=(0.7, 0.7, 3.0))
    assert from_image.plan.axis == 2
    np.testing.assert_array_equal(from_image.labels, from_array.labels)


@pytest.mark.parametrize("axis", [1, 2, -1])
def test_predicting_along_an_axis_equals_moving_it_to_the_front(vm_unet, image_4d, axis: int) -> None:
    along = Predictor(vm_unet, None, PredictionSettings(axis=axis, return_probabilities=True)).predict(image_4d)
    assert along.plan.axis == axis % 3
    moved = np.ascontiguousarray(np.moveaxis(image_4d, 1 + axis % 3, 1))
    front = Predictor(vm_unet, None, PredictionSettings(axis=0, return_probabilities=True)).predict(moved)
    np.testing.assert_array_equal(along.labels, np.moveaxis(front.labels, 0, axis % 3))
    np.testing.assert_allclose(along.probabilities, np.moveaxis(front.probabilities, 1, 1 + axis % 3), atol=1e-5)


# ------------------------------------------------------------------------------------------------------- TTA


@pytest.mark.parametrize("shape", [(2, 17, 22), (2, 4, 9, 10)])
def test_tta_does_not_change_a_flip_equivariant_model(per_pixel, make_image, shape) -> None:
    model = per_pixel(2 if len(shape) == 3 else 3)
    image = make_image(shape)
    plain = Predictor(model, None, PredictionSettings(return_probabilities=True)).predict(image)
    tta = Predictor(model, None, PredictionSettings(return_probabilities=True, tta=True)).predict(image)
    assert tta.plan.tta
    np.testing.assert_allclose(tta.probabilities, plain.probabilities, atol=1e-5)


@pytest.mark.parametrize("model_name", ["vm_unet", "unet_3d"])
def test_tta_is_the_mean_of_the_flipped_predictions(model_name, request, make_image) -> None:
    model = request.getfixturevalue(model_name)
    image = make_image((2, 30, 26) if model.spatial_dims == 2 else (2, 6, 13, 11))
    spatial = image.ndim - 1
    calls = _count_forwards(model)
    tta = Predictor(model, None, PredictionSettings(tta=True, return_probabilities=True)).predict(image)
    assert calls[0] == 1 + 2**spatial  # the memory probe, then one forward per flip
    plain = Predictor(model, None, PredictionSettings(return_probabilities=True))
    flipped = []
    for mask in range(2**spatial):
        axes = tuple(a for a in range(spatial) if mask >> a & 1)
        probabilities = plain.predict(np.flip(image, tuple(1 + a for a in axes)).copy()).probabilities
        flipped.append(np.flip(probabilities, tuple(1 + a for a in axes)))
    np.testing.assert_allclose(tta.probabilities, np.mean(flipped, axis=0), atol=1e-5)
    assert not np.allclose(tta.probabilities, flipped[0], atol=1e-3)  # the flips did change something


# ------------------------------------------------------------------------------------------------ blank planes


@pytest.mark.parametrize(("model_name", "axis"), [("per_pixel_3d", 0), ("vm_unet", 0), ("vm_unet", 2)])
def test_slices_without_signal_are_background(model_name, axis, request, make_image) -> None:
    model = request.getfixturevalue(model_name)
    image = np.moveaxis(make_image((2, 7, 24, 20)), 1, 1 + axis).copy()
    blank = np.zeros(image.shape[1:], bool)
    blank[(slice(None),) * axis + (slice(-2, None),)] = True  # two end slices outside the field of view
    image[:, blank] = 0.0
    spacing = [1.0, 1.0, 1.0]
    spacing[axis] = 3.0  # the slice axis
    shown, seen = {}, {}
    Predictor(model, None).predict(image, spacing)  # any one-off probe of the model happens here, not counted below
    for blank_background in (False, True):
        settings = PredictionSettings(return_probabilities=True, blank_slices_background=blank_background)
        inputs: list[torch.Size] = []
        hook = model.register_forward_pre_hook(lambda _module, args, into=inputs: into.append(args[0].shape))
        try:
            shown[blank_background] = Predictor(model, None, settings).predict(image, spacing)
        finally:
            hook.remove()
        seen[blank_background] = sum(shape[0] for shape in inputs)
    raw, cleaned = shown[False], shown[True]
    if model.spatial_dims == 2:  # the blank slices are not even predicted
        assert (seen[False], seen[True]) == (7, 5)
        assert (raw.plan.num_tiles, cleaned.plan.num_tiles) == (7, 5)
        assert cleaned.plan.num_steps == -(-5 // cleaned.plan.batch_size)
    else:
        assert seen[False] == seen[True] and cleaned.plan == raw.plan
    assert raw.labels[blank].any(), "the model must draw something on the blank slices for this test to mean anything"
    assert not cleaned.labels[blank].any()
    np.testing.assert_array_equal(cleaned.labels[~blank], raw.labels[~blank])
    background = np.zeros((3, int(blank.sum())), np.float32)
    background[0] = 1.0
    np.testing.assert_array_equal(cleaned.probabilities[:, blank], background)
    np.testing.assert_array_equal(cleaned.probabilities[:, ~blank], raw.probabilities[:, ~blank])


def test_only_slices_constant_in_every_channel_are_blank(make_image) -> None:
    image = make_image((2, 7, 24, 20))
    image[0, 6] = 0.0  # channel 0 constant on the last slice, channel 1 not
    image[:, :, :, 0] = 0.0  # a zero column plane: not along the slice axis
    assert not blank_slices(image, 0).any()
    assert np.flatnonzero(blank_slices(image, 2)).tolist() == [0]
    image[1, 6] = 5.0
    assert np.flatnonzero(blank_slices(image, 0)).tolist() == [6]


# ------------------------------------------------------------------------------------------------ cancelling


def test_a_cancel_callable_stops_after_the_current_batch(vm_unet, image_4d) -> None:
    predictor = Predictor(vm_unet, None, PredictionSettings(batch_size=1))
    predictor.plan(image_4d.shape)  # the memory probe runs here, not counted below
    calls = _count_forwards(vm_unet)
    with pytest.raises(PredictionCancelled):
        predictor.predict(image_4d, cancel=lambda: calls[0] >= 2)
    assert 2 <= calls[0] <= 3


def test_a_set_event_cancels_before_the_first_batch(vm_unet, image_4d) -> None:
    predictor = Predictor(vm_unet)
    predictor.plan(image_4d.shape)
    calls = _count_forwards(vm_unet)
    event = threading.Event()
    event.set()
    with pytest.raises(PredictionCancelled):
        predictor.predict(image_4d, cancel=event)
    assert calls[0] == 0
    with pytest.raises(TypeError, match="cancel must be"):
        predictor.predict(image_4d, cancel="stop")


def test_closing_the_generator_early_is_safe_and_leaks_no_torch_state(vm_unet, image_4d) -> None:
    predictor = Predictor(vm_unet, None, PredictionSettings(batch_size=2))
    vm_unet.train()  # e.g. fine-tuning in between: the prediction runs in eval mode and gives the mode back
    steps = predictor.iter_predict(image_4d)
    updates = [next(steps) for _ in range(4)]
    assert updates[-1].stage == "predicting"
    # while suspended, the caller is not in inference mode (autocast is not entered on the CPU at all)
    assert not torch.is_inference_mode_enabled()
    assert not vm_unet.training
    steps.close()
    assert vm_unet.training  # the caller's mode is restored
    again = Predictor(vm_unet, None, PredictionSettings(batch_size=2)).predict(image_4d)
    assert again.labels.shape == image_4d.shape[1:]


def test_progress_reports_every_stage_and_every_batch(vm_unet, image_4d) -> None:
    updates: list[PredictionProgress] = []
    settings = PredictionSettings(batch_size=3)
    card = ModelCard(spacing=[1.0, 1.0], resample=True)
    prediction = Predictor(vm_unet, card, settings).predict(image_4d, spacing=(2, 1.2, 1.2), progress=updates.append)
    stages = [u.stage for u in updates]
    assert stages[:2] == ["normalising", "normalising"] and stages[2] == "resampling"
    predicting = [u for u in updates if u.stage == "predicting"]
    assert [u.done for u in predicting] == [1, 2, 3] == list(range(1, prediction.plan.num_steps + 1))
    assert predicting[-1].fraction == 1.0 and all(0 <= u.fraction <= 1 for u in updates)


# ----------------------------------------------------------------------------------------------------- errors


def test_channel_count_error_names_the_cards_channels(per_pixel, make_image) -> None:
    card = ModelCard(channel_names=["pre-contrast", "phase 1"])
    predictor = Predictor(per_pixel(2), card)
    with pytest.raises(ValueError, match=r"expects 2 input channel\(s\) \(pre-contrast, phase 1\).*has 1"):
        predictor.predict(make_image((1, 4, 16, 16)))


def test_a_3d_model_refuses_a_2d_image(unet_3d, make_image) -> None:
    with pytest.raises(ValueError, match="3D model and needs a volume"):
        Predictor(unet_3d).predict(make_image((2, 16, 16)))


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((2, 4, 0, 8), np.float32), "empty axis"),
        (np.zeros((2, 8), np.float32), "channel-first"),
        (np.zeros((2, 1, 2, 8, 8), np.float32), "channel-first"),
        (np.zeros((2, 4, 8, 8), np.complex64), "not real numbers"),
        (np.zeros((2, 4, 8, 8), "U1"), "not real numbers"),
        ("image.nii.gz", "must be a numpy array"),
    ],
)
def test_bad_images_raise_clear_errors(per_pixel, image, message) -> None:
    with pytest.raises(ValueError, match=message):
        Predictor(per_pixel(2)).predict(image)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_input_is_refused_with_a_fix(per_pixel, make_image, bad) -> None:
    image = make_image((2, 3, 10, 10))
    image[1, 2, 3, 4] = bad
    with pytest.raises(ValueError, match=r"channel 1 .* 1 NaN or infinite value\(s\).*np.nan_to_num"):
        Predictor(per_pixel(2)).predict(image)


def test_bad_spacing_and_settings_are_refused(per_pixel, make_image) -> None:
    predictor = Predictor(per_pixel(2))
    with pytest.raises(ValueError, match="spacing must be 3 positive"):
        predictor.predict(make_image((2, 3, 10, 10)), spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match=r"overlap must be a fraction in \[0, 1\)"):
        Predictor(per_pixel(2), None, PredictionSettings(overlap=1.0))
    with pytest.raises(ValueError, match="tile_size must give 2 positive sizes"):
        Predictor(per_pixel(2), None, PredictionSettings(tile_size=(8, 8, 8)))
    with pytest.raises(ValueError, match="Unknown precision"):
        Predictor(per_pixel(2), None, PredictionSettings(precision="fp8"))
    with pytest.raises(ValueError, match="card says 4 input channel"):
        Predictor(per_pixel(2), ModelCard(in_channels=4))


def test_array_likes_are_read(per_pixel, make_image) -> None:
    class LazyArray:  # like a dask or zarr array: converted with np.asarray
        def __init__(self, data: np.ndarray) -> None:
            self.data = data

        def __array__(self, dtype=None, copy=None) -> np.ndarray:
            return self.data

    image = make_image((2, 3, 10, 12))
    predictor = Predictor(per_pixel(2))
    np.testing.assert_array_equal(predictor.predict(LazyArray(image)).labels, predictor.predict(image).labels)


def test_integer_input_and_many_classes(per_pixel) -> None:
    image = np.random.default_rng(0).integers(0, 4000, size=(2, 3, 12, 10)).astype(np.uint16)
    prediction = Predictor(per_pixel(2, num_classes=300), None, PredictionSettings(return_probabilities=True)).predict(
        image
    )
    assert prediction.labels.dtype == np.uint16
    np.testing.assert_array_equal(prediction.labels, prediction.probabilities.argmax(0))
    np.testing.assert_allclose(prediction.probabilities.sum(0), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- bundles


def test_from_bundle_predicts_like_the_in_memory_model(tmp_path, make_image) -> None:
    torch.manual_seed(3)
    model = create_model("test_vm_unet", in_channels=2, num_classes=3)
    card = ModelCard(
        class_names=["background", "breast", "lesion"],
        channel_names=["pre", "post"],
        normalization={"method": "percentile", "lower": 1, "upper": 99},
        patch_size=[16, 16],
    )
    written = save_bundle(model, tmp_path / "bundle", card)
    image = make_image((2, 4, 24, 20))
    settings = PredictionSettings(device="cpu", return_probabilities=True)
    in_memory = Predictor(model, written, settings).predict(image)
    loaded = Predictor.from_bundle(tmp_path / "bundle", settings)
    assert loaded.folder == tmp_path / "bundle"
    from_disk = loaded.predict(image)
    assert from_disk.class_names == ["background", "breast", "lesion"]
    assert from_disk.plan.tile_size == (16, 16) and from_disk.plan.tiles_per_item == 4
    np.testing.assert_array_equal(from_disk.labels, in_memory.labels)
    np.testing.assert_allclose(from_disk.probabilities, in_memory.probabilities, atol=1e-6)
