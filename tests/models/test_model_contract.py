"""The shared contract every registered architecture meets, run over each tiny ``test_`` variant (smp-style).

A new architecture is covered as soon as it registers its ``test_<name>`` variant.
"""

from __future__ import annotations

import pytest
import torch

from napari_mamba_seg.models import create_model, get_model_entry, list_models, set_scan_backend

TEST_MODELS = list_models("test_", include_test=True)
MODELS_2D = [n for n in TEST_MODELS if get_model_entry(n).spatial_dims == 2]
MODELS_3D = [n for n in TEST_MODELS if get_model_entry(n).spatial_dims == 3]


def test_every_architecture_has_a_test_variant():
    full = list_models()
    assert full, "no architecture registered"
    missing = [name for name in full if f"test_{name}" not in TEST_MODELS]
    assert not missing, f"architectures without a registered test_ variant: {missing}"


def _shapes(name: str) -> list[tuple[int, ...]]:
    if get_model_entry(name).spatial_dims == 2:
        return [(1, 1, 97, 131), (2, 3, 64, 64)]
    return [(1, 1, 40, 61, 53)]


@pytest.mark.parametrize("name", TEST_MODELS)
def test_forward_shape_on_odd_sizes(name):
    torch.manual_seed(0)
    for shape in _shapes(name):
        model = create_model(name, in_channels=shape[1], num_classes=3).eval()
        with torch.no_grad():
            out = model(torch.randn(shape))
        assert out.shape == (shape[0], 3, *shape[2:]), f"{name} on {shape}"
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", TEST_MODELS)
def test_inputs_smaller_than_the_size_divisor(name):
    """A tiny crop (smaller than the network's total down-sampling) still segments, in train mode too (instance
    and batch norm need more than one value in the deepest feature map)."""
    torch.manual_seed(0)
    shape = (2, 1, 5, 7) if get_model_entry(name).spatial_dims == 2 else (2, 1, 3, 5, 4)
    model = create_model(name)
    for mode in (model.eval, model.train):
        mode()
        with torch.no_grad():
            out = model(torch.randn(shape))
        assert out.shape == (2, 2, *shape[2:]) and torch.isfinite(out).all(), name


@pytest.mark.parametrize("name", TEST_MODELS)
def test_every_parameter_gets_a_finite_gradient(name):
    torch.manual_seed(0)
    shape = _shapes(name)[-1]
    model = create_model(name, in_channels=shape[1], num_classes=2).train()
    out = model(torch.randn(shape))
    target = torch.randint(0, 2, (shape[0], *shape[2:]))
    torch.nn.functional.cross_entropy(out, target).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"{name}: parameters with no gradient (unused?): {no_grad[:10]}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"{name}: non-finite gradients in {bad[:10]}"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_eval_mode_is_deterministic(name):
    torch.manual_seed(0)
    shape = _shapes(name)[0]
    model = create_model(name, in_channels=shape[1]).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        first, second = model(x), model(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_reference_and_cpu_scan_backends_agree(name):
    torch.manual_seed(0)
    shape = _shapes(name)[0]
    model = create_model(name, in_channels=shape[1]).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        cpu = set_scan_backend(model, "cpu")(x)
        reference = set_scan_backend(model, "reference")(x)
    err = ((cpu - reference).norm() / reference.norm().clamp_min(1e-12)).item()
    assert err < 1e-4, f"{name}: cpu vs reference scan, relative error {err:.2e}"


@pytest.mark.parametrize("name", TEST_MODELS)
def test_bad_input_gets_a_clear_error(name):
    shape = _shapes(name)[0]
    model = create_model(name, in_channels=1).eval()
    with pytest.raises(ValueError, match="input channel"):
        model(torch.randn(shape[0], 2, *shape[2:]))
    with pytest.raises(ValueError, match="dimensions"):
        model(torch.randn(shape[2:]))
    x = torch.randn(shape)
    x[..., 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(x)
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(shape, dtype=torch.int64))
