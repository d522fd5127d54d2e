"""VM-UNet (Ruan et al. 2024, "VM-UNet: Vision Mamba UNet for Medical Image Segmentation"), on the package scan.

A U-shape built only of visual state-space (VSS) blocks: a 4x4 patch embedding, encoder stages of VSS blocks with
patch merging (dims 96 -> 192 -> 384 -> 768, depths [2, 2, 2, 2]), decoder stages with patch expanding and
additive skip connections (depths [2, 2, 2, 1]), then a final 4x patch expanding and a 1x1 convolution to the
classes. All maps are channels-last ``(b, H, W, C)`` inside the network.

Submodule names follow the public code (github.com/JCruan519/VM-UNet, ``models/vmunet/vmamba.py``, class ``VSSM``):
``patch_embed``, ``layers.{i}.blocks.{j}.self_attention.*``, ``layers.{i}.downsample``, ``layers_up.{i}.upsample``,
``final_up``, ``final_conv``, so a public checkpoint loads after :func:`map_public_checkpoint_keys`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from napari_mamba_seg.models._base import ModelConfig, SegmentationModel
from napari_mamba_seg.models._registry import PaperFigures, register_model
from napari_mamba_seg.models.layers.init import init_transformer_weights
from napari_mamba_seg.models.layers.ss2d import VSSBlock

__all__ = [
    "FinalPatchExpand2D",
    "PatchEmbed2D",
    "PatchExpand2D",
    "PatchMerging2D",
    "VMUNet",
    "VMUNetConfig",
    "VSSLayer",
    "VSSLayerUp",
    "map_public_checkpoint_keys",
    "patch_merge",
    "patch_unshuffle",
]


@dataclass
class VMUNetConfig(ModelConfig):
    """VM-UNet hyper-parameters (defaults: the paper's model).

    Attributes:
        patch_size: Side of the non-overlapping patch embedding (and of the final up-expansion).
        dims: Channels of the encoder stages; the decoder uses them reversed. Each stage doubles the last.
        depths: VSS blocks per encoder stage.
        depths_decoder: VSS blocks per decoder stage, deepest first.
        d_state: SSM state size N of every SS2D.
        drop_path_rate: Largest stochastic-depth rate (linearly increasing over the encoder blocks, decreasing over
            the decoder blocks, as in the public code).
        attn_drop_rate: Dropout on the SS2D output.
    """

    patch_size: int = 4
    dims: tuple[int, ...] = (96, 192, 384, 768)
    depths: tuple[int, ...] = (2, 2, 2, 2)
    depths_decoder: tuple[int, ...] = (2, 2, 2, 1)
    d_state: int = 16
    drop_path_rate: float = 0.2
    attn_drop_rate: float = 0.0

    def __post_init__(self) -> None:
        stages = len(self.dims)
        if stages < 1 or len(self.depths) != stages or len(self.depths_decoder) != stages:
            raise ValueError(
                f"dims, depths and depths_decoder need one entry per stage, got {self.dims}, {self.depths}, "
                f"{self.depths_decoder}"
            )
        if any(b != 2 * a for a, b in itertools.pairwise(self.dims)):
            raise ValueError(
                f"each stage must double the channels of the previous one (patch merging), got {self.dims}"
            )
        if self.patch_size < 1 or self.dims[0] % self.patch_size:
            raise ValueError(f"dims[0]={self.dims[0]} must be divisible by patch_size={self.patch_size} (final expand)")


def patch_merge(x: torch.Tensor) -> torch.Tensor:
    """Gather each 2x2 neighbourhood into channels, in the public code's order.

    Args:
        x: ``(b, H, W, C)`` with even H and W.

    Returns:
        ``(b, H/2, W/2, 4C)``: ``[x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]]`` along channels.
    """
    parts = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
    return torch.cat(parts, dim=-1)


def patch_unshuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Spread channel groups over a ``scale x scale`` neighbourhood: ``b h w (p1 p2 c) -> b (h p1) (w p2) c``.

    Args:
        x: ``(b, H, W, scale**2 * C)``.
        scale: Up-sampling factor.

    Returns:
        ``(b, H*scale, W*scale, C)``.
    """
    b, h, w, channels = x.shape
    c = channels // scale**2
    x = x.reshape(b, h, w, scale, scale, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * scale, w * scale, c)


