"""SegMamba specifics: the tri-orientated scan orders, ToM = three Mamba scans, GSC gating, FUE, slices per scale,
and the full-size parameter count against the released code."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from napari_mamba_seg.models import create_model
from napari_mamba_seg.models.layers.mamba import Mamba
from napari_mamba_seg.models.layers.tri_mamba import (
    DIRECTIONS,
    TriOrientedMamba,
    inter_slice_order,
    orient,
    restore,
)
from napari_mamba_seg.models.segmamba import GatedSpatialConv, feature_uncertainty, uncertainty_enhance


def test_inter_slice_order_visits_every_slice_at_one_position_before_moving_on():
    seq = torch.arange(12)  # 3 slices of 4 in-plane positions, slice-major
    assert inter_slice_order(seq, 3).tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
    volume = torch.arange(3 * 2 * 5).reshape(3, 2, 5)  # (D, H, W)
    assert torch.equal(inter_slice_order(volume.flatten(), 3), volume.permute(1, 2, 0).flatten())


def test_the_three_orders_are_distinct_permutations_that_restore():
    seq = torch.randn(2, 4, 3 * 20)
    orders = [orient(seq, d, slices=3) for d in DIRECTIONS]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.equal(orders[i], orders[j]), f"{DIRECTIONS[i]} and {DIRECTIONS[j]} scan alike"
    for d, o in zip(DIRECTIONS, orders, strict=True):
        assert torch.equal(torch.sort(o, dim=-1).values, torch.sort(seq, dim=-1).values)  # a permutation
        assert torch.equal(restore(o, d, slices=3), seq)


def _mamba_for_direction(tom: TriOrientedMamba, k: int) -> Mamba:
    """A plain Mamba mixer holding direction ``k``'s parameters of ``tom`` (in/out projections shared)."""
    m = Mamba(tom.d_model, d_state=tom.d_state, d_conv=tom.d_conv, expand=tom.d_inner // tom.d_model)
    d = tom.d_inner
    with torch.no_grad():
        m.in_proj.weight.copy_(tom.in_proj.weight)
        m.out_proj.weight.copy_(tom.out_proj.weight)
        m.conv1d.weight.copy_(tom.conv1d_weight[k * d : (k + 1) * d])
        m.conv1d.bias.copy_(tom.conv1d_bias[k * d : (k + 1) * d])
        m.x_proj.weight.copy_(tom.x_proj_weight[k])
        m.dt_proj.weight.copy_(tom.dt_proj_weight[k])
        m.dt_proj.bias.copy_(tom.dt_proj_bias[k])
        m.A_log.copy_(tom.A_log[k * d : (k + 1) * d])
        m.D.copy_(tom.D[k * d : (k + 1) * d])
    return m


def test_tom_is_the_sum_of_three_mamba_scans_in_the_three_orders():
    torch.manual_seed(0)
    tom = TriOrientedMamba(d_model=8, d_state=4).eval()
    slices, plane = 4, 6
    x = torch.randn(2, slices * plane, 8)
    with torch.no_grad():
        expected = sum(
            restore(
                _mamba_for_direction(tom, k)(orient(x.transpose(1, 2), d, slices).transpose(1, 2)).transpose(1, 2),
                d,
                slices,
            )
            for k, d in enumerate(DIRECTIONS)
        ).transpose(1, 2)
        torch.testing.assert_close(tom(x, slices=slices), expected, rtol=1e-5, atol=1e-6)


def test_tom_sees_the_whole_volume_where_plain_mamba_is_causal():
    torch.manual_seed(0)
    tom, mamba = TriOrientedMamba(d_model=8, d_state=4).eval(), Mamba(8, d_state=4).eval()
    x = torch.randn(1, 24, 8)
    changed = x.clone()
    changed[0, -1] = torch.randn(8)
    with torch.no_grad():
        assert torch.equal(mamba(changed)[0, 0], mamba(x)[0, 0])
        assert not torch.allclose(tom(changed, slices=4)[0, 0], tom(x, slices=4)[0, 0])
        # the slice count changes the inter-slice order, so the result
        assert not torch.allclose(tom(x, slices=4), tom(x, slices=2))
    with pytest.raises(ValueError, match="slices"):
        tom(x, slices=5)


def test_gsc_is_gated_a_silent_branch_closes_the_gate():
    torch.manual_seed(0)
    gsc = GatedSpatialConv(4).eval()
    x = torch.randn(1, 4, 6, 7, 8)
    with torch.no_grad():
        assert (gsc(x) - x).abs().max() > 0.1
        nn.init.zeros_(gsc.gate[0].weight)  # the 1×1×1 branch gives 0 everywhere: the gate closes,
        nn.init.zeros_(gsc.gate[0].bias)
        # the spatial branch no longer passes and GSC is the identity (a sum of the branches would not be)
        torch.testing.assert_close(gsc(x), x, rtol=0, atol=1e-4)


def test_feature_uncertainty_is_the_entropy_term_of_the_channel_mean():
    z = torch.zeros(1, 3, 2, 2, 2)
    torch.testing.assert_close(feature_uncertainty(z), torch.full((1, 1, 2, 2, 2), math.log(2) / 2))
    z = torch.randn(2, 5, 3, 4, 4)
    p = torch.sigmoid(z.mean(1, keepdim=True))
    u = -p * torch.log(p)
    torch.testing.assert_close(uncertainty_enhance(z), z * (2 - u))
    assert float(feature_uncertainty(torch.full((1, 1, 1), 1e4)).max()) == 0.0  # saturated, not NaN
    assert float(feature_uncertainty(torch.full((1, 1, 1), -1e4)).max()) == 0.0


def test_uncertainty_estimation_changes_the_output_not_the_parameters():
    torch.manual_seed(0)
    small = {"dims": (12, 8, 8), "depths": (1, 1, 1)}  # three scales: a smaller volume suffices
    with_fue = create_model("test_segmamba", **small).eval()
    without = create_model("test_segmamba", uncertainty_estimation=False, **small).eval()
    without.load_state_dict(with_fue.state_dict())  # same parameters, strict
    x = torch.randn(1, 1, 8, 8, 16)
    with torch.no_grad():
        assert not torch.allclose(with_fue(x), without(x))


def test_inter_slice_scan_runs_along_the_first_spatial_axis_at_every_scale():
    model = create_model("test_segmamba").eval()
    seen = []
    hooks = [
        m.register_forward_hook(
            lambda _m, args, kwargs, _o: seen.append((args[0].shape[1], kwargs["slices"])), with_kwargs=True
        )
        for m in model.modules()
        if isinstance(m, TriOrientedMamba)
    ]
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 16, 20)).shape == (1, 2, 32, 16, 20)  # padded to 32 x 16 x 32
    for hook in hooks:
        hook.remove()
    # scale i holds (32, 16, 32) / 2**(i + 1) voxels: slices = 32 / 2**(i + 1)
    assert seen == [(16 * 8 * 16, 16), (8 * 4 * 8, 8), (4 * 2 * 4, 4), (2 * 1 * 2, 2)]


