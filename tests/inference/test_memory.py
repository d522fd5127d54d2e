"""Memory planning: the activation probe, a linear estimate, batch and tile chosen to fit the budget, a clear
MemoryError, and slice-wise prediction without whole-volume float32 accumulators."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from napari_mamba_seg.bundles import ModelCard
from napari_mamba_seg.inference import PredictionSettings, Predictor, activation_bytes_per_voxel, tile_starts
from napari_mamba_seg.inference.memory import (
    CPU_BATCH_ACTIVATION_MB,
    MAX_CPU_BATCH_SIZE,
    ForwardCost,
    cpu_batch_cap,
    shrink_tile,
)


def test_activation_probe_is_measured_once_per_model_device_and_precision(per_pixel) -> None:
    model = per_pixel(2).eval()
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    first = activation_bytes_per_voxel(model, torch.device("cpu"), "fp32")
    second = activation_bytes_per_voxel(model, torch.device("cpu"), "fp32")
    assert first == second and calls[0] == 1
    # outputs of the per-pixel model's leaf modules per voxel: 8 + 3 float32 channels (tanh is not a module)
    assert first == pytest.approx(4 * (8 + 3))
    bf16 = activation_bytes_per_voxel(model, torch.device("cpu"), "bf16")
    assert calls[0] == 2 and bf16 < first  # measured again, with half-size activations


def test_the_estimate_grows_linearly_with_batch_and_tile_voxels() -> None:
    cost = ForwardCost(
        weight_bytes=1000, activation_bytes_per_voxel=120.0, in_channels=2, num_classes=3, size_divisor=(16, 16)
    )
    by_batch = [cost.device_bytes(batch, (64, 64)) for batch in (1, 2, 3, 4)]
    assert np.allclose(np.diff(by_batch), by_batch[1] - by_batch[0])
    assert by_batch[0] - cost.weight_bytes == pytest.approx(64 * 64 * (120 + 4 * (2 + 2 * 3)))
    one_tile = cost.device_bytes(1, (64, 64)) - cost.weight_bytes
    assert cost.device_bytes(1, (128, 64)) - cost.weight_bytes == pytest.approx(2 * one_tile)
    assert cost.device_bytes(1, (128, 128)) - cost.weight_bytes == pytest.approx(4 * one_tile)
    assert cost.device_bytes(1, (60, 60)) == cost.device_bytes(1, (64, 64))  # the model pads to its divisor


def test_shrink_tile_halves_the_largest_axis_in_divisor_multiples() -> None:
    assert shrink_tile((64, 128, 128), (4, 4, 4)) == (64, 64, 128)
    assert shrink_tile((100, 40), (16, 16)) == (48, 40)
    assert shrink_tile((40, 32), (16, 16)) == (32, 32)
    assert shrink_tile((32, 32), (16, 16)) is None  # two divisors is the floor


def _plan_peak(model, card, shape, **settings) -> float:
    settings.setdefault("memory_budget_mb", 1e6)
    return Predictor(model, card, PredictionSettings(**settings)).plan(shape).estimated_peak_mb


def test_a_small_budget_lowers_the_batch_then_shrinks_the_tile(vm_unet) -> None:
    card = ModelCard(patch_size=[64, 64])
    shape = (2, 40, 64, 64)
    roomy = Predictor(vm_unet, card, PredictionSettings(device="cpu", memory_budget_mb=1e6, batch_size=4)).plan(shape)
    assert roomy.batch_size == 4 and roomy.tile_size == (64, 64)
    peaks = {batch: _plan_peak(vm_unet, card, shape, batch_size=batch) for batch in (1, 3, 4)}
    assert peaks[1] < peaks[3] < peaks[4] <= roomy.estimated_peak_mb

    def plan(budget_mb: float):  # the tiny test model's slices are small enough for CPU batches of 4
        return Predictor(vm_unet, card, PredictionSettings(device="cpu", memory_budget_mb=budget_mb)).plan(shape)

    assert plan(1e6).batch_size == 4

    between_3_and_4 = plan((peaks[3] + peaks[4]) / 2)
    assert between_3_and_4.batch_size == 3 and between_3_and_4.tile_size == (64, 64)
    just_one = plan(peaks[1] * 1.0001)
    assert just_one.batch_size == 1 and just_one.tile_size == (64, 64)
    assert just_one.estimated_peak_mb <= just_one.memory_budget_mb
    shrunk = plan(peaks[1] * 0.95)
    assert shrunk.tile_size in {(32, 64), (64, 32)} and shrunk.estimated_peak_mb <= peaks[1] * 0.95
    assert shrunk.num_tiles == 40 * len(tile_starts(64, 32, 0.5))  # each slice now needs several tiles


def test_cpu_batches_hold_little_activation_memory_unless_asked(vm_unet) -> None:
    """Automatic CPU batches hold at most CPU_BATCH_ACTIVATION_MB of activations and MAX_CPU_BATCH_SIZE items
    (bigger ones run slower there); an explicit batch size is used as given."""
    card = ModelCard(patch_size=[64, 64])
    shape = (2, 40, 64, 64)
    automatic = Predictor(vm_unet, card, PredictionSettings(device="cpu", memory_budget_mb=1e6)).plan(shape)
    per_slice_mb = automatic.device_mb / automatic.batch_size
    assert automatic.batch_size == cpu_batch_cap(per_slice_mb)
    assert 1 <= automatic.batch_size <= MAX_CPU_BATCH_SIZE
    assert automatic.batch_size == 1 or automatic.device_mb <= CPU_BATCH_ACTIVATION_MB
    asked = Predictor(vm_unet, card, PredictionSettings(device="cpu", batch_size=12, memory_budget_mb=1e6)).plan(shape)
    assert asked.batch_size == 12
    assert [cpu_batch_cap(mb) for mb in (0.5, 14, 20, 33, 64, 250)] == [4, 4, 3, 1, 1, 1]


def test_an_impossible_budget_raises_memory_error_with_the_numbers(vm_unet) -> None:
    predictor = Predictor(vm_unet, ModelCard(patch_size=[64, 64]), PredictionSettings(memory_budget_mb=0.5))
    with pytest.raises(
        MemoryError, match=r"needs about [\d,]+ MB .*budget 0(\.\d)? MB; free memory, lower --batch-size"
    ):
        predictor.plan((2, 40, 64, 64))
    # an explicit tile never shrinks: the message says so
    explicit = Predictor(vm_unet, None, PredictionSettings(tile_size=(64, 64), memory_budget_mb=2))
    with pytest.raises(MemoryError, match="tile 64×64"):
        explicit.plan((2, 40, 64, 64))


def test_slice_mode_plans_no_float32_volume_accumulators() -> None:
    from napari_mamba_seg.models import create_model

    model = create_model("test_vm_unet", in_channels=1, num_classes=3)
    shape = (1, 200, 512, 512)
    labels_only = Predictor(model, None, PredictionSettings(memory_budget_mb=4096)).plan(shape, (2.0, 0.7, 0.7))
    assert labels_only.mode == "slices" and labels_only.axis == 0 and labels_only.tiles_per_item == 1
    assert not labels_only.probability_volume and labels_only.accumulator_mb == 0
    voxels_mb = 200 * 512 * 512 / 2**20
    batch_mb = labels_only.batch_size * 512 * 512 * (1 + 3) * 4 / 2**20  # stacked slices in, probabilities out
    # host: the float32 normalised image (4 B/voxel), uint8 labels and one batch; no 3 classes × 4 B per voxel
    assert labels_only.host_mb <= 5 * voxels_mb + batch_mb
    assert labels_only.estimated_peak_mb <= 4096
    with_probabilities = Predictor(
        model, None, PredictionSettings(memory_budget_mb=1e5, return_probabilities=True)
    ).plan(shape, (2.0, 0.7, 0.7))
    assert with_probabilities.probability_volume
    assert with_probabilities.host_mb - labels_only.host_mb >= 3 * 4 * voxels_mb * 0.99


def test_slice_mode_run_allocates_far_less_than_a_probability_volume(per_pixel, make_image) -> None:
    model = per_pixel(2, in_channels=1, num_classes=16)
    image = make_image((1, 64, 128, 128))
    predictor = Predictor(model, None, PredictionSettings(batch_size=4))
    predictor.plan(image.shape)  # probe outside the measurement
    tracemalloc.start()
    try:
        prediction = predictor.predict(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert prediction.labels.shape == image.shape[1:]
    # normalised image (4 B/voxel) + labels (1 B) + small temporaries, versus 16 classes × 4 B per voxel
    probability_volume = 16 * 4 * image[0].size
    assert peak < probability_volume / 4
