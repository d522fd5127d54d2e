"""U-Mamba (Ma, Li & Wang 2024): a residual convolutional U-Net (nnU-Net style) with Mamba layers on flattened tokens.

The CNN–Mamba hybrid of the survey's U-Mamba / LightM-UNet family. Each resolution stage is a stack of residual
blocks (3×3 conv → instance norm → LeakyReLU → 3×3 conv → instance norm, plus the skip, → LeakyReLU); the first
block of a stage changes width and stride and has a 1×1 projection on its skip. A *U-Mamba layer* flattens the
feature map to tokens ``(b, L, C)``, applies LayerNorm and the Mamba mixer (no residual, as in the paper's Fig. 2:
the block's output is the mixer's output) and folds the tokens back. Two placements, as in the paper:

* ``umamba_bot``: one Mamba layer on the bottleneck (the deepest stage's output);
* ``umamba_enc``: a Mamba layer after the residual blocks of every encoder stage (full resolution included).

The decoder up-samples by nearest interpolation followed by a 1×1 convolution, concatenates the encoder skip of the
same scale, and applies residual blocks; a 1×1 convolution gives the logits. Block counts follow the released code:
2 residual blocks per encoder stage in the first half of the stages and 1 in the second half, and 2 per decoder
stage except 1 in the shallow half. Deep supervision (nnU-Net training) is left to the training loop; only the
full-resolution head exists, so every parameter is used.

Departures from the released code (bowang-lab/U-Mamba): the released ``UMambaEnc`` switches a stage to channel
tokens when its feature map has fewer positions than channels, which ties the weights to one patch size; here
every stage uses spatial tokens, so the model takes any input size.

Parameter counts: the U-Mamba paper states none (the network is built from each dataset's nnU-Net plan), so the
registry carries no paper figure. Our defaults are nnU-Net's standard plans: 2D widths (32, 64, 128, 256, 512, 512,
512), seven stages (input padded to a multiple of 64); 3D widths (32, 64, 128, 256, 320, 320), six stages (a
multiple of 32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from napari_mamba_seg.models._base import ModelConfig, SegmentationModel
from napari_mamba_seg.models._registry import PaperFigures, register_model
from napari_mamba_seg.models.layers.mamba import Mamba

__all__ = ["ResidualBlock", "TokenMambaLayer", "UMamba", "UMamba3D", "UMambaConfig"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_PLACEMENTS = ("bottleneck", "encoder")
_PAPER = PaperFigures(source="Ma, Li & Wang 2024 (U-Mamba); the paper states no parameter count")


@dataclass
class UMambaConfig(ModelConfig):
    """Configuration of :class:`UMamba` (2D) and :class:`UMamba3D` (3D).

    Attributes:
        features: Channels of each resolution stage, shallowest first (nnU-Net's ``features_per_stage``).
        strides: Down-sampling stride of each stage: an int, or one int per spatial axis (e.g. ``(1, 2, 2)`` for
            anisotropic MRI volumes (D, H, W)). The first stage keeps full resolution (stride 1) in nnU-Net plans.
        encoder_blocks: Residual blocks per encoder stage; ``None`` is U-Mamba's rule (2 in the first half of the
            stages, 1 in the rest).
        decoder_blocks: Residual blocks per decoder stage, deepest first (``len(features) - 1`` entries); ``None``
            is U-Mamba's rule (2, except 1 in the shallow half).
        mamba_placement: ``"bottleneck"`` (U-Mamba_Bot) or ``"encoder"`` (U-Mamba_Enc, every encoder stage).
        d_state: Mamba state size N.
        d_conv: Mamba causal convolution width.
        expand: Mamba inner width factor.
        negative_slope: Slope of the LeakyReLU.
    """

    features: tuple[int, ...] = (32, 64, 128, 256, 512, 512, 512)
    strides: tuple[int | tuple[int, ...], ...] = (1, 2, 2, 2, 2, 2, 2)
    encoder_blocks: tuple[int, ...] | None = None
    decoder_blocks: tuple[int, ...] | None = None
    mamba_placement: str = "bottleneck"
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    negative_slope: float = 0.01


class ResidualBlock(nn.Module):
    """Residual block: ``act(norm(conv(act(norm(conv(x))))) + skip(x))``; ``(b, c_in, *S) -> (b, c_out, *S / stride)``.

    Args:
        dims: 2 or 3 spatial dimensions.
        c_in: Input channels.
        c_out: Output channels.
        stride: Stride of the first convolution, per axis.
        project: Give the skip a strided 1×1 convolution (needed when ``c_in != c_out`` or stride > 1; U-Mamba also
            uses it on the first block of every stage).
        negative_slope: Slope of the LeakyReLU.
    """

    def __init__(
        self, dims: int, c_in: int, c_out: int, stride: tuple[int, ...], project: bool, negative_slope: float
    ) -> None:
        super().__init__()
        if not project and (c_in != c_out or max(stride) > 1):
            raise ValueError("a residual block that changes width or resolution needs a projected skip")
        self.conv1 = _CONV[dims](c_in, c_out, 3, stride=stride, padding=1)
        self.norm1 = _NORM[dims](c_out, eps=1e-5, affine=True)
        self.conv2 = _CONV[dims](c_out, c_out, 3, padding=1)
        self.norm2 = _NORM[dims](c_out, eps=1e-5, affine=True)
        self.skip = _CONV[dims](c_in, c_out, 1, stride=stride) if project else nn.Identity()
        self.act = nn.LeakyReLU(negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(y)) + self.skip(x))


def residual_stage(
    dims: int, c_in: int, c_out: int, stride: tuple[int, ...], blocks: int, negative_slope: float
) -> list[nn.Module]:
    """``blocks`` residual blocks: the first projects ``c_in -> c_out`` with ``stride``, the rest keep the shape."""
    ones = (1,) * dims
    first = ResidualBlock(dims, c_in, c_out, stride, project=True, negative_slope=negative_slope)
    rest = [ResidualBlock(dims, c_out, c_out, ones, False, negative_slope) for _ in range(blocks - 1)]
    return [first, *rest]


class TokenMambaLayer(nn.Module):
    """U-Mamba layer: flatten ``(b, C, *S)`` to tokens ``(b, prod(S), C)`` → LayerNorm → Mamba → fold back.

    Tokens run in row-major order of the spatial axes (W fastest). There is no residual: the output is the mixer's.

    Args:
        dim: Channels C.
        d_state: Mamba state size.
        d_conv: Mamba causal convolution width.
        expand: Mamba inner width factor.
    """

    def __init__(self, dim: int, d_state: int, d_conv: int, expand: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mamba = Mamba(dim, d_state=d_state, d_conv=d_conv, expand=expand)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, C, *S) -> (b, C, *S)``."""
        tokens = x.flatten(2).transpose(1, 2)  # (b, L, C)
        out = self.mamba(self.norm(tokens))
        return out.transpose(1, 2).reshape(x.shape)


