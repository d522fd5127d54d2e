"""Attention-Mamba (Zhang et al., arXiv 2402.02286): a multi-scale parallel inference network enhanced with Mamba.

Instead of a U-shaped decoder, the network predicts at every level in parallel and fuses the predictions:

1. **Encoder**: ResNet-18 with a deep stem (three 3×3 convolutions, 128 channels into stage 1), stages at 1/4,
   1/8, 1/16 and 1/32 resolution.
2. **Dual-path aggregation with lateral connections**: each stage is projected to ``feature_dim`` channels (1×1
   conv, the lateral connection); a top-down path carries semantics to the fine levels and a bottom-up path spatial
   detail to the coarse ones (each step: resize, add the lateral feature, 3×3 conv-BN-ReLU). Level 1 takes the
   top-down result, the last level the bottom-up one, the levels between fuse both (add, 3×3 conv-BN-ReLU).
3. **Recursive Alignment Module (RAM)**: between each pair of neighbouring levels a flow field (offset map) is
   predicted from both features; a coarse level is warped (``grid_sample``) onto the next finer level's grid, then
   that one's, and so on down to level 1, so each coarse feature regains spatial detail step by step and all levels
   end at 1/4 resolution.
4. **Parallel Mamba branches**: each aligned level goes through its own stack of VSS blocks (SS2D) and a 1×1
   prediction head.
5. **Mamba-based attention fusion**: per level, a channel descriptor (average + max pooling) and a spatial
   descriptor ([mean, max] over channels) are concatenated across the levels into one sequence each, mixed by a
   forward and a reverse Mamba, and turned into channel weights (per level and class, by a two-layer bottleneck +
   sigmoid) and spatial weights (linear + sigmoid). The final logits are the sum over levels of prediction × channel
   weight × spatial weight, up-sampled ×4.

Parameters and FLOPs: the paper reports 14.05 M parameters and 8.94 GFLOPs (224×224 inputs, 9 Synapse classes).
The full-size configuration here has 14.05 M (14,050,159) at ``in_channels=3, num_classes=9`` (see the tests;
14,054,803 with the auxiliary heads below, also 14.05 M); its convolutions and matrix products take 8.0 G
multiply-adds at 224×224, the selective scans and element-wise operations come on top.

It follows the authors' code (github.com/Yanhua-Zhang/Attention-Mamba, ``My_Attention_Mamba_2D``) layer for
layer, with these differences:

- The four auxiliary deep-supervision heads on the aligned features before the Mamba branches (1×1 conv each,
  4 × (128·classes + classes) parameters, 4.6 k at 9 classes) are left out: they only produce training-time
  auxiliary outputs, never the prediction, and every parameter here must take part in the forward pass.
- The first convolution takes ``in_channels`` directly; the official code repeats a grey image to 3 channels to
  reuse ImageNet weights (there are none here; the backbone starts from the ResNet initialisation).
- ``forward`` returns the fused logits only (the official training forward also returns the per-level
  predictions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from napari_mamba_seg.models._base import ModelConfig, SegmentationModel
from napari_mamba_seg.models._registry import PaperFigures, register_model
from napari_mamba_seg.models.layers.mamba import Mamba
from napari_mamba_seg.models.layers.ss2d import VSSBlock

__all__ = [
    "AttentionMamba",
    "AttentionMambaConfig",
    "DeepStemResNet",
    "DualPathAggregation",
    "MambaAttentionFusion",
    "RecursiveAlignment",
]

_STEM_STRIDE = 4  # stride-2 convolution + stride-2 max pooling


@dataclass
class AttentionMambaConfig(ModelConfig):
    """Configuration of :class:`AttentionMamba`.

    Attributes:
        stem_channels: Output channels of the 3 deep-stem 3×3 convolutions (the first has stride 2).
        stage_channels: Channels of the ResNet stages (level 1 at 1/4 resolution, each next one halves it).
        stage_blocks: Basic blocks per ResNet stage.
        feature_dim: Channels of every level after the lateral connections, in RAM and the Mamba branches.
        mamba_depths: VSS blocks in the Mamba branch of each level.
        d_state: SSM state size in the VSS blocks.
        attention_d_state: SSM state size of the four Mambas of the attention fusion.
        attention_reduction: ``feature_dim // attention_reduction`` hidden channels of the channel attention.
        drop_path_rate: Largest stochastic-depth rate in each Mamba branch (linear from 0).
    """

    stem_channels: tuple[int, ...] = (64, 64, 128)
    stage_channels: tuple[int, ...] = (64, 128, 256, 512)
    stage_blocks: tuple[int, ...] = (2, 2, 2, 2)
    feature_dim: int = 128
    mamba_depths: tuple[int, ...] = (2, 2, 2, 2)
    d_state: int = 16
    attention_d_state: int = 16
    attention_reduction: int = 16
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        levels = len(self.stage_channels)
        if levels < 2 or len(self.stage_blocks) != levels or len(self.mamba_depths) != levels:
            raise ValueError(
                "stage_channels, stage_blocks and mamba_depths need one entry per level (at least 2), got "
                f"{self.stage_channels}, {self.stage_blocks}, {self.mamba_depths}"
            )
        if len(self.stem_channels) != 3:
            raise ValueError(f"stem_channels needs 3 entries (deep stem), got {self.stem_channels}")


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _resize(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 conv-BN with a (projected when needed) identity, ReLU after the sum.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first convolution (and of the projection).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, C_in, H, W)`` -> ``(b, C_out, H / stride, W / stride)``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + identity, inplace=True)


class DeepStemResNet(nn.Module):
    """ResNet encoder with a deep stem (ResNet-18 layout by default), returning every stage's features.

    Args:
        in_channels: Input channels.
        stem_channels: Channels of the 3 stem convolutions.
        stage_channels: Channels of the stages.
        stage_blocks: Basic blocks per stage.
    """

    def __init__(
        self,
        in_channels: int,
        stem_channels: tuple[int, ...],
        stage_channels: tuple[int, ...],
        stage_blocks: tuple[int, ...],
    ) -> None:
        super().__init__()
        s0, s1, s2 = stem_channels
        self.stem = nn.Sequential(
            _conv_bn_relu(in_channels, s0, stride=2),
            _conv_bn_relu(s0, s1),
            _conv_bn_relu(s1, s2),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.stages = nn.ModuleList()
        width = s2
        for i, (channels, blocks) in enumerate(zip(stage_channels, stage_blocks, strict=True)):
            stride = 1 if i == 0 else 2
            layers = [BasicBlock(width, channels, stride)] + [BasicBlock(channels, channels) for _ in range(blocks - 1)]
            self.stages.append(nn.Sequential(*layers))
            width = channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage features of ``x`` ``(b, C, H, W)``: level i is ``(b, stage_channels[i], H / 2^(i+2), W / 2^(i+2))``."""
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class DualPathAggregation(nn.Module):
    """Lateral 1×1 projections, a top-down and a bottom-up path, and the fusion of both at the inner levels.

    Args:
        stage_channels: Channels of the encoder levels.
        feature_dim: Output channels of every level.
    """

    def __init__(self, stage_channels: tuple[int, ...], feature_dim: int) -> None:
        super().__init__()
        levels = len(stage_channels)
        self.laterals = nn.ModuleList(_conv_bn_relu(c, feature_dim, kernel_size=1) for c in stage_channels)
        self.top_down = nn.ModuleList(_conv_bn_relu(feature_dim, feature_dim) for _ in range(levels - 1))
        self.bottom_up = nn.ModuleList(_conv_bn_relu(feature_dim, feature_dim) for _ in range(levels - 1))
        self.fuses = nn.ModuleList(_conv_bn_relu(feature_dim, feature_dim) for _ in range(levels - 2))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Aggregate the encoder levels; returns one ``(b, feature_dim, H_i, W_i)`` per level, sizes unchanged."""
        lateral = [layer(f) for layer, f in zip(self.laterals, features, strict=True)]
        levels = len(lateral)
        top_down = [lateral[-1]]
        for i in reversed(range(levels - 1)):  # coarse to fine
            top_down.insert(0, self.top_down[i](_resize(top_down[0], lateral[i].shape[2:]) + lateral[i]))
        bottom_up = [lateral[0]]
        for i in range(1, levels):  # fine to coarse
            bottom_up.append(self.bottom_up[i - 1](_resize(bottom_up[-1], lateral[i].shape[2:]) + lateral[i]))
        inner = [fuse(top_down[i] + bottom_up[i]) for i, fuse in enumerate(self.fuses, start=1)]
        return [top_down[0], *inner, bottom_up[-1]]


class FlowOffset(nn.Module):
    """Sampling grid that aligns a coarse feature to a finer one (the offset map of RAM).

    Both features are reduced to ``middle_channels`` by 1×1 convolutions, the coarse one is up-sampled, and a 3×3
    convolution on their concatenation predicts a 2-channel flow (x, y) added to the identity grid.

    Args:
        channels: Channels of both features.
        middle_channels: Channels after the 1×1 reductions.
    """

    def __init__(self, channels: int, middle_channels: int) -> None:
        super().__init__()
        self.channel_change1 = nn.Conv2d(channels, middle_channels, 1, bias=False)
        self.channel_change2 = nn.Conv2d(channels, middle_channels, 1, bias=False)
        self.offset_map = nn.Conv2d(2 * middle_channels, 2, 3, padding=1, bias=False)

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """Sampling grid ``(b, h, w, 2)`` (``grid_sample`` coordinates) for ``fine`` ``(b, C, h, w)`` and ``coarse``.

        Args:
            fine: The finer level ``(b, C, h, w)``; the grid lives on its pixels.
            coarse: The next coarser level ``(b, C, h', w')``.
        """
        _, _, h, w = fine.shape
        coarse = _resize(self.channel_change1(coarse), (h, w))
        flow = self.offset_map(torch.cat([self.channel_change2(fine), coarse], dim=1))  # (b, 2, h, w)
        ys = torch.linspace(-1.0, 1.0, h, device=fine.device, dtype=fine.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=fine.device, dtype=fine.dtype)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        identity = torch.stack([grid_x, grid_y], dim=-1)  # (h, w, 2) as (x, y)
        norm = torch.tensor([w, h], device=fine.device, dtype=fine.dtype)
        return identity + flow.permute(0, 2, 3, 1) / norm


class RecursiveAlignment(nn.Module):
    """Recursive Alignment Module: warp every coarser level onto level 1's grid one level at a time.

    Offsets are predicted between each pair of neighbouring levels (i, i+1) on level i's grid; level k is then
    sampled with the offsets of pair (k-1, k), the result with those of (k-2, k-1), ..., down to (0, 1).

    Args:
        feature_dim: Channels of every level.
        levels: Number of levels.
    """

    def __init__(self, feature_dim: int, levels: int) -> None:
        super().__init__()
        self.offsets = nn.ModuleList(FlowOffset(feature_dim, max(1, feature_dim // 2)) for _ in range(levels - 1))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Align ``features`` (level i ``(b, C, H_i, W_i)``); returns all levels at level 1's size ``(b, C, H_0, W_0)``.

        Args:
            features: The aggregated levels, finest first.
        """
        grids = [offset(features[i], features[i + 1]) for i, offset in enumerate(self.offsets)]
        aligned = [features[0]]
        for level in range(1, len(features)):
            x = features[level]
            for k in reversed(range(level)):
                x = F.grid_sample(x, grids[k], mode="bilinear", padding_mode="zeros", align_corners=True)
            aligned.append(x)
        return aligned


