"""A plain convolutional U-Net in the style of nnU-Net (Isensee et al. 2021): the baseline every benchmark compares to.

Each encoder stage is ``convs_per_stage`` × (3×3 conv → instance norm → LeakyReLU(0.01)); every stage after the
first starts with a strided convolution (nnU-Net's down-sampling, no pooling). The decoder up-samples with transposed
convolutions (kernel = stride), concatenates the encoder skip of the same scale, and applies the same conv stack;
a 1×1 convolution gives the logits. 2D (``unet``) and 3D (``unet_3d``) share the code.

Size matching: ``unet`` uses nnU-Net's doubling-and-capped widths with base 40 and cap 576, (40, 80, 160, 320,
576, 576), six stages (input padded to a multiple of 32, as in VM-UNet). That gives 27.42 M parameters, the
published size of VM-UNet (27.43 M), so the comparison with the Mamba networks is at equal parameter count.
``unet_3d`` uses nnU-Net's 3d_fullres widths (32, 64, 128, 256, 320, 320), 31.2 M parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from napari_mamba_seg.models._base import ModelConfig, SegmentationModel
from napari_mamba_seg.models._registry import PaperFigures, register_model

__all__ = ["UNet", "UNet3D", "UNetConfig"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_NORMS = {
    "instance": {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d},
    "batch": {2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
}


@dataclass
class UNetConfig(ModelConfig):
    """Configuration of :class:`UNet` / :class:`UNet3D`.

    Attributes:
        widths: Channels of each resolution stage, shallowest first; ``len(widths) - 1`` down-samplings.
        convs_per_stage: Conv → norm → LeakyReLU units per stage (encoder and decoder).
        strides: Down-sampling stride of each stage after the first, one int per spatial axis, e.g.
            ``((1, 2, 2), (2, 2, 2), ...)`` for anisotropic MRI volumes (D, H, W); ``None`` halves every axis.
        norm: ``"instance"`` (nnU-Net's default, batch-size independent) or ``"batch"``.
        negative_slope: Slope of the LeakyReLU.
    """

    widths: tuple[int, ...] = (40, 80, 160, 320, 576, 576)
    convs_per_stage: int = 2
    strides: tuple[tuple[int, ...], ...] | None = None
    norm: str = "instance"
    negative_slope: float = 0.01


class ConvNormAct(nn.Sequential):
    """3×3 (3D: 3×3×3) convolution → norm → LeakyReLU; ``(b, c_in, *S) -> (b, c_out, *S / stride)``."""

    def __init__(self, dims: int, c_in: int, c_out: int, stride: tuple[int, ...], config: UNetConfig) -> None:
        super().__init__(
            _CONV[dims](c_in, c_out, 3, stride=stride, padding=1, bias=False),
            _NORMS[config.norm][dims](c_out, affine=True),
            nn.LeakyReLU(config.negative_slope, inplace=True),
        )


def _conv_stack(dims: int, c_in: int, c_out: int, stride: tuple[int, ...], config: UNetConfig) -> nn.Sequential:
    """``config.convs_per_stage`` ConvNormAct units, the first with ``stride``."""
    ones = (1,) * dims
    units = [
        ConvNormAct(dims, c_in if i == 0 else c_out, c_out, stride if i == 0 else ones, config)
        for i in range(config.convs_per_stage)
    ]
    return nn.Sequential(*units)


def _validate(config: UNetConfig, dims: int) -> list[tuple[int, ...]]:
    """Check ``config`` and return the per-axis stride of every down-sampling stage."""
    if len(config.widths) < 2 or min(config.widths) < 1:
        raise ValueError(f"widths needs at least 2 positive entries, got {config.widths}")
    if config.convs_per_stage < 1:
        raise ValueError(f"convs_per_stage must be >= 1, got {config.convs_per_stage}")
    if config.norm not in _NORMS:
        raise ValueError(f"norm must be one of {sorted(_NORMS)}, got {config.norm!r}")
    if config.strides is None:
        return [(2,) * dims] * (len(config.widths) - 1)
    strides = [tuple(s) for s in config.strides]
    if len(strides) != len(config.widths) - 1 or any(len(s) != dims or min(s) < 1 for s in strides):
        raise ValueError(
            f"strides needs {len(config.widths) - 1} entries of {dims} positive ints (one per down-sampling), "
            f"got {config.strides}"
        )
    return strides


class UNet(SegmentationModel):
    """Plain convolutional U-Net on 2D slices.

    Input ``(b, in_channels, H, W)``, any size (padded to the product of the strides, cropped back); output logits
    ``(b, num_classes, H, W)``.

    Args:
        config: Widths, conv units per stage, strides and norm (see :class:`UNetConfig`).
    """

    spatial_dims = 2
    encoder_module_names = ("encoder",)

    def __init__(self, config: UNetConfig) -> None:
        dims = self.spatial_dims
        strides = _validate(config, dims)
        divisor = tuple(math.prod(s[axis] for s in strides) for axis in range(dims))
        super().__init__(config, divisor)
        widths = config.widths
        ones = (1,) * dims
        self.encoder = nn.ModuleList([_conv_stack(dims, config.in_channels, widths[0], ones, config)])
        for i, stride in enumerate(strides):
            self.encoder.append(_conv_stack(dims, widths[i], widths[i + 1], stride, config))
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i in reversed(range(len(strides))):
            stride = strides[i]
            self.upsample.append(_CONV_T[dims](widths[i + 1], widths[i], stride, stride=stride, bias=False))
            self.decoder.append(_conv_stack(dims, 2 * widths[i], widths[i], ones, config))
        self.head = _CONV[dims](widths[0], config.num_classes, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for ``x`` ``(b, in_channels, *S)`` with S divisible by ``size_divisor``: ``(b, num_classes, *S)``."""
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        for up, stage in zip(self.upsample, self.decoder, strict=True):
            x = stage(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


class UNet3D(UNet):
    """Plain convolutional U-Net on volumes: input ``(b, in_channels, D, H, W)``, logits ``(b, num_classes, D, H, W)``.

    Args:
        config: See :class:`UNetConfig`; ``strides`` entries have 3 ints (D, H, W).
    """

    spatial_dims = 3


_NNUNET = "Isensee et al. 2021 (nnU-Net plain conv U-Net); baseline, no paper figures"


@register_model(UNet, spatial_dims=2, paper=PaperFigures(source=_NNUNET))
def unet(**overrides) -> UNetConfig:
    """Plain 2D conv U-Net (nnU-Net style), size-matched to VM-UNet: widths 40..576, 27.4 M parameters."""
    return UNetConfig(**overrides)


@register_model(UNet3D, spatial_dims=3, paper=PaperFigures(source=_NNUNET))
def unet_3d(**overrides) -> UNetConfig:
    """Plain 3D conv U-Net with nnU-Net 3d_fullres widths (32..320), 31.2 M parameters."""
    return UNetConfig(**{"widths": (32, 64, 128, 256, 320, 320), **overrides})


@register_model(UNet, spatial_dims=2)
def test_unet(**overrides) -> UNetConfig:
    """Tiny 2D U-Net for fast tests."""
    return UNetConfig(**{"widths": (8, 16, 32), **overrides})


@register_model(UNet3D, spatial_dims=3)
def test_unet_3d(**overrides) -> UNetConfig:
    """Tiny 3D U-Net for fast tests."""
    return UNetConfig(**{"widths": (4, 8, 16), **overrides})
