"""SA-UMamba specifics: the RFAC module, the RSSS block's residual formula, its place in the VM-UNet skeleton."""

from __future__ import annotations

import pytest
import torch

from napari_mamba_seg.models import create_model
from napari_mamba_seg.models.sa_umamba import RFAC, RSSSBlock, SAUMambaConfig


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_rfac_keeps_the_shape_and_its_attention_is_a_softmax_over_the_k2_positions(kernel_size):
    torch.manual_seed(0)
    rfac = RFAC(5, kernel_size).eval()
    x = torch.randn(2, 5, 7, 9)
    with torch.no_grad():
        attention = rfac.attention(x)
        out = rfac(x)
    assert out.shape == x.shape
    assert attention.shape == (2, 5, kernel_size**2, 7, 9)
    assert (attention >= 0).all()
    torch.testing.assert_close(attention.sum(dim=2), torch.ones(2, 5, 7, 9))
    assert attention.std(dim=2).mean() > 0  # not uniform: it depends on the input


def test_rfac_spreads_the_weighted_features_over_k_by_k_cells():
    # With a stride-k convolution that picks cell (i, j) of each k x k cell, the output is the weighted
    # receptive-field feature number i*k + j: the layout is 'b c (k1 k2) h w -> b c (h k1) (w k2)'.
    torch.manual_seed(0)
    k, channels = 3, 4
    rfac = RFAC(channels, k).eval()
    x = torch.randn(1, channels, 6, 5)
    with torch.no_grad():
        weighted = rfac.receptive_field_features(x) * rfac.attention(x)
        for i in range(k):
            for j in range(k):
                rfac.conv.weight.zero_()
                rfac.conv.bias.zero_()
                rfac.conv.weight[range(channels), range(channels), i, j] = 1.0
                torch.testing.assert_close(rfac(x), weighted[:, :, i * k + j], rtol=1e-6, atol=1e-6)


def test_rfac_receptive_field_features_are_batchnormed_and_rectified():
    rfac = RFAC(3, 3).train()
    features = rfac.receptive_field_features(torch.randn(4, 3, 8, 8))
    assert (features >= 0).all()
    assert (features == 0).any()
    assert isinstance(rfac.generate_feature[1], torch.nn.BatchNorm2d)


def test_rsss_block_follows_the_residual_adjust_formula():
    torch.manual_seed(0)
    block = RSSSBlock(8, d_state=4).eval()
    assert block.skip_scale.shape == block.skip_scale2.shape == (8,)
    assert block.skip_scale.requires_grad and block.skip_scale2.requires_grad
    with torch.no_grad():
        block.skip_scale.copy_(torch.linspace(0.5, 1.5, 8))
        block.skip_scale2.copy_(torch.linspace(2.0, -1.0, 8))
        x = torch.randn(2, 6, 10, 8)  # channels-last
        x1 = block.skip_scale * x + block.self_attention(block.ln_1(x))
        local = block.rfac(block.ln_2(x1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        expected = block.skip_scale2 * x1 + local
        torch.testing.assert_close(block(x), expected)
        block.skip_scale2.zero_()  # s2 scales x', not the RFAC branch
        torch.testing.assert_close(block(x), local)


def test_full_size_is_vm_unet_with_a_local_branch_in_every_block():
    # The paper states no parameter count; check the structure instead: all 15 blocks of the VM-UNet skeleton
    # (encoder and decoder) are RSSS blocks, each adding exactly LN + s1 + s2 + RFAC to a VSS block.
    sa = create_model("sa_umamba", in_channels=3, num_classes=1)
    blocks = [b for layer in [*sa.layers, *sa.layers_up] for b in layer.blocks]
    assert len(blocks) == sum(sa.config.depths) + sum(sa.config.depths_decoder) == 15
    assert all(isinstance(b, RSSSBlock) for b in blocks)
    k2 = sa.config.rfac_kernel_size**2

    def expected_extra(c: int) -> int:  # ln_2 + s1 + s2, get_weight 1x1, generate_feature kxk + BN, final kxk conv
        return 2 * c + 2 * c + c * k2 + c * k2 * k2 + 2 * c * k2 + (c * c * k2 + c)

    extra = 0
    for block in blocks:
        local = [block.ln_2, block.rfac]
        counted = sum(p.numel() for m in local for p in m.parameters()) + 2 * block.skip_scale.numel()
        assert counted == expected_extra(block.skip_scale.numel())
        extra += counted
    count = sum(p.numel() for p in sa.parameters())
    assert abs(count - extra - 27.43e6) < 0.01e6  # what is left is VM-UNet (27.43 M)
    assert 50e6 < count < 60e6  # 56.19 M


def test_vm_unet_weights_initialise_the_global_branches():
    torch.manual_seed(0)
    vm = create_model("test_vm_unet")
    sa = create_model("test_sa_umamba")
    missing, unexpected = sa.load_state_dict(vm.state_dict(), strict=False)
    assert not unexpected
    local_parts = ("ln_2.", "rfac.", "skip_scale")
    assert missing and all(any(part in name for part in local_parts) for name in missing)
    torch.testing.assert_close(
        sa.layers[0].blocks[0].self_attention.in_proj.weight, vm.layers[0].blocks[0].self_attention.in_proj.weight
    )


def test_even_rfac_kernel_is_refused():
    with pytest.raises(ValueError, match="odd"):
        SAUMambaConfig(rfac_kernel_size=4)
