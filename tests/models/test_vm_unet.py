"""VM-UNet specifics: paper size, the public code's layout and names, checkpoint key mapping."""

from __future__ import annotations

import math

import pytest
import torch

from napari_mamba_seg.models import create_model, get_model_entry
from napari_mamba_seg.models.vm_unet import VMUNetConfig, map_public_checkpoint_keys, patch_merge, patch_unshuffle

SMALL = {"dims": (8, 16, 32, 64), "depths": (2, 1, 1, 1), "depths_decoder": (1, 1, 1, 2), "d_state": 4}


def _public_ss2d_shapes(prefix: str, c: int, n: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the public code's SS2D(d_model=c, d_state=n, expand=2, d_conv=3)."""
    d, r = 2 * c, math.ceil(c / 16)
    shapes = {
        "in_proj.weight": (2 * d, c),
        "conv2d.weight": (d, 1, 3, 3),
        "conv2d.bias": (d,),
        "x_proj_weight": (4, r + 2 * n, d),
        "dt_projs_weight": (4, d, r),
        "dt_projs_bias": (4, d),
        "A_logs": (4 * d, n),
        "Ds": (4 * d,),
        "out_norm.weight": (d,),
        "out_norm.bias": (d,),
        "out_proj.weight": (c, d),
    }
    return {prefix + k: v for k, v in shapes.items()}


def _public_stage_shapes(prefix: str, c: int, depth: int, n: int) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for j in range(depth):
        block = f"{prefix}blocks.{j}."
        shapes |= {block + "ln_1.weight": (c,), block + "ln_1.bias": (c,)}
        shapes |= _public_ss2d_shapes(block + "self_attention.", c, n)
    return shapes


def _public_vssm_shapes(in_chans, num_classes, dims, depths, depths_decoder, n) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the public ``VSSM`` state dict (models/vmunet/vmamba.py), transcribed independently."""
    d0 = dims[0]
    shapes = {
        "patch_embed.proj.weight": (d0, in_chans, 4, 4),
        "patch_embed.proj.bias": (d0,),
        "patch_embed.norm.weight": (d0,),
        "patch_embed.norm.bias": (d0,),
    }
    for i, (c, depth) in enumerate(zip(dims, depths, strict=True)):
        shapes |= _public_stage_shapes(f"layers.{i}.", c, depth, n)
        if i < len(dims) - 1:  # PatchMerging2D(dim=c)
            down = f"layers.{i}.downsample."
            shapes |= {down + "reduction.weight": (2 * c, 4 * c), down + "norm.weight": (4 * c,)}
            shapes[down + "norm.bias"] = (4 * c,)
    for i, (c, depth) in enumerate(zip(dims[::-1], depths_decoder, strict=True)):
        shapes |= _public_stage_shapes(f"layers_up.{i}.", c, depth, n)
        if i > 0:  # PatchExpand2D(dim=c): expand Linear(2c, 4c), norm LayerNorm(c)
            up = f"layers_up.{i}.upsample."
            shapes |= {up + "expand.weight": (4 * c, 2 * c), up + "norm.weight": (c,), up + "norm.bias": (c,)}
    shapes |= {
        "final_up.expand.weight": (4 * d0, d0),
        "final_up.norm.weight": (d0 // 4,),
        "final_up.norm.bias": (d0 // 4,),
        "final_conv.weight": (num_classes, d0 // 4, 1, 1),
        "final_conv.bias": (num_classes,),
    }
    return shapes


def _as_public_checkpoint(model: torch.nn.Module) -> dict:
    """What the public train.py writes to latest.pth for a model trained with DataParallel."""
    weights = {f"module.vmunet.{k}": v.clone() for k, v in model.state_dict().items()}
    return {"epoch": 3, "model_state_dict": weights, "optimizer_state_dict": {}}


def test_full_size_parameter_count_is_the_papers():
    # The paper's 27.43 M is the public VMUNet(input_channels=3, num_classes=1) with depths [2,2,2,2] / [2,2,2,1],
    # every parameter counted (the SS2D's x_proj/dt_proj/A/D tensors included).
    model = create_model("vm_unet", in_channels=3, num_classes=1)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    paper = get_model_entry("vm_unet").paper.params_m
    assert paper == 27.43
    assert abs(count - paper) / paper < 0.05, f"{count:.3f} M vs the paper's {paper} M"
    assert abs(count - paper) < 0.01  # the same model, not just a similar size
    assert model.size_divisor == (32, 32)


def test_synthetic_public_checkpoint_loads_strictly():
    shapes = _public_vssm_shapes(3, 1, SMALL["dims"], SMALL["depths"], SMALL["depths_decoder"], SMALL["d_state"])
    generator = torch.Generator().manual_seed(0)
    public = {f"vmunet.{k}": torch.randn(shape, generator=generator) for k, shape in shapes.items()}
    model = create_model("test_vm_unet", in_channels=3, num_classes=1, **SMALL)
    model.load_state_dict(map_public_checkpoint_keys(public), strict=True)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, public[f"vmunet.{name}"], rtol=0, atol=0)


def test_mapped_checkpoint_reproduces_the_outputs():
    torch.manual_seed(0)
    source = create_model("test_vm_unet", in_channels=3, num_classes=2, **SMALL).eval()
    target = create_model("test_vm_unet", in_channels=3, num_classes=2, **SMALL).eval()
    target.load_state_dict(map_public_checkpoint_keys(_as_public_checkpoint(source)), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_grey_input_conversion_equals_repeating_the_image():
    torch.manual_seed(0)
    rgb = create_model("test_vm_unet", in_channels=3, num_classes=2, **SMALL).eval()
    grey = create_model("test_vm_unet", in_channels=1, num_classes=2, **SMALL).eval()
    grey.load_state_dict(map_public_checkpoint_keys(_as_public_checkpoint(rgb), in_channels=1), strict=True)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="cannot adapt"):
        map_public_checkpoint_keys(_as_public_checkpoint(rgb), in_channels=2)


def test_sigmoid_head_becomes_an_equivalent_softmax_head():
    torch.manual_seed(0)
    binary = create_model("test_vm_unet", in_channels=3, num_classes=1, **SMALL).eval()
    two_class = create_model("test_vm_unet", in_channels=3, num_classes=2, **SMALL).eval()
    state = map_public_checkpoint_keys(_as_public_checkpoint(binary), sigmoid_to_softmax=True)
    two_class.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = torch.sigmoid(binary(x))[:, 0]
        torch.testing.assert_close(two_class(x).softmax(dim=1)[:, 1], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="1-class head"):
        map_public_checkpoint_keys(two_class.state_dict(), sigmoid_to_softmax=True)


def test_patch_merge_uses_the_public_channel_order():
    x = torch.arange(2 * 4 * 6 * 3, dtype=torch.float32).reshape(2, 4, 6, 3)
    merged = patch_merge(x)
    assert merged.shape == (2, 2, 3, 12)
    for h in range(2):
        for w in range(3):
            # public order: (0,0), (1,0), (0,1), (1,1) offsets of (row, column), channels within each
            expected = torch.cat(
                [x[:, 2 * h, 2 * w], x[:, 2 * h + 1, 2 * w], x[:, 2 * h, 2 * w + 1], x[:, 2 * h + 1, 2 * w + 1]], -1
            )
            torch.testing.assert_close(merged[:, h, w], expected, rtol=0, atol=0)


@pytest.mark.parametrize("scale", [2, 4])
def test_patch_unshuffle_is_the_public_rearrange(scale):
    # einops: 'b h w (p1 p2 c) -> b (h p1) (w p2) c'
    c = 3
    x = torch.randn(2, 3, 5, scale * scale * c)
    out = patch_unshuffle(x, scale)
    assert out.shape == (2, 3 * scale, 5 * scale, c)
    for p1 in range(scale):
        for p2 in range(scale):
            group = x[..., (p1 * scale + p2) * c : (p1 * scale + p2 + 1) * c]
            torch.testing.assert_close(out[:, p1::scale, p2::scale], group, rtol=0, atol=0)


def test_encoder_stages_and_skips():
    model = create_model("test_vm_unet", in_channels=1, num_classes=2, **SMALL).eval()
    with torch.no_grad():
        deepest, skips = model.encode(torch.randn(1, 1, 64, 96))
    assert deepest.shape == (1, 2, 3, 64)
    assert [tuple(s.shape) for s in skips] == [(1, 16, 24, 8), (1, 8, 12, 16), (1, 4, 6, 32), (1, 2, 3, 64)]
    with torch.no_grad():
        decoded = model.decode(deepest, skips)
        zero_skips = model.decode(deepest, [torch.zeros_like(s) for s in skips])
    assert decoded.shape == (1, 16, 24, 8)
    assert not torch.allclose(decoded, zero_skips)  # the skips are used


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="double"):
        VMUNetConfig(dims=(96, 160, 384, 768))
    with pytest.raises(ValueError, match="one entry per stage"):
        VMUNetConfig(depths=(2, 2, 2))
