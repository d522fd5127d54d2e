"""Fixtures of the inference tests: per-pixel models (any tiling reproduces their whole-image output exactly),
tiny registered models, and small images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from napari_mamba_seg.models import ModelConfig, SegmentationModel, create_model


class _PerPixelModel(SegmentationModel):
    """1×1 convolutions and a nonlinearity, no normalisation: the logits of a voxel depend on that voxel only,
    so they are the same whatever tile it is predicted in (and under any flip)."""

    def __init__(self, in_channels: int = 2, num_classes: int = 3, size_divisor: int = 4) -> None:
        super().__init__(ModelConfig(in_channels=in_channels, num_classes=num_classes), size_divisor)
        conv = nn.Conv2d if self.spatial_dims == 2 else nn.Conv3d
        generator = torch.Generator().manual_seed(0)
        self.mix = conv(in_channels, 8, 1)
        self.head = conv(8, num_classes, 1)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(x)))


class PerPixel2D(_PerPixelModel):
    spatial_dims = 2


class PerPixel3D(_PerPixelModel):
    spatial_dims = 3


@pytest.fixture
def per_pixel_2d() -> PerPixel2D:
    return PerPixel2D()


@pytest.fixture
def per_pixel_3d() -> PerPixel3D:
    return PerPixel3D()


@pytest.fixture
def vm_unet() -> SegmentationModel:
    """Tiny registered 2D Mamba model: 2 channels in, 3 classes."""
    torch.manual_seed(0)
    return create_model("test_vm_unet", in_channels=2, num_classes=3)


@pytest.fixture
def unet_3d() -> SegmentationModel:
    """Tiny registered 3D model: 2 channels in, 3 classes."""
    torch.manual_seed(0)
    return create_model("test_unet_3d", in_channels=2, num_classes=3)


def _make_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=shape).astype(np.float32)
    grids = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape[1:]), indexing="ij")
    blob = np.exp(-3 * sum(g**2 for g in grids)).astype(np.float32)
    scale = np.arange(1, shape[0] + 1, dtype=np.float32).reshape(-1, *(1,) * (len(shape) - 1))
    return 0.5 * noise + 4 * scale * blob[None]


@pytest.fixture
def make_image():
    """``make_image(shape, seed=0)``: a channel-first float32 image, noise plus a centred blob per channel."""
    return _make_image


@pytest.fixture
def image_4d() -> np.ndarray:
    """``(2, 7, 24, 20)``: a small two-channel volume."""
    return _make_image((2, 7, 24, 20))


@pytest.fixture
def per_pixel():
    """``per_pixel(spatial_dims, in_channels=2, num_classes=3, size_divisor=4)``: a new per-pixel model."""

    def build(spatial_dims: int, **kwargs) -> _PerPixelModel:
        return (PerPixel2D if spatial_dims == 2 else PerPixel3D)(**kwargs)

    return build
