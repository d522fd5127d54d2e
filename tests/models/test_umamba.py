"""U-Mamba specifics: where the Mamba layers sit (bottleneck vs every encoder stage), token order, 2D/3D variants."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_mamba_seg.models import create_model, get_model_entry
from napari_mamba_seg.models.umamba import TokenMambaLayer, UMambaConfig, _block_counts


def _mamba_token_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Spatial shapes of the feature maps every TokenMambaLayer of ``model`` sees in one forward pass."""
    seen = []
    hooks = [
        m.register_forward_hook(lambda _m, args, _out: seen.append(tuple(args[0].shape[2:])))
        for m in model.modules()
        if isinstance(m, TokenMambaLayer)
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return seen


def test_bottleneck_variant_mixes_only_the_deepest_stage():
    model = create_model("test_umamba_bot").eval()
    assert _mamba_token_shapes(model, torch.randn(1, 1, 32, 48)) == [(8, 12)]


def test_encoder_variant_mixes_every_encoder_stage_full_resolution_first():
    model = create_model("test_umamba_enc").eval()
    assert _mamba_token_shapes(model, torch.randn(1, 1, 32, 48)) == [(32, 48), (16, 24), (8, 12)]


def test_encoder_variant_adds_one_mamba_layer_per_shallower_stage_at_full_size():
    with torch.device("meta"):
        bot, enc = create_model("umamba_bot"), create_model("umamba_enc")
    n_bot = sum(p.numel() for p in bot.parameters())
    n_enc = sum(p.numel() for p in enc.parameters())
    extra = sum(
        p.numel() for stage in enc.stages[:-1] for m in stage if isinstance(m, TokenMambaLayer) for p in m.parameters()
    )
    assert len([m for m in enc.modules() if isinstance(m, TokenMambaLayer)]) == len(enc.config.features)
    assert extra > 0
    assert n_enc - n_bot == extra


def test_token_layer_is_causal_in_row_major_order_and_has_no_residual():
    torch.manual_seed(0)
    layer = TokenMambaLayer(dim=6, d_state=4, d_conv=4, expand=2).eval()
    x = torch.randn(1, 6, 5, 7)
    changed = x.clone()
    changed[0, :, 2, 3] = torch.randn(6)  # row-major position 2 * 7 + 3 = 17
    with torch.no_grad():
        diff = (layer(changed) - layer(x)).abs().amax(dim=1).flatten()
    assert torch.all(diff[:17] == 0), "a token changed the output of tokens before it: wrong flattening order"
    assert torch.all(diff[17:22] > 0)
    with torch.no_grad():
        nn.init.zeros_(layer.mamba.out_proj.weight)
        assert torch.all(layer(x) == 0), "the U-Mamba layer's output is the mixer's alone (no residual)"


def test_block_counts_follow_the_released_rule():
    seven = UMambaConfig()
    assert _block_counts(seven) == ((2, 2, 2, 2, 1, 1, 1), (2, 2, 2, 2, 1, 1))
    six = UMambaConfig(features=(32, 64, 128, 256, 320, 320), strides=(1, 2, 2, 2, 2, 2))
    assert _block_counts(six) == ((2, 2, 2, 1, 1, 1), (2, 2, 2, 1, 1))
    model = create_model("test_umamba_bot")  # 3 stages: (2, 2, 1) encoder, (2, 2) decoder
    assert [len([b for b in s if not isinstance(b, TokenMambaLayer)]) for s in model.stages] == [2, 2, 1]
    assert [len(s) for s in model.decoder_stages] == [2, 2]


def test_2d_and_3d_variants_use_matching_convolutions():
    for name, dims, conv in [("test_umamba_bot", 2, nn.Conv2d), ("test_umamba_enc_3d", 3, nn.Conv3d)]:
        model = create_model(name)
        assert model.spatial_dims == get_model_entry(name).spatial_dims == dims
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Conv3d)]
        assert convs and all(isinstance(m, conv) for m in convs)


def test_anisotropic_strides_keep_the_slice_axis_and_any_size():
    model = create_model("test_umamba_bot_3d", strides=(1, (1, 2, 2), (1, 2, 2)), num_classes=3).eval()
    assert model.size_divisor == (1, 4, 4)
    x = torch.randn(1, 1, 5, 13, 17)
    assert _mamba_token_shapes(model, x) == [(5, 4, 5)]  # padded to 5 x 16 x 20, in-plane stride 4
    with torch.no_grad():
        assert model(x).shape == (1, 3, 5, 13, 17)


@pytest.mark.parametrize(
    "overrides",
    [{"strides": (1, 2)}, {"mamba_placement": "decoder"}, {"encoder_blocks": (1, 1)}, {"strides": (1, (2, 2, 2), 2)}],
)
def test_inconsistent_config_is_refused(overrides):
    with pytest.raises(ValueError):
        create_model("test_umamba_bot", **overrides)


def test_input_no_larger_than_the_divisor_still_segments():
    # a 1-voxel bottleneck cannot be instance-normalised; the model pads one more divisor and crops back
    model = create_model("test_umamba_enc", num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 3, 4))
    assert out.shape == (2, 3, 3, 4)
    assert torch.isfinite(out).all()