def _released_segmamba_parameters(cin: int, ncls: int) -> int:
    """Parameters of ge-xing/SegMamba's ``SegMamba(in_chans=cin, out_chans=ncls)``, counted from its layer list.

    MONAI blocks: convolutions without bias, instance norms without affine; the encoder's norms are instance norms.
    """
    dims, n_state, d_conv = (48, 96, 192, 384), 16, 4

    def conv(a, b, k, bias=True):
        return a * b * k**3 + (b if bias else 0)

    def mamba_v3(d):  # mamba_simple.Mamba(bimamba_type="v3"): shared in/out projections, three directions
        di, r = 2 * d, math.ceil(d / 16)
        direction = (di * d_conv + di) + di * (r + 2 * n_state) + (r * di + di) + di * n_state + di
        return d * 2 * di + 3 * direction + di * d

    def unet_res_block(a, b):
        return conv(a, b, 3, False) + conv(b, b, 3, False) + (conv(a, b, 1, False) if a != b else 0)

    total = conv(cin, 48, 7) + conv(48, 96, 2) + conv(96, 192, 2) + conv(192, 384, 2)  # stem, down-sampling
    for d in dims:
        gsc = 2 * conv(d, d, 3) + 2 * conv(d, d, 1)
        mamba_layer = 2 * d + mamba_v3(d)  # LayerNorm + Mamba
        mlp = conv(d, 2 * d, 1) + conv(2 * d, d, 1)
        total += gsc + 2 * mamba_layer + mlp
    total += unet_res_block(cin, 48) + unet_res_block(48, 96) + unet_res_block(96, 192)  # encoder1..3
    total += unet_res_block(192, 384) + unet_res_block(384, 768)  # encoder4..5
    for a, b in [(768, 384), (384, 192), (192, 96), (96, 48)]:  # decoder5..2: transposed conv + block
        total += conv(a, b, 2, False) + unet_res_block(2 * b, b)
    return total + unet_res_block(48, 48) + conv(48, ncls, 1)  # decoder1, out


def test_full_size_parameter_count_matches_the_released_brats_model():
    released = _released_segmamba_parameters(4, 4)
    assert 67.0e6 < released < 67.5e6
    with torch.device("meta"):
        model = create_model("segmamba", in_channels=4, num_classes=4)
    ours = sum(p.numel() for p in model.parameters())
    # The only difference: the LayerNorm before the MLP (the released code uses an instance norm, no parameters).
    assert ours == released + 2 * sum(model.config.dims)
    assert abs(ours - released) / released < 0.05


def test_volume_no_larger_than_the_divisor_still_segments():
    model = create_model("test_segmamba", in_channels=3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 9, 16, 5))  # padded to 16³: the deepest scale would be one voxel
    assert out.shape == (1, 2, 9, 16, 5)
    assert torch.isfinite(out).all()
