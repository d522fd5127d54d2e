"""Device and precision selection: clear errors naming what is available, meaningful with or without CUDA."""

from __future__ import annotations

import pytest
import torch

from napari_mamba_seg.inference import (
    DeviceUnavailableError,
    PredictionSettings,
    Predictor,
    available_devices,
    resolve_precision,
    select_device,
)


def test_cpu_and_auto() -> None:
    assert select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert select_device("auto").type == expected
    assert select_device(torch.device("cpu")) == torch.device("cpu")


def test_available_devices_end_with_the_cpu_and_describe_each() -> None:
    devices = available_devices()
    assert devices[-1][0] == "cpu" and devices[-1][1].startswith("CPU (") and "core" in devices[-1][1]
    cuda = [name for name, _ in devices if name.startswith("cuda:")]
    assert len(cuda) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    for name, description in devices:
        if name.startswith("cuda:"):
            assert description.endswith(" GB)")


@pytest.mark.parametrize("text", ["gpu", "tpu", "cuda:x", "cpu:1", ""])
def test_unknown_device_strings_list_the_valid_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"use 'auto', 'cpu', 'cuda', 'cuda:N'.*Available here: .*cpu \(CPU"):
        select_device(text)


def test_cuda_requested_without_it_names_the_available_devices() -> None:
    if torch.cuda.is_available():
        # with CUDA the same error appears for a GPU index this machine does not have
        missing = f"cuda:{torch.cuda.device_count()}"
        with pytest.raises(DeviceUnavailableError, match=rf"has {torch.cuda.device_count()} CUDA device"):
            select_device(missing)
        assert select_device("cuda") == torch.device("cuda", 0)
    else:
        with pytest.raises(DeviceUnavailableError, match=r"no CUDA GPU is usable.*Available: cpu \(CPU"):
            select_device("cuda")
        with pytest.raises(DeviceUnavailableError, match="--device cpu"):
            Predictor.from_bundle("does-not-matter", PredictionSettings(device="cuda:0"))


def test_unavailable_mps_is_refused_clearly() -> None:
    if torch.backends.mps.is_available():
        assert select_device("mps") == torch.device("mps")
    else:
        with pytest.raises(DeviceUnavailableError, match=r"'mps'.*not available.*available: "):
            select_device("mps")


def test_precisions() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"  # never autocast on the CPU by default
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="auto, fp32, bf16, fp16"):
        resolve_precision("int8", cpu)
    if torch.cuda.is_available():
        assert resolve_precision("auto", torch.device("cuda", 0)) in {"bf16", "fp16"}


def test_predictor_refuses_an_unknown_device(per_pixel) -> None:
    with pytest.raises(ValueError, match="Unknown device 'tpu'"):
        Predictor(per_pixel(2), None, PredictionSettings(device="tpu"))


def test_cpu_bf16_autocast_is_honoured_when_asked(vm_unet, image_4d) -> None:
    fp32 = Predictor(vm_unet, None, PredictionSettings(device="cpu", return_probabilities=True)).predict(image_4d)
    bf16 = Predictor(vm_unet, None, PredictionSettings(device="cpu", precision="bf16", return_probabilities=True))
    result = bf16.predict(image_4d)
    assert result.plan.precision == "bf16" and result.probabilities.dtype == "float32"
    difference = abs(result.probabilities - fp32.probabilities).max()
    assert 0 < difference < 0.1  # really ran in bfloat16, and still close