class UpsampleLayer(nn.Module):
    """Nearest up-sampling by ``scale`` then a 1×1 convolution; ``(b, c_in, *S) -> (b, c_out, *S * scale)``."""

    def __init__(self, dims: int, c_in: int, c_out: int, scale: tuple[int, ...]) -> None:
        super().__init__()
        self.scale = scale
        self.conv = _CONV[dims](c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = [s * f for s, f in zip(x.shape[2:], self.scale, strict=True)]
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


def _per_axis(stride: int | tuple[int, ...], dims: int) -> tuple[int, ...]:
    per_axis = (stride,) * dims if isinstance(stride, int) else tuple(stride)
    if len(per_axis) != dims or min(per_axis) < 1:
        raise ValueError(f"stride {stride!r} must be a positive int or {dims} positive ints")
    return per_axis


def _block_counts(config: UMambaConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Residual blocks per encoder and decoder stage (U-Mamba's rule where the config leaves them ``None``)."""
    n = len(config.features)
    encoder = config.encoder_blocks
    if encoder is None:
        encoder = tuple(2 if s < math.ceil(n / 2) else 1 for s in range(n))
    decoder = config.decoder_blocks
    if decoder is None:
        decoder = tuple(1 if s >= math.ceil((n - 1) / 2 + 0.5) else 2 for s in range(n - 1))
    if len(encoder) != n or len(decoder) != n - 1 or min(encoder + decoder, default=1) < 1:
        raise ValueError(
            f"need {n} positive encoder_blocks and {n - 1} positive decoder_blocks for {n} stages, "
            f"got {encoder} and {decoder}"
        )
    return tuple(encoder), tuple(decoder)


def _validate(config: UMambaConfig, dims: int) -> list[tuple[int, ...]]:
    """Check ``config`` and return the per-axis stride of every stage."""
    if len(config.features) < 2 or min(config.features) < 1:
        raise ValueError(f"features needs at least 2 positive entries, got {config.features}")
    if len(config.strides) != len(config.features):
        raise ValueError(f"strides needs one entry per stage ({len(config.features)}), got {config.strides}")
    if config.mamba_placement not in _PLACEMENTS:
        raise ValueError(f"mamba_placement must be one of {_PLACEMENTS}, got {config.mamba_placement!r}")
    return [_per_axis(s, dims) for s in config.strides]


def _build_encoder(
    config: UMambaConfig, dims: int, strides: list[tuple[int, ...]], blocks: tuple[int, ...]
) -> tuple[nn.Sequential, nn.ModuleList]:
    """The stem (full resolution, ``in_channels -> features[0]``) and the encoder stages, Mamba layers placed."""
    feats, slope, ones = config.features, config.negative_slope, (1,) * dims
    stem = nn.Sequential(*residual_stage(dims, config.in_channels, feats[0], ones, blocks[0], slope))
    stages = nn.ModuleList()
    for s, (c_out, stride) in enumerate(zip(feats, strides, strict=True)):
        layers = residual_stage(dims, feats[max(s - 1, 0)], c_out, stride, blocks[s], slope)
        if config.mamba_placement == "encoder" or s == len(feats) - 1:
            layers.append(TokenMambaLayer(c_out, config.d_state, config.d_conv, config.expand))
        stages.append(nn.Sequential(*layers))
    return stem, stages


def _build_decoder(
    config: UMambaConfig, dims: int, strides: list[tuple[int, ...]], blocks: tuple[int, ...]
) -> tuple[nn.ModuleList, nn.ModuleList]:
    """Up-sampling layers and decoder stages, deepest first."""
    feats, slope, ones = config.features, config.negative_slope, (1,) * dims
    upsamples, stages = nn.ModuleList(), nn.ModuleList()
    for i, s in enumerate(range(len(feats) - 1, 0, -1)):  # stage s's output goes up to stage s - 1's scale
        upsamples.append(UpsampleLayer(dims, feats[s], feats[s - 1], strides[s]))
        stages.append(nn.Sequential(*residual_stage(dims, 2 * feats[s - 1], feats[s - 1], ones, blocks[i], slope)))
    return upsamples, stages


class UMamba(SegmentationModel):
    """U-Mamba on 2D slices ``(b, in_channels, H, W) -> (b, num_classes, H, W)`` (see the module docstring).

    Args:
        config: The architecture; ``config.mamba_placement`` picks U-Mamba_Bot or U-Mamba_Enc.
    """

    spatial_dims: ClassVar[int] = 2
    encoder_module_names = ("stem", "stages")

    def __init__(self, config: UMambaConfig) -> None:
        dims = self.spatial_dims
        strides = _validate(config, dims)
        divisor = tuple(math.prod(s[axis] for s in strides) for axis in range(dims))
        super().__init__(config, divisor)
        enc_blocks, dec_blocks = _block_counts(config)
        self.stem, self.stages = _build_encoder(config, dims, strides, enc_blocks)
        self.upsamples, self.decoder_stages = _build_decoder(config, dims, strides, dec_blocks)
        self.head = _CONV[dims](config.features[0], config.num_classes, 1)
        self.apply(_init_he)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every encoder stage, shallowest first: ``[(b, features[s], *S_s)]``."""
        x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(b, num_classes, *S)`` for ``x`` ``(b, in_channels, *S)`` with S a multiple of the divisor."""
        skips = self.encode(x)
        x = skips[-1]
        for upsample, stage, skip in zip(self.upsamples, self.decoder_stages, reversed(skips[:-1]), strict=True):
            x = stage(torch.cat([upsample(x), skip], dim=1))
        return self.head(x)


class UMamba3D(UMamba):
    """U-Mamba on volumes ``(b, in_channels, D, H, W) -> (b, num_classes, D, H, W)``."""

    spatial_dims: ClassVar[int] = 3


def _init_he(module: nn.Module) -> None:
    """nnU-Net's ``InitWeights_He(1e-2)`` on the convolutions (the Mamba mixers keep their own initialisation)."""
    if isinstance(module, nn.Conv2d | nn.Conv3d):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


_3D = {"features": (32, 64, 128, 256, 320, 320), "strides": (1, 2, 2, 2, 2, 2)}
_TEST = {"features": (4, 8, 16), "strides": (1, 2, 2), "d_state": 4}
# One residual block per stage in 3D: full-resolution 3D convolutions dominate the CPU time of the tests.
_TEST_3D = {**_TEST, "encoder_blocks": (1, 1, 1), "decoder_blocks": (1, 1)}


@register_model(UMamba, spatial_dims=2, paper=_PAPER)
def umamba_bot(**overrides) -> UMambaConfig:
    """U-Mamba_Bot (2D): residual U-Net with one Mamba layer at the bottleneck; nnU-Net 2D widths."""
    return UMambaConfig(**{"mamba_placement": "bottleneck", **overrides})


@register_model(UMamba, spatial_dims=2, paper=_PAPER)
def umamba_enc(**overrides) -> UMambaConfig:
    """U-Mamba_Enc (2D): residual U-Net with a Mamba layer in every encoder stage; nnU-Net 2D widths."""
    return UMambaConfig(**{"mamba_placement": "encoder", **overrides})


@register_model(UMamba3D, spatial_dims=3, paper=_PAPER)
def umamba_bot_3d(**overrides) -> UMambaConfig:
    """U-Mamba_Bot (3D): Mamba at the bottleneck of a residual 3D U-Net; nnU-Net 3d_fullres widths."""
    return UMambaConfig(**{**_3D, "mamba_placement": "bottleneck", **overrides})


@register_model(UMamba3D, spatial_dims=3, paper=_PAPER)
def umamba_enc_3d(**overrides) -> UMambaConfig:
    """U-Mamba_Enc (3D): Mamba in every encoder stage of a residual 3D U-Net; nnU-Net 3d_fullres widths."""
    return UMambaConfig(**{**_3D, "mamba_placement": "encoder", **overrides})


@register_model(UMamba, spatial_dims=2)
def test_umamba_bot(**overrides) -> UMambaConfig:
    """Tiny U-Mamba_Bot (2D) for fast tests."""
    return UMambaConfig(**{**_TEST, "mamba_placement": "bottleneck", **overrides})


@register_model(UMamba, spatial_dims=2)
def test_umamba_enc(**overrides) -> UMambaConfig:
    """Tiny U-Mamba_Enc (2D) for fast tests."""
    return UMambaConfig(**{**_TEST, "mamba_placement": "encoder", **overrides})


@register_model(UMamba3D, spatial_dims=3)
def test_umamba_bot_3d(**overrides) -> UMambaConfig:
    """Tiny U-Mamba_Bot (3D) for fast tests."""
    return UMambaConfig(**{**_TEST_3D, "mamba_placement": "bottleneck", **overrides})


@register_model(UMamba3D, spatial_dims=3)
def test_umamba_enc_3d(**overrides) -> UMambaConfig:
    """Tiny U-Mamba_Enc (3D) for fast tests."""
    return UMambaConfig(**{**_TEST_3D, "mamba_placement": "encoder", **overrides})
