"""UltraLight VM-UNet (Wu et al. 2024): parallel vision Mamba for skin-lesion-class segmentation at 0.049 M parameters.

Six stages of widths ``c_list`` (default 8, 16, 24, 32, 48, 64). Encoder stages 1-3 are 3×3 convolutions, stages 4-6
are parallel-vision-Mamba (PVM) layers; every encoder stage but the last ends in GroupNorm(4) + 2×2 max pooling +
GELU, so the deepest features are at 1/32 resolution. The decoder mirrors it (PVM layers, then 3×3 convolutions,
GroupNorm, ×2 bilinear up-sampling, GELU) and adds the skip features, which first pass through the spatial/channel
attention bridge (SAB then CAB, shared across the five skip levels). A 1×1 convolution and a last ×2 up-sampling give
the logits.

The PVM layer is the paper's point: LayerNorm, then the C channels split into 4 chunks of C/4 that all go through
*one* Mamba with ``d_model = C/4`` (plus a learned-scale residual), concatenated, normalised by the same LayerNorm and
projected to the output width. Sharing one Mamba across the chunks divides the Mamba's parameters by ~16 against a
single Mamba over all C channels.

Follows the authors' code (github.com/wurenkai/UltraLight-VM-UNet) layer for layer; differences: logits are returned
(no final sigmoid), and the official weight initialisation is applied to every layer except the Mamba mixers, which
keep mamba_ssm's own initialisation (the official ``self.apply`` also zeroes the Mamba dt bias, a side effect).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from napari_mamba_seg.models._base import ModelConfig, SegmentationModel
from napari_mamba_seg.models._registry import PaperFigures, register_model
from napari_mamba_seg.models.layers.mamba import Mamba

__all__ = [
    "ChannelAttentionBridge",
    "PVMLayer",
    "SpatialAttentionBridge",
    "SpatialChannelAttentionBridge",
    "UltraLightVMUNet",
    "UltraLightVMUNetConfig",
]

_LEVELS = 6
_SKIPS = _LEVELS - 1
_PVM_CHUNKS = 4
_GROUPS = 4


@dataclass
class UltraLightVMUNetConfig(ModelConfig):
    """Configuration of :class:`UltraLightVMUNet`.

    Attributes:
        c_list: Widths of the 6 stages; each a multiple of 4 (GroupNorm(4) and the 4-way PVM split).
        split_att: How the channel attention bridge maps the pooled vector to each level: ``"fc"`` (linear layers,
            the paper's choice) or ``"conv"`` (1×1 Conv1d).
        bridge: Use the spatial/channel attention bridge on the skip connections.
        d_state: SSM state size of the PVM Mamba.
        d_conv: Causal convolution width of the PVM Mamba.
        expand: Inner expansion of the PVM Mamba.
    """

    c_list: tuple[int, ...] = (8, 16, 24, 32, 48, 64)
    split_att: str = "fc"
    bridge: bool = True
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2

    def __post_init__(self) -> None:
        if len(self.c_list) != _LEVELS or any(c < _GROUPS or c % _GROUPS for c in self.c_list):
            raise ValueError(f"c_list must hold {_LEVELS} positive multiples of {_GROUPS}, got {self.c_list}")
        if self.split_att not in ("fc", "conv"):
            raise ValueError(f"split_att must be 'fc' or 'conv', got {self.split_att!r}")


class PVMLayer(nn.Module):
    """Parallel vision Mamba: one Mamba shared by the 4 channel chunks of the tokens.

    ``norm -> split C into 4 chunks -> Mamba(chunk) + skip_scale * chunk for each -> concat -> same norm -> proj``.

    Args:
        input_dim: Input channels C (multiple of 4).
        output_dim: Output channels.
        d_state: SSM state size.
        d_conv: Causal convolution width.
        expand: Mamba inner expansion.
    """

    def __init__(self, input_dim: int, output_dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2) -> None:
        super().__init__()
        if input_dim % _PVM_CHUNKS:
            raise ValueError(f"PVMLayer input_dim must be a multiple of {_PVM_CHUNKS}, got {input_dim}")
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.norm = nn.LayerNorm(input_dim)
        self.mamba = Mamba(input_dim // _PVM_CHUNKS, d_state=d_state, d_conv=d_conv, expand=expand)
        self.proj = nn.Linear(input_dim, output_dim)
        self.skip_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mix ``x`` ``(b, C_in, H, W)``; returns ``(b, C_out, H, W)``."""
        b, _, h, w = x.shape
        tokens = self.norm(x.flatten(2).transpose(1, 2))  # (b, H*W, C_in)
        chunks = tokens.chunk(_PVM_CHUNKS, dim=2)  # 4 × (b, H*W, C_in/4)
        mixed = torch.cat([self.mamba(chunk) + self.skip_scale * chunk for chunk in chunks], dim=2)
        out = self.proj(self.norm(mixed))  # (b, H*W, C_out)
        return out.transpose(1, 2).reshape(b, self.output_dim, h, w)


class ChannelAttentionBridge(nn.Module):
    """Channel attention shared across the skip levels (CAB).

    The globally pooled channels of all levels are concatenated, mixed by one 1D convolution (k=3) along the channel
    axis, and mapped back to each level's width by its own linear layer (or 1×1 Conv1d) + sigmoid.

    Args:
        widths: Channels of each skip level.
        split_att: ``"fc"`` or ``"conv"``.
    """

    def __init__(self, widths: tuple[int, ...], split_att: str = "fc") -> None:
        super().__init__()
        total = sum(widths)
        self.split_att = split_att
        self.get_all_att = nn.Conv1d(1, 1, kernel_size=3, padding=1, bias=False)
        make = (lambda c: nn.Linear(total, c)) if split_att == "fc" else (lambda c: nn.Conv1d(total, c, 1))
        self.atts = nn.ModuleList(make(c) for c in widths)

    def forward(self, skips: list[torch.Tensor]) -> list[torch.Tensor]:
        """Channel weights for ``skips`` (each ``(b, C_i, H_i, W_i)``): list of ``(b, C_i, 1, 1)`` in (0, 1)."""
        pooled = torch.cat([t.mean(dim=(2, 3)) for t in skips], dim=1)  # (b, sum C)
        att = self.get_all_att(pooled.unsqueeze(1))  # (b, 1, sum C)
        if self.split_att == "fc":
            return [torch.sigmoid(layer(att)).transpose(1, 2).unsqueeze(-1) for layer in self.atts]
        att = att.transpose(1, 2)  # (b, sum C, 1)
        return [torch.sigmoid(layer(att)).unsqueeze(-1) for layer in self.atts]


class SpatialAttentionBridge(nn.Module):
    """Spatial attention shared across the skip levels (SAB): one dilated 7×7 conv on [mean, max] over channels."""

    def __init__(self) -> None:
        super().__init__()
        self.shared_conv2d = nn.Conv2d(2, 1, 7, stride=1, padding=9, dilation=3)

    def forward(self, skips: list[torch.Tensor]) -> list[torch.Tensor]:
        """Spatial weights for ``skips`` (each ``(b, C_i, H_i, W_i)``): list of ``(b, 1, H_i, W_i)`` in (0, 1)."""
        maps = []
        for t in skips:
            pooled = torch.cat([t.mean(dim=1, keepdim=True), t.amax(dim=1, keepdim=True)], dim=1)  # (b, 2, H, W)
            maps.append(torch.sigmoid(self.shared_conv2d(pooled)))
        return maps


class SpatialChannelAttentionBridge(nn.Module):
    """SAB then CAB on the 5 skip features, each with a residual, as in the official ``SC_Att_Bridge``.

    ``s = SAB(t) * t``; ``u = s + t``; ``out = CAB(u) * u + s``.

    Args:
        widths: Channels of the skip levels.
        split_att: ``"fc"`` or ``"conv"`` (see :class:`ChannelAttentionBridge`).
    """

    def __init__(self, widths: tuple[int, ...], split_att: str = "fc") -> None:
        super().__init__()
        self.catt = ChannelAttentionBridge(widths, split_att)
        self.satt = SpatialAttentionBridge()

    def forward(self, skips: list[torch.Tensor]) -> list[torch.Tensor]:
        """Re-weight ``skips`` (each ``(b, C_i, H_i, W_i)``); returns tensors of the same shapes."""
        spatial = [a * t for a, t in zip(self.satt(skips), skips, strict=True)]
        summed = [s + t for s, t in zip(spatial, skips, strict=True)]
        channel = self.catt(summed)
        return [a * u + s for a, u, s in zip(channel, summed, spatial, strict=True)]


class UltraLightVMUNet(SegmentationModel):
    """UltraLight VM-UNet: 3 conv stages, 3 PVM stages, attention bridge on the skips (2D, size divisor 32).

    Input ``(b, in_channels, H, W)``, any H, W (padded to multiples of 32 and cropped back); output logits
    ``(b, num_classes, H, W)``.

    Args:
        config: The architecture's configuration.
    """

    spatial_dims = 2
    encoder_module_names = ("encoders", "encoder_norms")  # the attention bridge works on the skips: not encoder

    def __init__(self, config: UltraLightVMUNetConfig) -> None:
        super().__init__(config, size_divisor=2**_SKIPS)
        c = config.c_list
        self.bridge = config.bridge
        self.encoders = nn.ModuleList(
            [_conv3x3(config.in_channels, c[0]), _conv3x3(c[0], c[1]), _conv3x3(c[1], c[2])]
            + [self._pvm(config, c[i], c[i + 1]) for i in (2, 3, 4)]
        )
        self.encoder_norms = nn.ModuleList(nn.GroupNorm(_GROUPS, c[i]) for i in range(_SKIPS))
        if config.bridge:
            self.scab = SpatialChannelAttentionBridge(tuple(c[:_SKIPS]), config.split_att)
        self.decoders = nn.ModuleList(
            [self._pvm(config, c[i + 1], c[i]) for i in (4, 3, 2)] + [_conv3x3(c[2], c[1]), _conv3x3(c[1], c[0])]
        )
        self.decoder_norms = nn.ModuleList(nn.GroupNorm(_GROUPS, c[i]) for i in reversed(range(_SKIPS)))
        self.final = nn.Conv2d(c[0], config.num_classes, kernel_size=1)
        self._init_weights()

    @staticmethod
    def _pvm(config: UltraLightVMUNetConfig, input_dim: int, output_dim: int) -> PVMLayer:
        return PVMLayer(input_dim, output_dim, d_state=config.d_state, d_conv=config.d_conv, expand=config.expand)

    def _init_weights(self) -> None:
        """The official initialisation (trunc-normal linear, fan-out normal convs) on all but the Mamba mixers."""
        in_mamba = {id(s) for m in self.modules() if isinstance(m, Mamba) for s in m.modules()}
        for m in self.modules():
            if id(m) in in_mamba:
                continue
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv1d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.out_channels)))
            elif isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encoder: the bottleneck ``(b, c5, H/32, W/32)`` and the 5 skips ``(b, c_i, H/2^(i+1), W/2^(i+1))``."""
        skips = []
        for encoder, norm in zip(self.encoders[:_SKIPS], self.encoder_norms, strict=True):
            x = F.gelu(F.max_pool2d(norm(encoder(x)), 2, 2))
            skips.append(x)
        bottleneck = F.gelu(self.encoders[_SKIPS](x))
        if self.bridge:
            skips = self.scab(skips)
        return bottleneck, skips

    def decode(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Decoder: from the bottleneck ``(b, c5, H/32, W/32)`` and the skips to features ``(b, c0, H/2, W/2)``."""
        x = F.gelu(self.decoder_norms[0](self.decoders[0](x))) + skips[-1]
        for decoder, norm, skip in zip(self.decoders[1:], self.decoder_norms[1:], reversed(skips[:-1]), strict=True):
            x = F.gelu(_up2(norm(decoder(x)))) + skip
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(b, num_classes, H, W)`` for ``x`` ``(b, in_channels, H, W)`` with H, W multiples of 32."""
        bottleneck, skips = self.encode(x)
        return _up2(self.final(self.decode(bottleneck, skips)))


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)


def _up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)


@register_model(
    UltraLightVMUNet,
    spatial_dims=2,
    paper=PaperFigures(
        source="Wu et al. 2024 (UltraLight VM-UNet)", params_m=0.049, gflops=0.060, input_size=(256, 256)
    ),
)
def ultralight_vm_unet(**overrides) -> UltraLightVMUNetConfig:
    """UltraLight VM-UNet, c_list 8-64, PVM layers and SAB/CAB bridge (0.049 M parameters)."""
    return UltraLightVMUNetConfig(**overrides)


@register_model(UltraLightVMUNet, spatial_dims=2)
def test_ultralight_vm_unet(**overrides) -> UltraLightVMUNetConfig:
    """Tiny UltraLight VM-UNet for fast tests."""
    values = {"c_list": (4, 8, 8, 12, 12, 16), "d_state": 4} | overrides
    return UltraLightVMUNetConfig(**values)
