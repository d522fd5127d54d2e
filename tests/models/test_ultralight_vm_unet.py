"""UltraLight VM-UNet specifics: the paper's parameter count, the shared-Mamba PVM layer, the attention bridge."""

from __future__ import annotations

import pytest
import torch

from napari_mamba_seg.models import create_model
from napari_mamba_seg.models.layers.mamba import Mamba
from napari_mamba_seg.models.ultralight_vm_unet import (
    PVMLayer,
    SpatialChannelAttentionBridge,
    UltraLightVMUNetConfig,
)

PAPER_PARAMS = 0.049e6


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_full_size_parameter_count_matches_the_paper():
    model = create_model(
        "ultralight_vm_unet", in_channels=3, num_classes=1, c_list=(8, 16, 24, 32, 48, 64), split_att="fc", bridge=True
    )
    params = _count(model)
    assert abs(params - PAPER_PARAMS) / PAPER_PARAMS < 0.05, params
    assert params == 49_457  # pinned: a change in the layer layout shows up here


def test_pvm_layer_holds_one_mamba_on_a_quarter_of_the_channels():
    layer = PVMLayer(64, 48)
    mambas = [m for m in layer.modules() if isinstance(m, Mamba)]
    assert len(mambas) == 1
    assert mambas[0].d_model == 16
    # the shared Mamba(16) has about a tenth of the parameters of one Mamba over all 64 channels
    assert _count(layer.mamba) < _count(Mamba(64)) / 8


def test_pvm_layer_treats_every_chunk_with_the_same_mamba():
    """Permuting the 4 channel chunks of the input permutes the output chunks: only true for one shared mixer."""
    torch.manual_seed(0)
    layer = PVMLayer(16, 16, d_state=4).eval()
    with torch.no_grad():
        layer.proj.weight.copy_(torch.eye(16))
        layer.proj.bias.zero_()
    x = torch.randn(2, 16, 5, 7)
    order = [2, 0, 3, 1]
    permuted = torch.cat([x.chunk(4, dim=1)[i] for i in order], dim=1)
    with torch.no_grad():
        out = layer(x)
        out_permuted = layer(permuted)
    expected = torch.cat([out.chunk(4, dim=1)[i] for i in order], dim=1)
    torch.testing.assert_close(out_permuted, expected, rtol=1e-4, atol=1e-5)
    assert out.shape == (2, 16, 5, 7)


def test_pvm_layer_mixes_along_the_tokens():
    """The Mamba scan makes a later token depend on an earlier one (the layer is not pointwise)."""
    torch.manual_seed(0)
    layer = PVMLayer(8, 8, d_state=4).eval()
    x = torch.randn(1, 8, 4, 4)
    changed = x.clone()
    changed[..., 0, 0] += torch.randn(1, 8)  # not a constant shift: LayerNorm would remove that
    with torch.no_grad():
        delta = (layer(changed) - layer(x)).abs()
    assert delta[..., 3, 3].max() > 1e-6


def test_attention_bridge_keeps_shapes_and_shares_the_spatial_convolution():
    torch.manual_seed(0)
    widths = (4, 8, 12, 16, 20)
    bridge = SpatialChannelAttentionBridge(widths).eval()
    skips = [torch.randn(2, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate(widths)]
    with torch.no_grad():
        out = bridge(skips)
    assert [o.shape for o in out] == [s.shape for s in skips]
    assert _count(bridge.satt) == 2 * 7 * 7 + 1  # one 7×7 conv for all five levels
    assert len(bridge.catt.atts) == len(widths)


def test_channel_attention_exchanges_information_across_levels():
    torch.manual_seed(0)
    widths = (4, 8, 12, 16, 20)
    bridge = SpatialChannelAttentionBridge(widths).eval()
    skips = [torch.randn(1, c, 16 // 2**i, 16 // 2**i) for i, c in enumerate(widths)]
    changed = [s.clone() for s in skips]
    changed[-1] += 3.0  # only the deepest level changes
    with torch.no_grad():
        first_before = bridge.catt(skips)[0]
        first_after = bridge.catt(changed)[0]
    assert first_before.shape == (1, 4, 1, 1)
    assert not torch.allclose(first_before, first_after)


def test_without_bridge_the_skips_are_plain_and_the_model_is_smaller():
    with_bridge = create_model("test_ultralight_vm_unet")
    without = create_model("test_ultralight_vm_unet", bridge=False)
    assert not hasattr(without, "scab")
    assert _count(without) < _count(with_bridge)
    with torch.no_grad():
        assert without.eval()(torch.randn(1, 1, 40, 40)).shape == (1, 2, 40, 40)


def test_conv_split_attention_has_the_same_size_and_runs():
    fc = create_model("test_ultralight_vm_unet", split_att="fc")
    conv = create_model("test_ultralight_vm_unet", split_att="conv").eval()
    assert _count(fc) == _count(conv)
    with torch.no_grad():
        assert conv(torch.randn(2, 1, 33, 70)).shape == (2, 2, 33, 70)


def test_size_divisor_is_32_and_logits_are_not_squashed():
    model = create_model("test_ultralight_vm_unet", num_classes=1).eval()
    assert model.size_divisor == (32, 32)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(torch.randn(1, 1, 64, 64) * 5)
    assert out.min() < 0 or out.max() > 1  # logits, not the official sigmoid output


@pytest.mark.parametrize(
    ("field", "value"), [("c_list", (8, 16, 24, 32, 48)), ("c_list", (8, 16, 24, 30, 48, 64)), ("split_att", "mlp")]
)
def test_invalid_config_is_refused(field, value):
    with pytest.raises(ValueError, match=field):
        UltraLightVMUNetConfig(**{field: value})
