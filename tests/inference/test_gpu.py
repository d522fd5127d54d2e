"""CUDA: autocast on the GPU against fp32 on the CPU, repeatability on the GPU, and the probe on the GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mamba_seg.bundles import ModelCard
from napari_mamba_seg.inference import PredictionSettings, Predictor
from napari_mamba_seg.models import create_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize(
    ("name", "seed", "shape", "patch"),
    [  # seeds whose random weights give more than one class on this image (bf16 on the CPU agrees > 99.5 %)
        ("test_vm_unet", 2, (2, 12, 96, 80), [64, 64]),
        ("test_sa_umamba", 0, (2, 12, 96, 80), [64, 64]),
        ("test_unet_3d", 0, (2, 24, 64, 56), [16, 32, 32]),
    ],
)
def test_autocast_on_cuda_agrees_with_fp32_on_the_cpu(name, seed, shape, patch, make_image) -> None:
    torch.manual_seed(seed)
    model = create_model(name, in_channels=2, num_classes=3)
    card = ModelCard(patch_size=patch)
    image = make_image(shape)
    cpu = Predictor(model, card, PredictionSettings(device="cpu", batch_size=4)).predict(image)
    assert len(np.unique(cpu.labels)) >= 2  # a constant prediction would agree trivially
    gpu = Predictor(model, card, PredictionSettings(device="cuda", batch_size=4, return_probabilities=True))
    first, second = gpu.predict(image), gpu.predict(image)
    assert first.plan.precision in {"bf16", "fp16"} and first.plan.device == "cuda:0"
    agreement = np.mean(first.labels == cpu.labels)
    assert agreement > 0.99, f"{name}: only {agreement:.4f} of the voxels agree"
    np.testing.assert_array_equal(first.labels, second.labels)  # repeatable
    np.testing.assert_array_equal(first.probabilities, second.probabilities)


def test_plan_on_cuda_uses_the_gpu_budget(vm_unet) -> None:
    plan = Predictor(vm_unet, ModelCard(patch_size=[64, 64]), PredictionSettings(device="cuda")).plan(
        (2, 200, 512, 512)
    )
    free, _ = torch.cuda.mem_get_info()
    assert 0 < plan.memory_budget_mb <= free / 2**20
    assert plan.estimated_peak_mb <= plan.memory_budget_mb
    assert plan.device_mb == pytest.approx(plan.estimated_peak_mb)  # host arrays are not GPU memory