class PatchEmbed2D(nn.Module):
    """Non-overlapping ``patch_size`` convolution + LayerNorm: ``(b, C_in, H, W) -> (b, H/p, W/p, dim)``."""

    def __init__(self, in_channels: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging2D(nn.Module):
    """2x down-sampling: 2x2 gather, LayerNorm, linear ``4C -> 2C``: ``(b, H, W, C) -> (b, H/2, W/2, 2C)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(self.norm(patch_merge(x)))


class PatchExpand2D(nn.Module):
    """2x up-sampling to ``dim`` channels: linear ``2*dim -> 4*dim``, unshuffle, LayerNorm.

    ``(b, H, W, 2*dim) -> (b, 2H, 2W, dim)``. ``dim`` is the *output* width, as in the public code.
    """

    def __init__(self, dim: int, scale: int = 2) -> None:
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(2 * dim, 2 * scale * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim // scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(patch_unshuffle(self.expand(x), self.scale))


class FinalPatchExpand2D(nn.Module):
    """Final ``scale``x up-sampling: linear ``dim -> scale*dim``, unshuffle, LayerNorm.

    ``(b, H, W, dim) -> (b, scale*H, scale*W, dim/scale)``.
    """

    def __init__(self, dim: int, scale: int = 4) -> None:
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(dim, scale * dim, bias=False)
        self.norm = nn.LayerNorm(dim // scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(patch_unshuffle(self.expand(x), self.scale))


class VSSLayer(nn.Module):
    """Encoder stage: blocks, then an optional patch merging. ``(b, H, W, C) -> (b, H/2, W/2, 2C)`` or same shape.

    Args:
        blocks: The stage's blocks, each channels-last and shape-preserving.
        downsample: Patch merging after the blocks, or None for the deepest stage.
    """

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class VSSLayerUp(nn.Module):
    """Decoder stage: an optional patch expanding, then blocks. ``(b, H, W, 2C) -> (b, 2H, 2W, C)`` or same shape.

    Args:
        blocks: The stage's blocks, each channels-last and shape-preserving.
        upsample: Patch expanding before the blocks, or None for the deepest stage.
    """

    def __init__(self, blocks: list[nn.Module], upsample: nn.Module | None) -> None:
        super().__init__()
        self.upsample = upsample
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample is not None:
            x = self.upsample(x)
        for block in self.blocks:
            x = block(x)
        return x


def _drop_path_rates(rate: float, count: int) -> list[float]:
    """``count`` rates rising linearly from 0 to ``rate`` (timm's stochastic-depth decay rule)."""
    return [rate * i / (count - 1) for i in range(count)] if count > 1 else [0.0] * count


class VMUNet(SegmentationModel):
    """VM-UNet: VSS encoder-decoder with patch merging/expanding and additive skips.

    Input ``(b, in_channels, H, W)``, any size (padded to a multiple of ``patch_size * 2**(stages-1)``, 32 for the
    paper's model, and cropped back). Output logits ``(b, num_classes, H, W)``.

    Subclasses change the block (e.g. SA-UMamba's RSSS block) by overriding :meth:`make_block`.

    Args:
        config: The architecture's hyper-parameters.
    """

    spatial_dims = 2
    encoder_module_names = ("patch_embed", "layers")

    def __init__(self, config: VMUNetConfig) -> None:
        stages = len(config.dims)
        super().__init__(config, size_divisor=config.patch_size * 2 ** (stages - 1))
        self.patch_embed = PatchEmbed2D(config.in_channels, config.dims[0], config.patch_size)
        self.layers = self._build_encoder()
        self.layers_up = self._build_decoder()
        self.final_up = FinalPatchExpand2D(config.dims[0], scale=config.patch_size)
        self.final_conv = nn.Conv2d(config.dims[0] // config.patch_size, config.num_classes, kernel_size=1)
        self.apply(init_transformer_weights)

    def _build_encoder(self) -> nn.ModuleList:
        """Encoder stages ``layers``: blocks at ``dims[i]``, then patch merging (all but the deepest)."""
        config = self.config
        rates = _drop_path_rates(config.drop_path_rate, sum(config.depths))
        layers = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(config.dims, config.depths, strict=True)):
            blocks = [self.make_block(dim, rates[sum(config.depths[:i]) + j]) for j in range(depth)]
            layers.append(VSSLayer(blocks, PatchMerging2D(dim) if i < len(config.dims) - 1 else None))
        return layers

    def _build_decoder(self) -> nn.ModuleList:
        """Decoder stages ``layers_up``, deepest first: patch expanding (all but the deepest), then blocks."""
        config = self.config
        depths = config.depths_decoder
        rates = _drop_path_rates(config.drop_path_rate, sum(depths))[::-1]
        layers = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(config.dims[::-1], depths, strict=True)):
            blocks = [self.make_block(dim, rates[sum(depths[:i]) + j]) for j in range(depth)]
            layers.append(VSSLayerUp(blocks, PatchExpand2D(dim) if i > 0 else None))
        return layers

    def make_block(self, dim: int, drop_path: float) -> nn.Module:
        """One channels-last, shape-preserving block of ``dim`` channels: here a :class:`VSSBlock`."""
        config = self.config
        return VSSBlock(dim, d_state=config.d_state, drop_path=drop_path, attn_drop_rate=config.attn_drop_rate)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encoder pass.

        Args:
            x: ``(b, in_channels, H, W)``, H and W multiples of ``size_divisor``.

        Returns:
            The deepest map ``(b, H/32, W/32, dims[-1])`` and the input of every encoder stage (channels-last,
            shallowest first); the decoder adds all but the first as skips.
        """
        x = self.patch_embed(x)
        skips = []
        for layer in self.layers:
            skips.append(x)
            x = layer(x)
        return x, skips

    def decode(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """Decoder pass: stage ``i > 0`` takes ``x + skips[-i]``; returns ``(b, H/4, W/4, dims[0])``."""
        for i, layer in enumerate(self.layers_up):
            x = layer(x if i == 0 else x + skips[-i])
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(b, num_classes, H, W)`` for ``x`` ``(b, in_channels, H, W)`` with H, W multiples of 32."""
        x, skips = self.encode(x)
        x = self.final_up(self.decode(x, skips))
        return self.final_conv(x.permute(0, 3, 1, 2))


_WRAPPER_KEYS = ("model_state_dict", "state_dict", "model")
_PREFIXES = ("module.", "vmunet.")


def map_public_checkpoint_keys(
    state_dict: Mapping[str, Any], *, in_channels: int | None = None, sigmoid_to_softmax: bool = False
) -> dict[str, torch.Tensor]:
    """Convert a checkpoint of the public VM-UNet code to a state dict that :class:`VMUNet` loads with strict=True.

    The public training script saves ``VMUNet.state_dict()`` (``best.pth``; keys ``vmunet.patch_embed.proj.weight``,
    ``vmunet.layers.0.blocks.0.self_attention.in_proj.weight``, ...) or a dict holding it under
    ``"model_state_dict"`` (``latest.pth``); multi-GPU runs add ``module.``. This function:

    1. unwraps ``"model_state_dict"``, ``"state_dict"`` or ``"model"`` when present;
    2. strips the ``module.`` and ``vmunet.`` prefixes (the rest of the names are already ours);
    3. with ``in_channels=1``, sums the 3-channel patch-embedding kernel over its input channels: the public model
       repeats a 1-channel image to 3 channels, so the result is exact for single-channel input;
    4. with ``sigmoid_to_softmax=True``, turns a 1-logit head (the public binary models, read through a sigmoid)
       into a 2-class head ``[0, z]`` whose softmax foreground probability equals ``sigmoid(z)``; build the model
       with ``num_classes=2`` then.

    It does not unpickle anything: load the ``.pth`` first (only when the user allowed pickle files).

    Args:
        state_dict: The public checkpoint, already loaded into memory.
        in_channels: Input channels of the target model; None keeps the checkpoint's.
        sigmoid_to_softmax: Convert a 1-class sigmoid head to a 2-class softmax head.

    Returns:
        A new dict with our parameter names; tensors are shared with ``state_dict`` except the converted ones.

    Raises:
        ValueError: The patch-embedding kernel cannot be adapted to ``in_channels``, or ``sigmoid_to_softmax`` is
            asked for a head with more than one class.
    """
    for key in _WRAPPER_KEYS:
        if isinstance(state_dict.get(key), Mapping):
            state_dict = state_dict[key]
            break
    mapped = {_strip_prefixes(name): tensor for name, tensor in state_dict.items()}
    if in_channels is not None:
        mapped["patch_embed.proj.weight"] = _adapt_input_channels(mapped["patch_embed.proj.weight"], in_channels)
    if sigmoid_to_softmax:
        mapped["final_conv.weight"], mapped["final_conv.bias"] = _sigmoid_head_to_softmax(
            mapped["final_conv.weight"], mapped["final_conv.bias"]
        )
    return mapped


def _strip_prefixes(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name


def _adapt_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Patch-embedding kernel ``(dim, c, p, p)`` for ``in_channels`` inputs (sum over channels when 1)."""
    if weight.shape[1] == in_channels:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    raise ValueError(
        f"the checkpoint's patch embedding takes {weight.shape[1]} input channels; cannot adapt it to {in_channels} "
        "(only to 1, by summing, which matches the public code repeating a grey image to 3 channels)"
    )


def _sigmoid_head_to_softmax(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1, C, 1, 1)``, ``(1,)`` sigmoid head -> ``(2, C, 1, 1)``, ``(2,)`` head with a zero background logit."""
    if weight.shape[0] != 1:
        raise ValueError(f"sigmoid_to_softmax needs a 1-class head, the checkpoint has {weight.shape[0]} classes")
    return torch.cat([torch.zeros_like(weight), weight]), torch.cat([torch.zeros_like(bias), bias])


@register_model(VMUNet, spatial_dims=2, paper=PaperFigures(source="Ruan et al. 2024 (VM-UNet)", params_m=27.43))
def vm_unet(**overrides: Any) -> VMUNetConfig:
    """VM-UNet (Ruan et al. 2024): VSS blocks, depths [2,2,2,2] / [2,2,2,1], dims 96->768."""
    return VMUNetConfig(**overrides)


@register_model(VMUNet, spatial_dims=2)
def test_vm_unet(**overrides: Any) -> VMUNetConfig:
    """Tiny VM-UNet for fast tests."""
    values: dict[str, Any] = {
        "dims": (8, 16, 32),
        "depths": (1, 1, 1),
        "depths_decoder": (1, 1, 1),
        "d_state": 4,
    }
    return VMUNetConfig(**{**values, **overrides})
