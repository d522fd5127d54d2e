"""Base class and config shared by every segmentation architecture: input checks, padding to the network's size
divisor and cropping back, the scan backend switch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelConfig", "SegmentationModel", "set_scan_backend"]


@dataclass
class ModelConfig:
    """Fields every architecture config has (each architecture subclasses this dataclass).

    Attributes:
        in_channels: Input channels: 1 for a single MR sequence, 3 for three DCE phases.
        num_classes: Output channels (logits), background included.
    """

    in_channels: int = 1
    num_classes: int = 2


class SegmentationModel(nn.Module):
    """Base of every architecture: ``forward(x)`` checks ``x``, pads it, runs :meth:`forward_features`, crops back.

    Subclasses set ``spatial_dims`` (2 or 3), compute ``size_divisor`` (the product of their down-sampling
    factors) in ``__init__``, and implement :meth:`forward_features` on padded inputs. Inputs are zero-padded at the
    end of each axis to a multiple of the divisor, and to at least two divisors along the last axis when they would
    otherwise leave a single pixel in the deepest feature map.

    Input: ``(batch, in_channels, H, W)`` (2D) or ``(batch, in_channels, D, H, W)`` (3D), any spatial size,
    float. Output: logits ``(batch, num_classes, *spatial)`` of the same spatial size.

    Subclasses name the attributes holding their encoder (the down-sampling path from the input to the deepest
    features, as the paper draws it; skip bridges, necks, decoders and heads are not part of it) in
    ``encoder_module_names``, so that fine-tuning can freeze it (:meth:`encoder_parameters`).
    """

    spatial_dims: ClassVar[int] = 2
    encoder_module_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ModelConfig, size_divisor: int | tuple[int, ...]) -> None:
        super().__init__()
        if config.in_channels < 1 or config.num_classes < 1:
            raise ValueError(
                f"in_channels and num_classes must be >= 1, got {config.in_channels} and {config.num_classes}"
            )
        self.config = config
        divisor = (size_divisor,) * self.spatial_dims if isinstance(size_divisor, int) else tuple(size_divisor)
        self.size_divisor = divisor
        self.model_name = type(self).__name__

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error for an input the model cannot take.

        Raises:
            TypeError: ``x`` is not a floating-point tensor.
            ValueError: Wrong number of dimensions, wrong channel count, or NaN/inf values.
        """
        name = self.model_name
        layout = "(batch, channels, H, W)" if self.spatial_dims == 2 else "(batch, channels, D, H, W)"
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"{name}: input must be a floating-point torch.Tensor {layout}, got {kind}")
        if x.dim() != self.spatial_dims + 2:
            hint = (
                " For a 2D image add the batch and channel axes: x[None, None]." if x.dim() == self.spatial_dims else ""
            )
            raise ValueError(
                f"{name} is a {self.spatial_dims}D model and expects input {layout}, got {x.dim()} dimensions "
                f"{tuple(x.shape)}.{hint}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{name} expects {self.in_channels} input channel(s) (in_channels={self.in_channels}), got "
                f"{x.shape[1]} in input of shape {tuple(x.shape)}; stack the right sequences/phases or build the "
                f"model with in_channels={x.shape[1]}."
            )
        if min(x.shape[2:]) < 1:
            raise ValueError(f"{name}: empty spatial axis in input of shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError(
                f"{name}: input contains NaN or inf values; fill or mask them (e.g. torch.nan_to_num) first."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for ``x``.

        Args:
            x: ``(batch, in_channels, *spatial)`` float tensor, any spatial size.

        Returns:
            ``(batch, num_classes, *spatial)`` logits.
        """
        self.check_input(x)
        spatial = x.shape[2:]
        padded = [math.ceil(s / d) * d for s, d in zip(spatial, self.size_divisor, strict=True)]
        if padded == list(self.size_divisor):
            # the deepest feature map would be a single pixel/voxel, which instance norm cannot normalise
            padded[-1] += self.size_divisor[-1]
        if list(spatial) != padded:
            pad = []
            for s, p in zip(reversed(spatial), reversed(padded), strict=True):
                pad += [0, p - s]
            x = F.pad(x, pad)
        logits = self.forward_features(x)
        if list(spatial) != padded:
            logits = logits[(..., *(slice(0, s) for s in spatial))]
        return logits

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an input whose spatial sizes are multiples of ``size_divisor``."""
        raise NotImplementedError

    def encoder_modules(self) -> list[nn.Module]:
        """The sub-modules that make up the encoder (``encoder_module_names``), input side first.

        Raises:
            NotImplementedError: The architecture does not name its encoder.
        """
        if not self.encoder_module_names:
            raise NotImplementedError(
                f"{self.model_name} does not name its encoder (its encoder_module_names is empty), so its encoder "
                "cannot be frozen; fine-tune the whole model instead"
            )
        return [getattr(self, name) for name in self.encoder_module_names]

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The encoder's parameters (those of :meth:`encoder_modules`); the rest of the model is the decoder side.

        Raises:
            NotImplementedError: The architecture does not name its encoder.
        """
        return [parameter for module in self.encoder_modules() for parameter in module.parameters()]


def set_scan_backend(model: nn.Module, backend: str) -> nn.Module:
    """Make every selective-scan layer of ``model`` use ``backend`` ("auto", "reference", "cpu", ...).

    Layers that scan carry a ``scan_backend`` attribute; this sets it on all of them.

    Returns:
        ``model``, for chaining.
    """
    from napari_mamba_seg.kernels.dispatch import BACKENDS

    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"Unknown scan backend {backend!r}; choose 'auto' or one of {sorted(BACKENDS)}")
    for module in model.modules():
        if hasattr(module, "scan_backend"):
            module.scan_backend = backend
    return model
