"""Exponential moving average (EMA) of a model's weights during training.

After every optimizer step ``t`` (1-based) the average moves towards the weights::

    ema = d_t * ema + (1 - d_t) * weights,     d_t = min(decay, (1 + t) / (10 + t))

The warm-up ``(1 + t) / (10 + t)`` (TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``) lets the early
average follow the fast-changing weights instead of remembering the random initialisation for thousands of steps.
Buffers (BatchNorm statistics) are not averaged: the average takes the model's current ones.

Used by :class:`napari_mamba_seg.training.Trainer` when ``TrainingConfig.ema_decay`` is set.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ema_decay_at", "make_ema_model", "update_ema"]


def ema_decay_at(decay: float, step: int) -> float:
    """The decay of the update after optimizer step ``step`` (1-based): ``min(decay, (1 + step) / (10 + step))``."""
    return min(decay, (1.0 + step) / (10.0 + step))


def make_ema_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` to hold the average: same weights and device, eval mode, no gradients."""
    average = copy.deepcopy(model).eval()
    for parameter in average.parameters():
        parameter.requires_grad_(False)
    return average


@torch.no_grad()
def update_ema(average: nn.Module, model: nn.Module, decay: float) -> None:
    """``average = decay * average + (1 - decay) * model`` for every parameter; buffers are copied from ``model``.

    Args:
        average: The averaged copy (:func:`make_ema_model`); updated in place.
        model: The model being trained (same architecture).
        decay: The decay of this update, in [0, 1].
    """
    averaged = list(average.parameters())
    trained = [p.detach() for p in model.parameters()]
    if len(averaged) != len(trained):
        raise ValueError(f"the average has {len(averaged)} parameters and the model {len(trained)}: not a copy of it")
    floats = [(a, p) for a, p in zip(averaged, trained, strict=True) if a.is_floating_point()]
    if floats:
        torch._foreach_lerp_([a for a, _ in floats], [p.to(a.dtype) for a, p in floats], 1.0 - decay)
    for a, p in zip(averaged, trained, strict=True):
        if not a.is_floating_point():
            a.copy_(p)
    for a, b in zip(average.buffers(), model.buffers(), strict=True):
        a.copy_(b)
