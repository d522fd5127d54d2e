"""SegMamba (Xing et al., MICCAI 2024): a 3D U-shaped network whose encoder models whole-volume context with Mamba.

Encoder (one TSMamba block per scale, ``len(dims)`` scales):

* down-sampling: a 7×7×7 stride-2 convolution stem at the first scale, then instance norm + 2×2×2 stride-2
  convolution;
* gated spatial convolution (GSC): ``z1 = C3(C3(z))``, ``z2 = C1(z)``, ``GSC(z) = C1(z1 · z2) + z``, where ``Ck`` is a
  k×k×k convolution → instance norm → ReLU and ``z2`` gates ``z1`` voxel- and channel-wise;
* ``depths[i]`` tri-orientated Mamba layers on the flattened tokens, ``z = z + ToM(LN(z))``, ToM scanning forward,
  reverse and inter-slice (:mod:`napari_mamba_seg.models.layers.tri_mamba`);
* an MLP, ``z = z + MLP(LN(z))`` (two linear layers with ratio ``mlp_ratio`` and GELU; 1×1×1 convolutions).

Feature-level uncertainty estimation (FUE, optional, no parameters): for each encoder feature z, with
``p = sigmoid(mean over channels of z)`` and the uncertainty ``u = -p log p``, the feature passed on is
``z + z · (1 - u)``: voxels whose features are confident are enhanced.

Decoder (as the released code, MONAI UNETR blocks): a residual conv block (3×3×3 conv → instance norm → LeakyReLU
→ 3×3×3 conv → instance norm, a 1×1×1 conv + norm on the skip when the width changes, sum, LeakyReLU) on the input
and on every encoder feature, widening it to the next scale's width (the deepest to ``hidden_size``); then
up-blocks (2×2×2 transposed convolution, concatenation with the skip, residual block), a last residual block at
full resolution and a 1×1×1 convolution to the logits. The input is padded to a multiple of ``2 ** len(dims)``.

Tokens and scan orders: the volume's axes are ``(D, H, W)``; tokens are flattened row-major (W fastest), and the
inter-slice scan runs along D (the slice axis of the input) at every in-plane position. The released code fixes the
slice count per scale for a 128³ patch; here it is the feature map's actual D, so any volume size works.

Where the paper and the released code (ge-xing/SegMamba) differ, this follows the paper: GSC multiplies its two
branches (the released code adds them); the MLP is residual and its output feeds the next scale (the released code
applies it without residual to the skip feature only); its norm is a LayerNorm (released: instance norm); FUE is
included (released: absent). Parameter counts are unchanged by these except the LayerNorms (``2 * sum(dims)``).

Parameter count: the paper states none that we could verify; the released code's BraTS 2023 configuration (4
input modalities, 4 outputs, the defaults here) has 67.4 M parameters, and ours is within 0.01% of that count
(tests/models/test_segmamba.py recomputes the released count layer by layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import ClassVar

import torch
from torch import nn

from napari_mamba_seg.models._base import ModelConfig, SegmentationModel
from napari_mamba_seg.models._registry import PaperFigures, register_model
from napari_mamba_seg.models.layers.tri_mamba import TriOrientedMamba

__all__ = [
    "GatedSpatialConv",
    "MambaEncoder",
    "SegMamba",
    "SegMambaConfig",
    "TSMambaBlock",
    "UnetResBlock",
    "UnetUpBlock",
    "uncertainty_enhance",
]


@dataclass
class SegMambaConfig(ModelConfig):
    """Configuration of :class:`SegMamba`.

    Attributes:
        dims: Channels of the encoder scales (1/2, 1/4, ... of the input size), shallowest first.
        depths: Tri-orientated Mamba layers per scale.
        hidden_size: Channels of the deepest decoder feature (1/``2**len(dims)`` of the input size).
        d_state: Mamba state size N.
        d_conv: Mamba causal convolution width.
        expand: Mamba inner width factor.
        mlp_ratio: Hidden width of the TSMamba MLP, in multiples of the scale's channels.
        uncertainty_estimation: Apply feature-level uncertainty estimation (FUE) to the encoder features.
    """

    dims: tuple[int, ...] = (48, 96, 192, 384)
    depths: tuple[int, ...] = (2, 2, 2, 2)
    hidden_size: int = 768
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    mlp_ratio: int = 2
    uncertainty_estimation: bool = True


class ConvNormAct(nn.Sequential):
    """k×k×k convolution → instance norm → ReLU, size-preserving; ``(b, C, *S) -> (b, C, *S)``."""

    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__(nn.Conv3d(dim, dim, kernel, padding=kernel // 2), nn.InstanceNorm3d(dim), nn.ReLU())


class GatedSpatialConv(nn.Module):
    """GSC: ``C1(C3(C3(z)) · C1(z)) + z`` on ``(b, C, D, H, W)`` (see the module docstring)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.spatial = nn.Sequential(ConvNormAct(dim, 3), ConvNormAct(dim, 3))
        self.gate = ConvNormAct(dim, 1)
        self.proj = ConvNormAct(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.spatial(x) * self.gate(x)) + x


