"""Bad arguments fail early with messages that name the argument, and backend choice."""

from __future__ import annotations

import pytest
import torch

from napari_mamba_seg.kernels import BACKEND_ENV_VAR, available_backends, resolve_backend, selective_scan
from napari_mamba_seg.kernels.testing import random_scan_inputs


@pytest.fixture
def inputs():
    return random_scan_inputs(2, 8, 4, 16, groups=2, seed=0)


def _with(inputs, **changes):
    return {**inputs, **changes}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"u": torch.randn(8, 16)}, r"u must have shape \(batch, dim, L\)"),
        ({"delta": torch.randn(2, 8, 15)}, r"delta must have shape \(batch, dim, L\) = \(2, 8, 16\)"),
        ({"z": torch.randn(2, 8, 17)}, r"z must have shape \(batch, dim, L\) = \(2, 8, 16\)"),
        ({"A": torch.randn(8)}, r"A must have shape \(dim, N\)"),
        ({"A": torch.randn(7, 4)}, r"A must have shape \(dim, N\) = \(8, N\)"),
        ({"B": torch.randn(2, 2, 4, 15)}, r"B must have shape \(batch, groups, N, L\)"),
        ({"B": torch.randn(2, 4, 16, 1, 1)}, r"B must have shape \(batch, N, L\) or \(batch, groups, N, L\)"),
        ({"C": torch.randn(2, 4, 16)}, r"C must have the same shape as B"),
        (
            {"B": torch.randn(2, 3, 4, 16), "C": torch.randn(2, 3, 4, 16)},
            r"dim = 8 is not divisible by groups = 3",
        ),
        ({"D": torch.randn(7)}, r"D must have shape \(dim,\)"),
        ({"delta_bias": torch.randn(8, 1)}, r"delta_bias must have shape \(dim,\)"),
        ({"D": torch.randn(8, device="meta")}, r"D is on meta but u is on cpu"),
    ],
)
def test_bad_shapes_and_devices_raise_value_error_naming_the_argument(inputs, changes, message):
    with pytest.raises(ValueError, match=message):
        selective_scan(**_with(inputs, **changes))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"u": torch.ones(2, 8, 16, dtype=torch.int64)}, r"u has dtype torch.int64"),
        ({"A": torch.ones(8, 4, dtype=torch.complex64)}, r"A has dtype torch.complex64"),
        ({"B": [[1.0]]}, r"B must be a torch.Tensor, got list"),
    ],
)
def test_unsupported_types_raise_type_error(inputs, changes, message):
    with pytest.raises(TypeError, match=message):
        selective_scan(**_with(inputs, **changes))


def test_cpu_backend_refuses_float64_and_says_what_to_use(inputs):
    doubles = {k: v.double() for k, v in inputs.items()}
    with pytest.raises(TypeError, match="backend='reference'"):
        selective_scan(**doubles, backend="cpu")


def test_auto_picks_cpu_for_float32_and_reference_for_float64(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    assert resolve_backend("auto", "cpu", torch.float32) == "cpu"
    assert resolve_backend("auto", "cpu", torch.float16) == "cpu"
    assert resolve_backend("auto", "cpu", torch.float64) == "reference"


def test_environment_variable_overrides_auto_only(monkeypatch, inputs):
    monkeypatch.setenv(BACKEND_ENV_VAR, "reference")
    assert resolve_backend("auto", "cpu") == "reference"
    assert resolve_backend("cpu", "cpu") == "cpu"
    monkeypatch.setenv(BACKEND_ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=f"{BACKEND_ENV_VAR}='fastest' is not a selective-scan backend"):
        selective_scan(**inputs)


def test_unknown_backend_lists_the_valid_ones(inputs):
    with pytest.raises(ValueError, match="unknown selective-scan backend 'cuda'; choose from auto, reference, cpu"):
        selective_scan(**inputs, backend="cuda")


def test_unavailable_backends_say_how_to_get_them(inputs):
    with pytest.raises(ValueError, match="'mamba_ssm' is unavailable: mamba_ssm runs on CUDA tensors only"):
        selective_scan(**inputs, backend="mamba_ssm")
    reasons = available_backends()
    assert reasons["reference"] is None
    assert reasons["cpu"] is None
    if not torch.cuda.is_available():
        assert "pip install" in reasons["mamba_ssm"] or "CUDA" in reasons["mamba_ssm"]
        assert reasons["triton"] is not None


def test_mps_like_devices_run_the_cpu_backend_through_host_memory():
    assert resolve_backend("auto", "mps", torch.float32) == "cpu"


def test_empty_sequence_gives_empty_output(inputs):
    empty = random_scan_inputs(1, 4, 2, 0, seed=1)
    for backend in ("reference", "cpu"):
        out, last = selective_scan(**empty, return_last_state=True, backend=backend)
        assert out.shape == (1, 4, 0)
        assert torch.equal(last, torch.zeros(1, 4, 2))
