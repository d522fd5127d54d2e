"""Attention-Mamba specifics: the paper's parameter count, the dual path, RAM alignment, the Mamba attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_mamba_seg.models import create_model
from napari_mamba_seg.models.attention_mamba import (
    AttentionMambaConfig,
    DualPathAggregation,
    MambaAttentionFusion,
    RecursiveAlignment,
)

PAPER_PARAMS = 14.05e6


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _pyramid(batch: int, channels: int, size: int, levels: int = 4) -> list[torch.Tensor]:
    return [torch.randn(batch, channels, size // 2**i, (size + 8) // 2**i) for i in range(levels)]


def test_full_size_parameter_count_matches_the_paper():
    model = create_model("attention_mamba", in_channels=3, num_classes=9)  # Synapse: 8 organs + background
    params = _count(model)
    assert abs(params - PAPER_PARAMS) / PAPER_PARAMS < 0.05, params
    assert params == 14_050_159  # pinned: a change in the layer layout shows up here
    assert _count(model.encoder) == 11_324_992  # ResNet-18 with the 128-channel deep stem, no classifier


def test_encoder_levels_are_at_one_quarter_to_one_thirty_second():
    model = create_model("test_attention_mamba").eval()
    assert model.size_divisor == (32, 32)
    with torch.no_grad():
        features = model.encoder(torch.randn(1, 1, 64, 96))
    channels = model.config.stage_channels
    assert [tuple(f.shape) for f in features] == [
        (1, c, 64 // s, 96 // s) for c, s in zip(channels, (4, 8, 16, 32), strict=True)
    ]


def test_three_levels_give_a_size_divisor_of_16():
    model = create_model(
        "test_attention_mamba", stage_channels=(8, 12, 16), stage_blocks=(1, 1, 1), mamba_depths=(1, 1, 1)
    ).eval()
    assert model.size_divisor == (16, 16)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 37, 21)).shape == (1, 2, 37, 21)


def test_dual_path_links_every_level_both_ways():
    """Level 1 sees the coarsest level (top-down) and the coarsest level sees level 1 (bottom-up)."""
    torch.manual_seed(0)
    aggregation = DualPathAggregation((4, 6, 8, 10), feature_dim=6).eval()
    features = [torch.randn(1, c, 16 // 2**i, 16 // 2**i, requires_grad=True) for i, c in enumerate((4, 6, 8, 10))]
    out = aggregation(features)
    assert [tuple(o.shape) for o in out] == [(1, 6, 16 // 2**i, 16 // 2**i) for i in range(4)]
    top_down = torch.autograd.grad(out[0].sum(), features[-1], retain_graph=True)[0]
    bottom_up = torch.autograd.grad(out[-1].sum(), features[0])[0]
    assert top_down.abs().sum() > 0
    assert bottom_up.abs().sum() > 0


def test_alignment_brings_every_level_to_the_finest_size():
    torch.manual_seed(0)
    alignment = RecursiveAlignment(feature_dim=6, levels=4)
    features = _pyramid(2, 6, 32)
    aligned = alignment(features)
    assert len(aligned) == 4
    assert all(a.shape == features[0].shape for a in aligned)
    assert aligned[0] is features[0]


def test_alignment_with_zero_flow_is_stepwise_bilinear_upsampling():
    """With the offset convolutions zeroed, each warp is an align-corners bilinear resize to the next finer grid."""
    torch.manual_seed(0)
    alignment = RecursiveAlignment(feature_dim=4, levels=4)
    for offset in alignment.offsets:
        torch.nn.init.zeros_(offset.offset_map.weight)
    features = _pyramid(1, 4, 32)
    with torch.no_grad():
        aligned = alignment(features)
    for level in range(1, 4):
        expected = features[level]
        for finer in reversed(range(level)):
            expected = F.interpolate(expected, features[finer].shape[2:], mode="bilinear", align_corners=True)
        torch.testing.assert_close(aligned[level], expected, rtol=1e-5, atol=1e-5)


def test_alignment_flow_moves_the_sampling_points():
    torch.manual_seed(0)
    alignment = RecursiveAlignment(feature_dim=4, levels=2)
    features = _pyramid(1, 4, 16, levels=2)
    with torch.no_grad():
        warped = alignment(features)[1]
        torch.nn.init.zeros_(alignment.offsets[0].offset_map.weight)
        resized = alignment(features)[1]
    assert not torch.allclose(warped, resized)


def test_mamba_attention_weights_have_the_right_shapes_and_range():
    torch.manual_seed(0)
    fusion = MambaAttentionFusion(num_classes=3, feature_dim=8, levels=4, d_state=4, reduction=4).eval()
    features = [torch.randn(2, 8, 6, 10) for _ in range(4)]
    with torch.no_grad():
        channel, spatial = fusion(features)
    assert [tuple(c.shape) for c in channel] == [(2, 3, 1, 1)] * 4
    assert [tuple(s.shape) for s in spatial] == [(2, 1, 6, 10)] * 4
    for weights in channel + spatial:
        assert ((weights > 0) & (weights < 1)).all()


@pytest.mark.parametrize("kind", ["channel", "spatial"])
def test_mamba_attention_exchanges_information_across_scales(kind):
    """The finest level's weights depend on the coarsest level's features (forward + reverse Mamba over the levels)."""
    torch.manual_seed(0)
    fusion = MambaAttentionFusion(num_classes=2, feature_dim=8, levels=4, d_state=4, reduction=4).eval()
    features = [torch.randn(1, 8, 3, 3, requires_grad=True) for _ in range(4)]
    attend = fusion.channel_attention if kind == "channel" else fusion.spatial_attention
    finest = attend(features)[0]
    from_coarsest = torch.autograd.grad(finest.sum(), features[3], retain_graph=True)[0]
    assert from_coarsest.abs().sum() > 0
    # and the coarsest level's weights depend on the finest level's features
    from_finest = torch.autograd.grad(attend(features)[3].sum(), features[0])[0]
    assert from_finest.abs().sum() > 0


def test_spatial_attention_of_a_level_follows_its_own_features():
    torch.manual_seed(0)
    fusion = MambaAttentionFusion(num_classes=2, feature_dim=8, levels=4, d_state=4, reduction=4).eval()
    features = [torch.randn(1, 8, 6, 6) for _ in range(4)]
    changed = [features[0] + 2.0 * torch.randn_like(features[0]), *features[1:]]
    with torch.no_grad():
        before, after = fusion.spatial_attention(features)[0], fusion.spatial_attention(changed)[0]
    assert (before - after).abs().max() > 1e-3


def test_logits_are_the_attention_weighted_sum_of_the_level_predictions():
    torch.manual_seed(0)
    model = create_model("test_attention_mamba", num_classes=3).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        logits = model(x)
        features = model.level_features(x)
        channel, spatial = model.attention(features)
        fused = sum(head(f) * c * s for head, f, c, s in zip(model.heads, features, channel, spatial, strict=True))
        expected = F.interpolate(fused, size=(64, 64), mode="bilinear", align_corners=True)
    assert features[0].shape == (1, model.config.feature_dim, 16, 16)
    torch.testing.assert_close(logits, expected)


def test_inconsistent_level_lists_are_refused():
    with pytest.raises(ValueError, match="one entry per level"):
        AttentionMambaConfig(stage_channels=(64, 128, 256), stage_blocks=(2, 2, 2, 2))
    with pytest.raises(ValueError, match="deep stem"):
        AttentionMambaConfig(stem_channels=(64, 128))
