"""MLLA-UNet: the linear attention against a naive O(n²) computation, 2D RoPE, the sampling modules, sizes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from napari_mamba_seg.models import create_model
from napari_mamba_seg.models.layers.mlla import (
    MLLALinearAttention,
    PatchExpanding,
    PatchMerging,
    apply_rope_2d,
    linear_attention,
    rope_2d_angles,
)

MLLA_T_PARAMS = 25e6  # Han et al. 2024, MLLA-T (ImageNet classifier, 3 input channels, 1000-class head)


def _naive_attention(q, k, v, q_rot, k_rot, eps=1e-6):
    """out_i = Σ_j (q_rot_i · k_rot_j) v_j / n  /  (Σ_j q_i · k_j / n + eps), with the n × n matrices."""
    n = q.shape[-2]
    numerator = (q_rot @ k_rot.transpose(-2, -1)) @ v / n
    denominator = (q @ k.transpose(-2, -1)).sum(-1, keepdim=True) / n + eps
    return numerator / denominator


def _rotation(h: int, w: int, channels: int) -> torch.Tensor:
    """Block-diagonal 2D RoPE rotation of one grid position, written out pair by pair: ``(C, C)``."""
    quarter = channels // 4
    rot = torch.zeros(channels, channels, dtype=torch.float64)
    for pair in range(channels // 2):
        position, k = (h, pair) if pair < quarter else (w, pair - quarter)
        angle = position * 10000.0 ** (-k / quarter)
        c, s = math.cos(angle), math.sin(angle)
        rot[2 * pair : 2 * pair + 2, 2 * pair : 2 * pair + 2] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    return rot


def test_linear_attention_equals_the_quadratic_formula():
    torch.manual_seed(0)
    b, heads, n, d = 2, 3, 37, 8
    q, k = F.elu(torch.randn(2, b, heads, n, d, dtype=torch.float64)) + 1
    v, q_rot, k_rot = torch.randn(3, b, heads, n, d, dtype=torch.float64)
    torch.testing.assert_close(linear_attention(q, k, v, q_rot, k_rot), _naive_attention(q, k, v, q_rot, k_rot))


def test_attention_module_matches_a_naive_per_token_computation():
    """The whole module (ELU+1 features, RoPE per grid position, heads, LePE) against explicit loops."""
    torch.manual_seed(0)
    height, width, channels, heads = 3, 4, 8, 2
    module = MLLALinearAttention(channels, heads).double()
    x = torch.randn(1, height, width, channels, dtype=torch.float64)
    q, k = (F.elu(t) + 1 for t in module.qk(x[0]).chunk(2, dim=-1))
    tokens = [(i, j) for i in range(height) for j in range(width)]
    rot = {p: _rotation(*p, channels) for p in tokens}
    d = channels // heads
    expected = torch.zeros(height, width, channels, dtype=torch.float64)
    for i, j in tokens:
        for head in range(heads):
            sl = slice(head * d, (head + 1) * d)
            qr = (rot[(i, j)] @ q[i, j])[sl]
            numerator = sum((qr @ (rot[p] @ k[p])[sl]) * x[0][p][sl] for p in tokens) / len(tokens)
            denominator = sum(q[i, j, sl] @ k[p][sl] for p in tokens) / len(tokens) + 1e-6
            expected[i, j, sl] = numerator / denominator
    expected += module.lepe(x.permute(0, 3, 1, 2))[0].permute(1, 2, 0)
    torch.testing.assert_close(module(x)[0], expected)


def test_attention_is_linear_in_the_tokens():
    """65,536 tokens: an n × n attention matrix would need 17 GB in float32; the linear form needs a d × d one."""
    torch.manual_seed(0)
    module = MLLALinearAttention(8, 2)
    with torch.no_grad():
        out = module(torch.randn(1, 256, 256, 8))
    assert out.shape == (1, 256, 256, 8)
    assert torch.isfinite(out).all()


def test_rope_preserves_norms_and_depends_only_on_relative_position():
    torch.manual_seed(0)
    channels = 16
    angles = rope_2d_angles(12, 10, channels)
    assert angles.shape == (12, 10, channels // 2)
    q, k = torch.randn(2, 12, 10, channels, dtype=torch.float64)
    q_rot, k_rot = apply_rope_2d(q, angles), apply_rope_2d(k, angles)
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(k_rot.unflatten(-1, (-1, 2)).norm(dim=-1), k.unflatten(-1, (-1, 2)).norm(dim=-1))
    # the same two vectors placed at (p, p') and at (p + s, p' + s) have the same rotated dot product
    same_q, same_k = q[0, 0], k[0, 0]
    grid_q, grid_k = same_q.expand(12, 10, channels), same_k.expand(12, 10, channels)
    rq, rk = apply_rope_2d(grid_q, angles), apply_rope_2d(grid_k, angles)
    for (p, p2), shift in [(((1, 2), (4, 7)), (5, 1)), (((0, 0), (3, 3)), (7, 6)), (((6, 9), (2, 1)), (-2, -1))]:
        moved = (p[0] + shift[0], p[1] + shift[1]), (p2[0] + shift[0], p2[1] + shift[1])
        torch.testing.assert_close(rq[p] @ rk[p2], rq[moved[0]] @ rk[moved[1]])
    # ... and a different relative offset gives a different score
    assert not torch.allclose(rq[1, 2] @ rk[4, 7], rq[1, 2] @ rk[4, 8])
    assert torch.equal(apply_rope_2d(q, rope_2d_angles(12, 10, channels))[0, 0], q[0, 0])  # origin: no rotation


def test_rope_needs_channels_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d_angles(4, 4, 6)


def test_sampling_modules_are_symmetric():
    x = torch.randn(2, 8, 6, 16)
    merged = PatchMerging(16)(x)
    assert merged.shape == (2, 4, 3, 32)
    assert PatchExpanding(32)(merged).shape == x.shape


def _far_corner_change(model: nn.Module) -> float:
    """How much the logits in the bottom-right 64² move when the top-left 2² pixels of a 256² image change."""
    torch.manual_seed(1)
    x = torch.randn(1, 1, 256, 256, dtype=torch.float64)
    changed = x.clone()
    changed[..., :2, :2] += 3.0
    with torch.no_grad():
        return (model(changed) - model(x))[..., 192:, 192:].abs().max().item()


def test_one_pixel_reaches_the_whole_image_through_the_attention():
    """Linear attention is global: a corner pixel moves the logits in the opposite corner, far outside the
    receptive field of the network's convolutions (without attention the change there is exactly 0)."""
    torch.manual_seed(0)
    model = create_model("test_mlla_unet").double().eval()
    assert _far_corner_change(model) > 1e-13  # float64 rounding is ~1e-17 here
    for attention in [m for m in model.modules() if isinstance(m, MLLALinearAttention)]:
        attention.forward = lambda x, a=attention: a.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert _far_corner_change(model) == 0.0


