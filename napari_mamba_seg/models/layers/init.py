"""Weight initialisation shared by the transformer-style architectures."""

from __future__ import annotations

from torch import nn

__all__ = ["init_transformer_weights"]


def init_transformer_weights(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) linear weights, zero biases, unit LayerNorms (Swin / VMamba / MLLA style).

    Use as ``model.apply(init_transformer_weights)``.
    """
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
