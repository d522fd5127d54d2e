"""MLLA-UNet (Jiang et al. 2024, arXiv 2410.23738): Mamba-like linear attention blocks in a symmetric U-shape.

Encoder ("feature compression"): MLLA's convolutional stem (two stride-2 3×3 convs with a residual pair in between,
×4 down-sampling to ``embed_dim`` channels), then stages of MLLA blocks (Han et al. 2024; see
:mod:`napari_mamba_seg.models.layers.mlla`) joined by MLLA's patch merging (×2 down, channels ×2). The MLLA-T widths
and depths are the default: embed_dim 64, depths (2, 4, 8, 4), heads (2, 4, 8, 16).

Decoder ("feature expansion"), the mirror image: at each level a patch-expanding module (the transposed twin of
patch merging: ×2 up, channels / 2), concatenation with the encoder stage output of that scale, a linear layer back
to the level's width, and as many MLLA blocks as the encoder stage had. A final ×4 expansion mirrors the stem
(1×1 conv, transposed stride-2 conv, residual conv pair, transposed stride-2 conv) before the 1×1 classifier.

Every token mixer is linear attention (ELU+1 features, 2D RoPE, LePE): cost linear in the number of tokens, no
selective scan. 2D only, as in the paper. Total down-sampling 4 · 2^(stages-1) (32 by default).

Not reproduced: ImageNet pre-training of the encoder (MLLA-T weights), which the paper starts from. The
stored copy of the authors' repository (csyfjiang/MLLA-UNet) holds only a README, so the paper and the MLLA code
(LeapLabTHU/MLLA) are the spec. Module names inside the blocks, the stem and patch merging follow MLLA's, so an
MLLA-T checkpoint maps onto the encoder by renaming ``layers.{i}.blocks.{j}`` / ``layers.{i}.downsample`` /
``patch_embed`` to ``encoder.{i}.{j}`` / ``merging.{i}`` / ``stem``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from napari_mamba_seg.models._base import ModelConfig, SegmentationModel
from napari_mamba_seg.models._registry import PaperFigures, register_model
from napari_mamba_seg.models.layers.init import init_transformer_weights
from napari_mamba_seg.models.layers.mlla import ConvLayer, MLLABlock, PatchExpanding, PatchMerging

__all__ = ["MLLAUNet", "MLLAUNetConfig"]


@dataclass
class MLLAUNetConfig(ModelConfig):
    """Configuration of :class:`MLLAUNet`.

    Attributes:
        embed_dim: Channels after the stem (level 0); level i has ``embed_dim * 2**i``. Multiple of 4.
        depths: MLLA blocks per encoder stage, shallowest first (the last stage is the bottleneck).
        num_heads: Attention heads per stage; must divide that stage's width.
        decoder_depths: MLLA blocks per decoder level, shallowest first, ``len(depths) - 1`` entries
            (default: the encoder's, for a symmetric network).
        mlp_ratio: MLP hidden width relative to the block width.
        qkv_bias: Bias of the q/k projections.
        drop_path_rate: Stochastic depth, rising linearly over the encoder blocks (decoder blocks mirror them).
        sampling_ratio: Hidden-width expansion inside patch merging / expanding.
    """

    embed_dim: int = 64
    depths: tuple[int, ...] = (2, 4, 8, 4)
    num_heads: tuple[int, ...] = (2, 4, 8, 16)
    decoder_depths: tuple[int, ...] = (2, 4, 8)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.1
    sampling_ratio: float = 4.0


def _validate(config: MLLAUNetConfig) -> None:
    levels = len(config.depths)
    if levels < 2:
        raise ValueError(f"depths needs at least 2 stages, got {config.depths}")
    if len(config.num_heads) != levels or len(config.decoder_depths) != levels - 1:
        raise ValueError(
            f"num_heads needs {levels} entries and decoder_depths {levels - 1}, got {config.num_heads} and "
            f"{config.decoder_depths}"
        )
    if config.embed_dim < 4 or config.embed_dim % 4:
        raise ValueError(f"embed_dim must be a positive multiple of 4 (2D RoPE), got {config.embed_dim}")
    for i, heads in enumerate(config.num_heads):
        if heads < 1 or (config.embed_dim << i) % heads:
            raise ValueError(f"stage {i}: width {config.embed_dim << i} is not divisible by num_heads {heads}")


class Stem(nn.Module):
    """MLLA's stem: ``(b, in_channels, H, W) -> (b, H/4, W/4, dim)`` channels-last tokens.

    3×3 stride-2 conv to dim/2, a residual pair of 3×3 convs, 3×3 stride-2 conv to 4·dim, 1×1 conv to dim.
    """

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        half = dim // 2
        self.conv1 = ConvLayer(in_channels, half, 3, stride=2, bias=False)
        self.conv2 = nn.Sequential(
            ConvLayer(half, half, 3, bias=False), ConvLayer(half, half, 3, act=False, bias=False)
        )
        self.conv3 = nn.Sequential(
            ConvLayer(half, 4 * dim, 3, stride=2, bias=False), ConvLayer(4 * dim, dim, 1, act=False, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = x + self.conv2(x)
        return self.conv3(x).permute(0, 2, 3, 1)


class FinalExpanding(nn.Module):
    """Mirror of :class:`Stem` (the paper's symmetric sampling): ``(b, H/4, W/4, dim) -> (b, dim/2, H, W)``.

    1×1 conv to 4·dim, transposed stride-2 3×3 conv to dim/2, residual pair of 3×3 convs, transposed stride-2 3×3
    conv.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        half = dim // 2
        self.conv3 = nn.Sequential(
            ConvLayer(dim, 4 * dim, 1, bias=False), ConvLayer(4 * dim, half, 3, stride=2, transposed=True, bias=False)
        )
        self.conv2 = nn.Sequential(
            ConvLayer(half, half, 3, bias=False), ConvLayer(half, half, 3, act=False, bias=False)
        )
        self.conv1 = ConvLayer(half, half, 3, stride=2, transposed=True, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3(x.permute(0, 3, 1, 2))
        x = x + self.conv2(x)
        return self.conv1(x)


def _stage(dim: int, depth: int, heads: int, rates: list[float], config: MLLAUNetConfig) -> nn.Sequential:
    """``depth`` MLLA blocks of width ``dim``; block i gets stochastic-depth rate ``rates[i]`` (the last one past
    the end of ``rates``)."""
    return nn.Sequential(
        *(
            MLLABlock(dim, heads, config.mlp_ratio, config.qkv_bias, drop_path=rates[min(i, len(rates) - 1)])
            for i in range(depth)
        )
    )


class MLLAUNet(SegmentationModel):
    """MLLA-UNet for 2D slices: input ``(b, in_channels, H, W)`` (any size; padded to a multiple of
    ``4 · 2**(stages-1)``), logits ``(b, num_classes, H, W)``.

    Args:
        config: See :class:`MLLAUNetConfig`.
    """

    spatial_dims = 2
    encoder_module_names = ("stem", "encoder", "merging", "norm")

    def __init__(self, config: MLLAUNetConfig) -> None:
        _validate(config)
        levels = len(config.depths)
        super().__init__(config, 4 * 2 ** (levels - 1))
        dims = [config.embed_dim * 2**i for i in range(levels)]
        rates = torch.linspace(0, config.drop_path_rate, sum(config.depths)).tolist()
        starts = [sum(config.depths[:i]) for i in range(levels)]
        self.stem = Stem(config.in_channels, dims[0])
        self.encoder = nn.ModuleList(
            _stage(dims[i], config.depths[i], config.num_heads[i], rates[starts[i] :], config) for i in range(levels)
        )
        self.merging = nn.ModuleList(PatchMerging(dims[i], config.sampling_ratio) for i in range(levels - 1))
        self.norm = nn.LayerNorm(dims[-1])
        self.expanding = nn.ModuleList(PatchExpanding(dims[i + 1], config.sampling_ratio) for i in range(levels - 1))
        self.skip_proj = nn.ModuleList(nn.Linear(2 * dims[i], dims[i]) for i in range(levels - 1))
        self.decoder = nn.ModuleList(
            _stage(dims[i], config.decoder_depths[i], config.num_heads[i], rates[starts[i] :], config)
            for i in range(levels - 1)
        )
        self.norm_up = nn.LayerNorm(dims[0])
        self.final_expanding = FinalExpanding(dims[0])
        self.head = nn.Conv2d(dims[0] // 2, config.num_classes, 1)
        self.apply(init_transformer_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for ``x`` ``(b, in_channels, H, W)``, H and W multiples of ``size_divisor``:
        ``(b, num_classes, H, W)``."""
        x = self.stem(x)
        skips = []
        for i, stage in enumerate(self.encoder):
            x = stage(x)
            if i < len(self.merging):
                skips.append(x)
                x = self.merging[i](x)
        x = self.norm(x)
        for i in reversed(range(len(self.decoder))):
            x = self.skip_proj[i](torch.cat([self.expanding[i](x), skips[i]], dim=-1))
            x = self.decoder[i](x)
        return self.head(self.final_expanding(self.norm_up(x)))


@register_model(
    MLLAUNet,
    spatial_dims=2,
    paper=PaperFigures(source="Jiang et al. 2024 (MLLA-UNet, arXiv 2410.23738); MLLA-T encoder (Han et al. 2024)"),
)
def mlla_unet(**overrides) -> MLLAUNetConfig:
    """MLLA-UNet with the MLLA-T encoder (embed 64, depths 2-4-8-4) and a mirrored decoder; 2D."""
    return MLLAUNetConfig(**overrides)


@register_model(MLLAUNet, spatial_dims=2)
def test_mlla_unet(**overrides) -> MLLAUNetConfig:
    """Tiny MLLA-UNet for fast tests."""
    defaults = {"embed_dim": 8, "depths": (1, 1, 1), "num_heads": (1, 2, 2), "decoder_depths": (1, 1)}
    return MLLAUNetConfig(**{**defaults, **overrides})
