"""Mamba-like linear attention (MLLA; Han et al. 2024, "Demystify Mamba in Vision: A Linear Attention Perspective").

The MLLA block keeps Mamba's macro design (input projection, depthwise conv + SiLU, a SiLU gate branch, output
projection) and its "forget gate" role is taken by positional encodings, but the selective scan is replaced by
non-causal linear attention, so a block costs O(tokens · channels²) and needs no scan:

    x = x + CPE(x)                                       CPE: depthwise 3×3 conv
    gate = SiLU(act_proj(LN(x)))
    y = SiLU(DWConv(in_proj(LN(x))))
    y = LinearAttention(y)                               ELU+1 features, RoPE, LePE
    x = x + out_proj(y * gate)
    x = x + CPE(x)
    x = x + MLP(LN(x))

Blocks work on channels-last maps ``(b, H, W, C)``. The down- and up-sampling modules of MLLA-UNet (Jiang et al.
2024) are here too: :class:`PatchMerging` is MLLA's inverted-bottleneck down-sampler and :class:`PatchExpanding` its
mirror image (transposed depthwise conv).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from napari_mamba_seg.models.layers.ss2d import DropPath

__all__ = [
    "ConvLayer",
    "MLLABlock",
    "MLLALinearAttention",
    "PatchExpanding",
    "PatchMerging",
    "apply_rope_2d",
    "linear_attention",
    "rope_2d_angles",
]


def rope_2d_angles(height: int, width: int, channels: int, base: float = 10000.0, device=None) -> torch.Tensor:
    """Rotation angles of 2D rotary position embedding on a ``height × width`` token grid.

    The ``channels / 2`` channel pairs are split in two halves: the first ``channels / 4`` pairs rotate with the row
    index, the others with the column index, each half with frequencies ``base ** (-k / (channels / 4))``
    (the layout of MLLA's RoPE).

    Args:
        height: Rows H of the grid.
        width: Columns W of the grid.
        channels: Feature channels C, a multiple of 4.
        base: Frequency base.
        device: Device of the result.

    Returns:
        ``(H, W, C / 2)`` float32 angles; pair ``i`` (channels ``2i, 2i+1``) rotates by ``angles[..., i]``.
    """
    if channels % 4:
        raise ValueError(f"2D RoPE needs channels divisible by 4, got {channels}")
    k_max = channels // 4
    freqs = base ** (-torch.arange(k_max, device=device, dtype=torch.float32) / k_max)
    rows = torch.arange(height, device=device, dtype=torch.float32)[:, None, None] * freqs
    cols = torch.arange(width, device=device, dtype=torch.float32)[None, :, None] * freqs
    return torch.cat([rows.expand(height, width, k_max), cols.expand(height, width, k_max)], dim=-1)


def apply_rope_2d(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs ``(2i, 2i+1)`` of ``x`` by ``angles[..., i]``.

    Args:
        x: ``(..., H, W, C)`` features.
        angles: ``(H, W, C / 2)`` from :func:`rope_2d_angles`.

    Returns:
        ``(..., H, W, C)`` rotated features (same dtype as ``x``); norms of every pair are preserved.
    """
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    pairs = x.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_rot: torch.Tensor, k_rot: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Non-causal linear attention with RoPE in the numerator only (MLLA's formula), linear in the tokens n.

    ``out_i = (q_rot_i · Σ_j k_rot_j v_jᵀ / n) / (q_i · Σ_j k_j / n + eps)``: the similarity in the numerator sees
    the rotated (position-aware) features, the normaliser the plain non-negative ones.

    Args:
        q: ``(b, heads, n, d)`` non-negative queries (after the ELU+1 feature map).
        k: ``(b, heads, n, d)`` non-negative keys.
        v: ``(b, heads, n, d_v)`` values.
        q_rot: ``(b, heads, n, d)`` RoPE-rotated queries.
        k_rot: ``(b, heads, n, d)`` RoPE-rotated keys.
        eps: Added to the normaliser.

    Returns:
        ``(b, heads, n, d_v)``.
    """
    n = q.shape[-2]
    z = 1.0 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + eps)
    kv = (k_rot.transpose(-2, -1) * n**-0.5) @ (v * n**-0.5)
    return (q_rot @ kv) * z


class MLLALinearAttention(nn.Module):
    """Multi-head linear attention with RoPE and locally enhanced positional encoding (LePE).

    q, k = ELU(Linear(x)) + 1; v = x; output = linear_attention(...) + LePE(v), LePE a depthwise 3×3 conv.

    Args:
        dim: Channels C, a multiple of 4 and of ``num_heads``.
        num_heads: Attention heads.
        qkv_bias: Bias of the q/k projection.
        rope_base: Frequency base of the RoPE.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, rope_base: float = 10000.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if dim % 4:
            raise ValueError(f"MLLA attention needs dim divisible by 4 (2D RoPE), got {dim}")
        self.dim = dim
        self.num_heads = num_heads
        self.rope_base = rope_base
        self.qk = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.lepe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, H, W, C) -> (b, H, W, C)``."""
        b, h, w, c = x.shape
        q, k = (F.elu(t) + 1.0 for t in self.qk(x).chunk(2, dim=-1))
        angles = rope_2d_angles(h, w, c, self.rope_base, device=x.device)
        q_rot, k_rot = apply_rope_2d(q, angles), apply_rope_2d(k, angles)
        heads = [self._split_heads(t) for t in (q, k, x, q_rot, k_rot)]
        out = linear_attention(*heads).transpose(1, 2).reshape(b, h, w, c)
        return out + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """``(b, H, W, C) -> (b, heads, H*W, C / heads)``."""
        b, h, w, c = t.shape
        return t.reshape(b, h * w, self.num_heads, c // self.num_heads).transpose(1, 2)


class Mlp(nn.Module):
    """fc1 → GELU → fc2 on the last axis: ``(..., C) -> (..., C)``, hidden ``ratio * C``."""

    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvLayer(nn.Module):
    """Conv (or transposed conv) → optional BatchNorm → optional ReLU, channels-first ``(b, c_in, H, W)``.

    Submodule names (``conv``, ``norm``) are MLLA's, so its checkpoints map one-to-one.

    Args:
        c_in: Input channels.
        c_out: Output channels.
        kernel: Kernel size (odd; padding keeps ``H / stride``, or ``H * stride`` when transposed).
        stride: Stride.
        groups: Convolution groups.
        norm: Add BatchNorm.
        act: Add ReLU.
        transposed: Transposed convolution (up-sampling by ``stride``).
        bias: Convolution bias.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        norm: bool = True,
        act: bool = True,
        transposed: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        pad = kernel // 2
        if transposed:
            self.conv = nn.ConvTranspose2d(c_in, c_out, kernel, stride, pad, stride - 1, groups=groups, bias=bias)
        else:
            self.conv = nn.Conv2d(c_in, c_out, kernel, stride, pad, groups=groups, bias=bias)
        self.norm = nn.BatchNorm2d(c_out) if norm else nn.Identity()
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, c_in, H, W) -> (b, c_out, H', W')``."""
        return self.act(self.norm(self.conv(x)))


class DepthwiseConvChannelsLast(nn.Conv2d):
    """Depthwise 3×3 conv on channels-last maps: ``(b, H, W, C) -> (b, H, W, C)``."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class MLLABlock(nn.Module):
    """The MLLA block (see the module docstring) on channels-last maps ``(b, H, W, C) -> (b, H, W, C)``.

    Args:
        dim: Channels C (multiple of 4 and of ``num_heads``).
        num_heads: Attention heads.
        mlp_ratio: Hidden width of the MLP relative to C.
        qkv_bias: Bias of the q/k projection.
        drop_path: Stochastic-depth rate of the two residual branches.
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.cpe1 = DepthwiseConvChannelsLast(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, dim)
        self.act_proj = nn.Linear(dim, dim)
        self.dwc = DepthwiseConvChannelsLast(dim)
        self.attn = MLLALinearAttention(dim, num_heads, qkv_bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)
        self.drop_path = DropPath(drop_path)
        self.cpe2 = DepthwiseConvChannelsLast(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, H, W, C) -> (b, H, W, C)``."""
        x = x + self.cpe1(x)
        x = x + self.drop_path(self._mixer(self.norm1(x)))
        x = x + self.cpe2(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _mixer(self, x: torch.Tensor) -> torch.Tensor:
        """Mamba-style token mixer with linear attention in place of the scan: ``(b, H, W, C) -> (b, H, W, C)``."""
        gate = F.silu(self.act_proj(x))
        y = F.silu(self.dwc(self.in_proj(x)))
        return self.out_proj(self.attn(y) * gate)


class PatchMerging(nn.Module):
    """MLLA's down-sampler: 1×1 conv to ``ratio·2C`` + ReLU, depthwise 3×3 stride-2 conv + ReLU, 1×1 conv to 2C + BN.

    ``(b, H, W, C) -> (b, H/2, W/2, 2C)`` (channels-last; H and W even).

    Args:
        dim: Input channels C.
        ratio: Expansion of the hidden width relative to the output width 2C.
    """

    def __init__(self, dim: int, ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(2 * dim * ratio)
        self.conv = nn.Sequential(
            ConvLayer(dim, hidden, 1, norm=False),
            ConvLayer(hidden, hidden, 3, stride=2, groups=hidden, norm=False),
            ConvLayer(hidden, 2 * dim, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, H, W, C) -> (b, H/2, W/2, 2C)``."""
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class PatchExpanding(nn.Module):
    """Mirror of :class:`PatchMerging`: 1×1 conv to ``ratio·C/2`` + ReLU, depthwise transposed 3×3 stride-2 conv +
    ReLU, 1×1 conv to C/2 + BN.

    ``(b, H, W, C) -> (b, 2H, 2W, C/2)`` (channels-last).

    Args:
        dim: Input channels C (even).
        ratio: Expansion of the hidden width relative to the output width C/2.
    """

    def __init__(self, dim: int, ratio: float = 4.0) -> None:
        super().__init__()
        out = dim // 2
        hidden = int(out * ratio)
        self.conv = nn.Sequential(
            ConvLayer(dim, hidden, 1, norm=False),
            ConvLayer(hidden, hidden, 3, stride=2, groups=hidden, norm=False, transposed=True),
            ConvLayer(hidden, out, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, H, W, C) -> (b, 2H, 2W, C/2)``."""
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
