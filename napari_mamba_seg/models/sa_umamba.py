"""SA-UMamba (Liu et al. 2025, "SA-UMamba: Spatial attention convolutional neural networks for medical image
segmentation", PLoS One 20(6): e0325899), on the package scan.

The VM-UNet skeleton (:mod:`napari_mamba_seg.models.vm_unet`: patch embedding, patch merging/expanding, additive
skips, final 4x expansion) with every VSS block replaced by a residual spatial state-space (RSSS) block:

    x' = s1 * x + SS2D(LN(x))              (global: the VSS mixer)
    out = s2 * x' + RFAC(LN(x'))           (local: receptive-field attention convolution)

with ``s1``, ``s2`` learnable per channel (the "residual adjust strategy"). RFAC follows RFAConv (Zhang et al.
2023): k x k receptive-field features by a grouped convolution + BatchNorm + ReLU, an attention map by average
pooling + grouped 1x1 convolution + softmax over the k² positions, their product spread over a (kH, kW) map, then a
k x k convolution of stride k back to (H, W).

The paper gives no parameter count we could check; depths and dims here are VM-UNet's. Names: ``ln_1`` and
``self_attention`` as in VM-UNet (so VM-UNet/VMamba weights initialise the SS2D branches), ``skip_scale`` /
``skip_scale2`` for s1 / s2 (MambaIR's residual state-space block), ``get_weight`` / ``generate_feature`` /
``conv`` inside RFAC (public RFAConv code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from napari_mamba_seg.models._registry import PaperFigures, register_model
from napari_mamba_seg.models.layers.ss2d import SS2D, DropPath
from napari_mamba_seg.models.vm_unet import VMUNet, VMUNetConfig

__all__ = ["RFAC", "RSSSBlock", "SAUMamba", "SAUMambaConfig"]


@dataclass
class SAUMambaConfig(VMUNetConfig):
    """SA-UMamba hyper-parameters: VM-UNet's (see :class:`VMUNetConfig`) plus the RFAC kernel.

    Attributes:
        rfac_kernel_size: Odd receptive-field size k of RFAC.
    """

    rfac_kernel_size: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rfac_kernel_size < 1 or self.rfac_kernel_size % 2 == 0:
            raise ValueError(f"rfac_kernel_size must be odd and positive, got {self.rfac_kernel_size}")


class RFAC(nn.Module):
    """Receptive-field attention convolution: ``(b, C, H, W) -> (b, C, H, W)``.

    Args:
        channels: Input and output channels C.
        kernel_size: Odd receptive-field size k.
    """

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        k, positions = kernel_size, kernel_size**2
        self.kernel_size = k
        self.get_weight = nn.Sequential(
            nn.AvgPool2d(k, stride=1, padding=k // 2),
            nn.Conv2d(channels, channels * positions, 1, groups=channels, bias=False),
        )
        self.generate_feature = nn.Sequential(
            nn.Conv2d(channels, channels * positions, k, padding=k // 2, groups=channels, bias=False),
            nn.BatchNorm2d(channels * positions),
            nn.ReLU(),
        )
        self.conv = nn.Conv2d(channels, channels, k, stride=k)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention over the k² receptive-field positions: ``(b, C, H, W) -> (b, C, k², H, W)``, sums to 1 on k²."""
        b, c, h, w = x.shape
        return self.get_weight(x).reshape(b, c, self.kernel_size**2, h, w).softmax(dim=2)

    def receptive_field_features(self, x: torch.Tensor) -> torch.Tensor:
        """The k x k receptive-field features of every position: ``(b, C, H, W) -> (b, C, k², H, W)``."""
        b, c, h, w = x.shape
        return self.generate_feature(x).reshape(b, c, self.kernel_size**2, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        k = self.kernel_size
        weighted = self.receptive_field_features(x) * self.attention(x)  # (b, C, k², H, W)
        spread = weighted.reshape(b, c, k, k, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * k, w * k)
        return self.conv(spread)


class RSSSBlock(nn.Module):
    """Residual spatial state-space block on channels-last maps ``(b, H, W, C) -> (b, H, W, C)``.

    ``x' = s1 * x + drop_path(SS2D(LN(x)))``; ``out = s2 * x' + RFAC(LN(x'))``.

    Args:
        dim: Channels C.
        d_state: SSM state size.
        drop_path: Stochastic-depth rate of the SS2D branch.
        attn_drop_rate: Dropout inside SS2D.
        rfac_kernel_size: Receptive-field size of RFAC.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        drop_path: float = 0.0,
        attn_drop_rate: float = 0.0,
        rfac_kernel_size: int = 3,
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = SS2D(dim, d_state=d_state, dropout=attn_drop_rate)
        self.drop_path = DropPath(drop_path)
        self.skip_scale = nn.Parameter(torch.ones(dim))
        self.ln_2 = nn.LayerNorm(dim)
        self.rfac = RFAC(dim, rfac_kernel_size)
        self.skip_scale2 = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.skip_scale * x + self.drop_path(self.self_attention(self.ln_1(x)))
        local = self.rfac(self.ln_2(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.skip_scale2 * x + local


class SAUMamba(VMUNet):
    """SA-UMamba: the VM-UNet U-shape with RSSS blocks in every encoder and decoder stage.

    Input ``(b, in_channels, H, W)``, any size (padded to a multiple of 32 and cropped back). Output logits
    ``(b, num_classes, H, W)``.

    Args:
        config: The architecture's hyper-parameters.
    """

    def make_block(self, dim: int, drop_path: float) -> nn.Module:
        """An :class:`RSSSBlock` of ``dim`` channels."""
        config = self.config
        return RSSSBlock(dim, config.d_state, drop_path, config.attn_drop_rate, config.rfac_kernel_size)


@register_model(
    SAUMamba, spatial_dims=2, paper=PaperFigures(source="Liu et al. 2025, PLoS One 20(6): e0325899 (SA-UMamba)")
)
def sa_umamba(**overrides: Any) -> SAUMambaConfig:
    """SA-UMamba (Liu et al. 2025): VM-UNet skeleton with RSSS blocks (SS2D + receptive-field attention conv)."""
    return SAUMambaConfig(**overrides)


@register_model(SAUMamba, spatial_dims=2)
def test_sa_umamba(**overrides: Any) -> SAUMambaConfig:
    """Tiny SA-UMamba for fast tests."""
    values: dict[str, Any] = {"dims": (8, 16, 32), "depths": (1, 1, 1), "depths_decoder": (1, 1, 1), "d_state": 4}
    return SAUMambaConfig(**{**values, **overrides})