class TSMambaBlock(nn.Module):
    """Tri-orientated spatial Mamba block: GSC, ``depth`` × ``z + ToM(LN(z))``, ``z + MLP(LN(z))``.

    Args:
        dim: Channels C.
        depth: Number of ToM layers.
        config: Mamba sizes and MLP ratio.
    """

    def __init__(self, dim: int, depth: int, config: SegMambaConfig) -> None:
        super().__init__()
        self.gsc = GatedSpatialConv(dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.mixers = nn.ModuleList(
            TriOrientedMamba(dim, d_state=config.d_state, d_conv=config.d_conv, expand=config.expand)
            for _ in range(depth)
        )
        self.mlp_norm = nn.LayerNorm(dim)
        hidden = config.mlp_ratio * dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, C, D, H, W) -> (b, C, D, H, W)``."""
        x = self.gsc(x)
        tokens = x.flatten(2).transpose(1, 2)  # (b, D*H*W, C), slice-major
        for norm, mixer in zip(self.norms, self.mixers, strict=True):
            tokens = tokens + mixer(norm(tokens), slices=x.shape[2])
        tokens = tokens + self.mlp(self.mlp_norm(tokens))
        return tokens.transpose(1, 2).reshape(x.shape)


class MambaEncoder(nn.Module):
    """The TSMamba encoder: ``(b, in_channels, *S) -> [(b, dims[i], *S / 2**(i+1))]`` for every scale i."""

    def __init__(self, config: SegMambaConfig) -> None:
        super().__init__()
        dims = config.dims
        stem = nn.Conv3d(config.in_channels, dims[0], kernel_size=7, stride=2, padding=3)
        downs = [nn.Sequential(nn.InstanceNorm3d(a), nn.Conv3d(a, b, 2, stride=2)) for a, b in pairwise(dims)]
        self.downsamples = nn.ModuleList([stem, *downs])
        self.blocks = nn.ModuleList(TSMambaBlock(d, n, config) for d, n in zip(dims, config.depths, strict=True))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for down, block in zip(self.downsamples, self.blocks, strict=True):
            x = block(down(x))
            features.append(x)
        return features


def feature_uncertainty(z: torch.Tensor) -> torch.Tensor:
    """FUE's uncertainty ``u = -p log p`` with ``p = sigmoid(mean_c z)``: ``(b, C, *S) -> (b, 1, *S)``, in [0, 1/e]."""
    p = torch.sigmoid(z.mean(dim=1, keepdim=True))
    return -torch.special.xlogy(p, p)


def uncertainty_enhance(z: torch.Tensor) -> torch.Tensor:
    """FUE: ``z + z · (1 - u)`` with ``u`` from :func:`feature_uncertainty`; ``(b, C, *S) -> (b, C, *S)``."""
    return z + z * (1 - feature_uncertainty(z))