def test_full_model_sizes():
    model = create_model("mlla_unet", in_channels=3)
    assert model.size_divisor == (32, 32)
    params = {name: sum(p.numel() for p in part.parameters()) for name, part in model.named_children()}
    encoder = params["stem"] + params["encoder"] + params["merging"] + params["norm"]
    classifier_head = 512 * 1000 + 1000
    assert abs(encoder + classifier_head - MLLA_T_PARAMS) / MLLA_T_PARAMS < 0.05  # the MLLA-T backbone
    assert 32.5e6 < sum(params.values()) < 33.5e6  # 33.14 M measured
    blocks = [m for m in model.modules() if type(m).__name__ == "MLLABlock"]
    assert len(blocks) == sum(model.config.depths) + sum(model.config.decoder_depths) == 32
    assert not any(hasattr(m, "scan_backend") for m in model.modules())  # no selective scan anywhere


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"embed_dim": 10}, "multiple of 4"),
        ({"num_heads": (3, 2, 2)}, "divisible by num_heads"),
        ({"decoder_depths": (1,)}, "decoder_depths"),
        ({"depths": (1,), "num_heads": (1,), "decoder_depths": ()}, "at least 2"),
    ],
)
def test_bad_config_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        create_model("test_mlla_unet", **overrides)


def test_drop_path_is_active_only_in_training():
    torch.manual_seed(0)
    model = create_model("test_mlla_unet", drop_path_rate=0.5)
    rates = [m.drop_path.rate for m in model.modules() if type(m).__name__ == "MLLABlock"]
    assert rates[0] == 0.0 and max(rates) == 0.5
    x = torch.randn(2, 1, 32, 32)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    assert isinstance(model.head, nn.Conv2d)
    deep_decoder = create_model("test_mlla_unet", drop_path_rate=0.5, decoder_depths=(3, 2))
    assert [block.drop_path.rate for block in deep_decoder.decoder[0]] == [0.0, 0.25, 0.5]