class MambaBranch(nn.Module):
    """A stack of VSS blocks (LayerNorm + SS2D, residual) on a channels-first map.

    Args:
        dim: Channels.
        depth: VSS blocks.
        d_state: SSM state size.
        drop_path: Largest stochastic-depth rate (linear from 0 over the blocks).
    """

    def __init__(self, dim: int, depth: int, d_state: int, drop_path: float = 0.0) -> None:
        super().__init__()
        rates = torch.linspace(0, drop_path, depth).tolist() if depth else []
        self.blocks = nn.ModuleList(VSSBlock(dim, d_state=d_state, drop_path=r) for r in rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, C, H, W)`` -> ``(b, C, H, W)``."""
        x = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x)
        return x.permute(0, 3, 1, 2)


class MambaAttentionFusion(nn.Module):
    """Mamba-based channel and spatial attention over the per-level features, to weight the per-level predictions.

    Channel: per level ``avgpool + maxpool`` gives ``(b, C)``; the levels are concatenated into one sequence of
    ``levels * C`` one-dimensional tokens, mixed by a forward and a reverse Mamba (summed), and mapped by
    ``1×1 conv -> ReLU -> 1×1 conv -> sigmoid`` to ``levels * num_classes`` weights. Spatial: per level
    ``[mean, max]`` over channels gives ``H*W`` two-dimensional tokens; the levels are concatenated into one sequence
    of ``levels * H * W`` tokens, mixed the same way, and mapped by ``linear -> sigmoid`` to one weight per pixel.

    Args:
        num_classes: Classes of the predictions to weight.
        feature_dim: Channels C of each level.
        levels: Number of levels.
        d_state: SSM state size of the four Mambas.
        reduction: Hidden channels of the channel attention are ``feature_dim // reduction`` (at least 1).
    """

    def __init__(self, num_classes: int, feature_dim: int, levels: int, d_state: int = 16, reduction: int = 16) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.levels = levels
        self.channel_relation = Mamba(1, d_state=d_state, d_conv=4, expand=2)
        self.channel_relation_reverse = Mamba(1, d_state=d_state, d_conv=4, expand=2)
        hidden = max(1, feature_dim // reduction)
        self.fc1_channel = nn.Conv2d(feature_dim * levels, hidden, 1, bias=False)
        self.fc2_channel = nn.Conv2d(hidden, num_classes * levels, 1, bias=False)
        self.spatial_relation = Mamba(2, d_state=d_state, d_conv=4, expand=2)
        self.spatial_relation_reverse = Mamba(2, d_state=d_state, d_conv=4, expand=2)
        self.fc_spatial = nn.Linear(2, 1)

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Attention weights for ``features`` (``levels`` tensors ``(b, C, H, W)`` of one size).

        Returns:
            Channel weights, one ``(b, num_classes, 1, 1)`` per level, and spatial weights, one ``(b, 1, H, W)``
            per level, all in (0, 1).
        """
        return self.channel_attention(features), self.spatial_attention(features)

    def channel_attention(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-level, per-class weights ``(b, num_classes, 1, 1)`` from the cross-level channel sequence."""
        tokens = torch.cat([f.mean(dim=(2, 3)) + f.amax(dim=(2, 3)) for f in features], dim=1)  # (b, levels*C)
        mixed = _bidirectional(self.channel_relation, self.channel_relation_reverse, tokens.unsqueeze(-1))
        weights = torch.sigmoid(self.fc2_channel(F.relu(self.fc1_channel(mixed[..., None]))))  # (b, levels*K, 1, 1)
        return list(weights.chunk(self.levels, dim=1))

    def spatial_attention(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-level pixel weights ``(b, 1, H, W)`` from the cross-level spatial sequence."""
        b, _, h, w = features[0].shape
        descriptors = [torch.stack([f.mean(dim=1), f.amax(dim=1)], dim=-1).flatten(1, 2) for f in features]
        tokens = torch.cat(descriptors, dim=1)  # (b, levels*H*W, 2)
        mixed = _bidirectional(self.spatial_relation, self.spatial_relation_reverse, tokens)
        weights = torch.sigmoid(self.fc_spatial(mixed)).reshape(b, self.levels, h, w)
        return list(weights.unsqueeze(2).unbind(dim=1))


def _bidirectional(forward: Mamba, reverse: Mamba, tokens: torch.Tensor) -> torch.Tensor:
    """``forward(tokens) + flip(reverse(flip(tokens)))`` along the sequence axis of ``tokens`` ``(b, L, d)``."""
    return forward(tokens) + reverse(tokens.flip(1)).flip(1)


class AttentionMamba(SegmentationModel):
    """Attention-Mamba: parallel per-level predictions from aligned, Mamba-enhanced features, fused by attention.

    2D, size divisor ``4 * 2^(levels-1)`` (32 for the default 4 levels). Input ``(b, in_channels, H, W)``, any
    H, W; output logits ``(b, num_classes, H, W)``.

    Args:
        config: The architecture's configuration.
    """

    spatial_dims = 2
    encoder_module_names = ("encoder",)  # the ResNet backbone; aggregation, alignment and Mamba branches follow it

    def __init__(self, config: AttentionMambaConfig) -> None:
        levels = len(config.stage_channels)
        super().__init__(config, size_divisor=_STEM_STRIDE * 2 ** (levels - 1))
        dim = config.feature_dim
        self.encoder = DeepStemResNet(
            config.in_channels, config.stem_channels, config.stage_channels, config.stage_blocks
        )
        self.aggregation = DualPathAggregation(config.stage_channels, dim)
        self.alignment = RecursiveAlignment(dim, levels)
        self.mamba_branches = nn.ModuleList(
            MambaBranch(dim, depth, config.d_state, config.drop_path_rate) for depth in config.mamba_depths
        )
        self.heads = nn.ModuleList(nn.Conv2d(dim, config.num_classes, 1) for _ in range(levels))
        self.attention = MambaAttentionFusion(
            config.num_classes, dim, levels, config.attention_d_state, config.attention_reduction
        )

    def level_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Aligned, Mamba-enhanced features of each level, all ``(b, feature_dim, H/4, W/4)``."""
        aligned = self.alignment(self.aggregation(self.encoder(x)))
        return [branch(f) for branch, f in zip(self.mamba_branches, aligned, strict=True)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(b, num_classes, H, W)`` for ``x`` ``(b, in_channels, H, W)`` with H, W multiples of the divisor."""
        features = self.level_features(x)
        channel, spatial = self.attention(features)
        scores = [head(f) * c * s for head, f, c, s in zip(self.heads, features, channel, spatial, strict=True)]
        return _resize(torch.stack(scores).sum(dim=0), x.shape[2:])


@register_model(
    AttentionMamba,
    spatial_dims=2,
    paper=PaperFigures(
        source="Zhang et al. 2024 (Attention-Mamba)", params_m=14.05, gflops=8.94, input_size=(224, 224)
    ),
)
def attention_mamba(**overrides) -> AttentionMambaConfig:
    """Attention-Mamba: ResNet-18 deep stem, dual path, RAM, 4 Mamba branches, Mamba attention (14.05 M params)."""
    return AttentionMambaConfig(**overrides)


@register_model(AttentionMamba, spatial_dims=2)
def test_attention_mamba(**overrides) -> AttentionMambaConfig:
    """Tiny Attention-Mamba for fast tests."""
    values = {
        "stem_channels": (8, 8, 8),
        "stage_channels": (8, 12, 16, 16),
        "stage_blocks": (1, 1, 1, 1),
        "feature_dim": 8,
        "mamba_depths": (1, 1, 1, 1),
        "d_state": 4,
        "attention_d_state": 4,
        "attention_reduction": 4,
    } | overrides
    return AttentionMambaConfig(**values)
