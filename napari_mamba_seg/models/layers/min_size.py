"""Inputs as small as a network's size divisor: instance norm needs more than one voxel in the deepest feature map."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["with_deepest_map_of_two"]


def with_deepest_map_of_two(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, divisor: tuple[int, ...]
) -> torch.Tensor:
    """``forward(x)``, except when the deepest map of ``x`` would be a single voxel.

    Instance norm cannot normalise one voxel, so such an ``x`` (every spatial size equal to the divisor) is
    zero-padded by one more divisor along the last axis and the logits are cropped back.

    Args:
        forward: Maps ``(b, c, *S)`` to logits ``(b, k, *S)``.
        x: ``(b, c, *S)``, each size a multiple of ``divisor``.
        divisor: The network's down-sampling factor per spatial axis.

    Returns:
        ``(b, k, *S)`` logits.
    """
    width = x.shape[-1]
    if any(s != d for s, d in zip(x.shape[2:], divisor, strict=True)):
        return forward(x)
    return forward(F.pad(x, (0, divisor[-1])))[..., :width]
