"""The plain convolutional U-Net baseline: size matching, strides, norms, config round trip, convolutional locality."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from napari_mamba_seg.models import config_from_dict, config_to_dict, create_model, get_model_entry
from napari_mamba_seg.models.unet import UNetConfig

VM_UNET_PARAMS = 27.43e6  # Ruan et al. 2024


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_2d_unet_is_size_matched_to_vm_unet():
    model = create_model("unet")
    assert abs(_params(model) - VM_UNET_PARAMS) / VM_UNET_PARAMS < 0.01
    assert model.size_divisor == (32, 32)  # the same padding multiple as VM-UNet


def test_3d_unet_has_nnunet_3d_fullres_widths():
    model = create_model("unet_3d", in_channels=3, num_classes=4)
    assert get_model_entry("unet_3d").spatial_dims == 3
    assert model.config.widths == (32, 64, 128, 256, 320, 320)
    assert 30.5e6 < _params(model) < 32e6
    assert model.size_divisor == (32, 32, 32)
    assert isinstance(model.head, nn.Conv3d) and model.head.out_channels == 4


def test_anisotropic_strides_set_the_divisor_and_the_feature_grid():
    model = create_model("test_unet_3d", strides=((1, 2, 2), (2, 2, 2))).eval()
    assert model.size_divisor == (2, 4, 4)
    shapes = []
    model.encoder[-1].register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    with torch.no_grad():
        out = model(torch.randn(1, 1, 7, 13, 10))
    assert out.shape == (1, 2, 7, 13, 10)
    assert shapes == [(1, 16, 4, 4, 3)]  # padded (8, 16, 12) / (2, 4, 4)


def test_strides_survive_json():
    model = create_model("test_unet_3d", strides=((1, 2, 2), (2, 2, 2)), norm="batch")
    rebuilt = config_from_dict(UNetConfig, json.loads(json.dumps(config_to_dict(model.config))))
    assert rebuilt == model.config
    assert rebuilt.strides == ((1, 2, 2), (2, 2, 2))


def test_norm_choice_builds_the_named_layers():
    batch = create_model("test_unet", norm="batch")
    instance = create_model("test_unet")
    assert any(isinstance(m, nn.BatchNorm2d) for m in batch.modules())
    assert not any(isinstance(m, nn.InstanceNorm2d) for m in batch.modules())
    assert any(isinstance(m, nn.InstanceNorm2d) for m in instance.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in instance.modules()) == 2 * (3 + 2) + 1  # stages, head
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in instance.modules()) == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"widths": (8,)}, "widths"),
        ({"norm": "group"}, "norm"),
        ({"strides": ((2, 2),)}, "strides"),
        ({"strides": ((2, 2), (2, 2, 2))}, "strides"),
        ({"convs_per_stage": 0}, "convs_per_stage"),
    ],
)
def test_bad_config_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        create_model("test_unet", **overrides)


def test_output_is_local_and_translation_equivariant():
    """With batch norm in eval mode the U-Net is a pure convolution network: a change far away does not reach a
    pixel, and shifting the input by the size divisor shifts the logits (away from the borders)."""
    torch.manual_seed(0)
    model = create_model("test_unet", norm="batch").eval()
    x = torch.randn(1, 1, 96, 96)
    with torch.no_grad():
        base = model(x)
        far = x.clone()
        far[..., :8, :8] += 5.0
        assert torch.equal(model(far)[..., 64:, 64:], base[..., 64:, 64:])
        assert not torch.allclose(model(far)[..., :8, :8], base[..., :8, :8])
        shifted = model(torch.roll(x, shifts=(8, 12), dims=(2, 3)))
    torch.testing.assert_close(shifted[..., 40:80, 40:80], base[..., 32:72, 28:68], rtol=1e-5, atol=1e-5)