class UnetResBlock(nn.Module):
    """MONAI's residual block (3×3×3 convs without bias, instance norm, LeakyReLU 0.01).

    ``(b, c_in, *S) -> (b, c_out, *S)``; the skip gets a 1×1×1 convolution + norm when the width changes.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, c_out, 3, padding=1, bias=False)
        self.norm1 = nn.InstanceNorm3d(c_out)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.InstanceNorm3d(c_out)
        self.skip = (
            nn.Sequential(nn.Conv3d(c_in, c_out, 1, bias=False), nn.InstanceNorm3d(c_out))
            if c_in != c_out
            else nn.Identity()
        )
        self.act = nn.LeakyReLU(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(y)) + self.skip(x))


class UnetUpBlock(nn.Module):
    """2×2×2 transposed conv ``c_in -> c_out``, concatenation with the skip, residual block ``2 c_out -> c_out``.

    ``(b, c_in, *S), (b, c_out, *2S) -> (b, c_out, *2S)``.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(c_in, c_out, 2, stride=2, bias=False)
        self.block = UnetResBlock(2 * c_out, c_out)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))


class SegMamba(SegmentationModel):
    """SegMamba on volumes ``(b, in_channels, D, H, W) -> (b, num_classes, D, H, W)`` (see the module docstring).

    Args:
        config: The architecture.
    """

    spatial_dims: ClassVar[int] = 3
    encoder_module_names = ("encoder",)  # the Mamba encoder; the UNETR-style skip blocks belong to the decoder

    def __init__(self, config: SegMambaConfig) -> None:
        dims = config.dims
        if not dims or min(dims) < 1 or len(config.depths) != len(dims) or min(config.depths) < 1:
            raise ValueError(f"need positive dims and one positive depth per scale, got {dims} and {config.depths}")
        super().__init__(config, 2 ** len(dims))
        self.encoder = MambaEncoder(config)
        widths = (*dims, config.hidden_size)  # skip widths, full resolution first
        sources = (config.in_channels, *dims)  # the input, then the encoder features
        self.skip_blocks = nn.ModuleList(UnetResBlock(a, b) for a, b in zip(sources, widths, strict=True))
        self.up_blocks = nn.ModuleList(UnetUpBlock(a, b) for a, b in zip(widths[:0:-1], widths[-2::-1], strict=True))
        self.final_block = UnetResBlock(dims[0], dims[0])
        self.head = nn.Conv3d(dims[0], config.num_classes, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(b, num_classes, *S)`` for ``x`` ``(b, in_channels, *S)``, S a multiple of ``2 ** len(dims)``."""
        features = self.encoder(x)
        if self.config.uncertainty_estimation:
            features = [uncertainty_enhance(f) for f in features]
        skips = [block(f) for block, f in zip(self.skip_blocks, [x, *features], strict=True)]
        y = skips[-1]
        for up, skip in zip(self.up_blocks, reversed(skips[:-1]), strict=True):
            y = up(y, skip)
        return self.head(self.final_block(y))


_PAPER = PaperFigures(source="Xing et al. 2024 (SegMamba); no parameter count stated, released code: 67.4 M")


@register_model(SegMamba, spatial_dims=3, paper=_PAPER)
def segmamba(**overrides) -> SegMambaConfig:
    """SegMamba (3D): GSC + tri-orientated Mamba encoder, residual conv decoder; the BraTS 2023 widths."""
    return SegMambaConfig(**overrides)


@register_model(SegMamba, spatial_dims=3)
def test_segmamba(**overrides) -> SegMambaConfig:
    """Tiny SegMamba for fast tests."""
    return SegMambaConfig(
        **{"dims": (12, 8, 8, 8), "depths": (1, 1, 1, 1), "hidden_size": 8, "d_state": 4, **overrides}
    )
