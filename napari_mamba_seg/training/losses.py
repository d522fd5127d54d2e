"""Dice + cross-entropy loss with a trust mask: untrusted voxels contribute nothing, to the loss or its gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DiceCELoss"]


class DiceCELoss(nn.Module):
    """``ce_weight * CE + dice_weight * (1 - soft Dice)``, both over the trusted voxels only.

    * Cross-entropy: the mean over the trusted voxels of the batch (0 when none is trusted).
    * Soft Dice per class ``k``: ``(2 sum(p_k g_k m) + smooth) / (sum(p_k m) + sum(g_k m) + smooth)`` with ``p`` the
      softmax, ``g`` the one-hot labels and ``m`` the trust mask; averaged over the foreground classes (all classes
      with ``include_background``). With ``batch_dice`` the sums run over the whole batch (nnU-Net's batch Dice),
      else per sample and then averaged.

    The mask multiplies the per-voxel terms before any sum, so an untrusted voxel's logits get a gradient of exactly
    zero, and its label (any value, even out of range) changes nothing.

    Args:
        dice_weight: Weight of the Dice term.
        ce_weight: Weight of the cross-entropy term.
        include_background: Average the Dice over class 0 too.
        batch_dice: One Dice per class over the batch instead of one per sample.
        smooth: Added to the Dice numerator and denominator.
    """

    def __init__(
        self,
        *,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        include_background: bool = False,
        batch_dice: bool = False,
        smooth: float = 1e-5,
    ) -> None:
        super().__init__()
        if dice_weight < 0 or ce_weight < 0 or dice_weight + ce_weight == 0:
            raise ValueError(f"loss weights must be >= 0 and not both 0, got dice {dice_weight}, ce {ce_weight}")
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.include_background = include_background
        self.batch_dice = batch_dice
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor, trusted: torch.Tensor | None = None) -> torch.Tensor:
        """The loss.

        Args:
            logits: ``(batch, K, *spatial)`` (computed in float32).
            target: ``(batch, *spatial)`` integer labels in ``[0, K)`` at the trusted voxels.
            trusted: ``(batch, *spatial)`` bool; None = all trusted.

        Returns:
            A scalar float32 tensor.

        Raises:
            ValueError: Mismatched shapes, or a trusted label outside ``[0, K)``.
        """
        logits = logits.float()
        num_classes = logits.shape[1]
        if tuple(target.shape) != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(
                f"target {tuple(target.shape)} does not match logits {tuple(logits.shape)} (batch, K, ...)"
            )
        if trusted is None:
            trusted = torch.ones_like(target, dtype=torch.bool)
        elif trusted.shape != target.shape or trusted.dtype != torch.bool:
            raise ValueError(f"trusted must be a bool tensor of the target's shape {tuple(target.shape)}")
        target = torch.where(trusted, target.long(), 0)
        if num_classes > 0 and bool(((target < 0) | (target >= num_classes)).any()):
            raise ValueError(f"labels must lie in [0, {num_classes}) at the trusted voxels")
        mask = trusted.to(logits.dtype)
        loss = logits.new_zeros(())
        if self.ce_weight:
            voxel_ce = F.cross_entropy(logits, target, reduction="none")
            loss = loss + self.ce_weight * (voxel_ce * mask).sum() / mask.sum().clamp_min(1.0)
        if self.dice_weight:
            loss = loss + self.dice_weight * (1.0 - self.soft_dice(logits, target, mask).mean())
        return loss

    def soft_dice(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Soft Dice per class (and per sample unless ``batch_dice``): ``(classes,)`` or ``(batch, classes)``."""
        num_classes = logits.shape[1]
        probabilities = torch.softmax(logits, dim=1) * mask[:, None]
        one_hot = F.one_hot(target, num_classes).movedim(-1, 1).to(logits.dtype) * mask[:, None]
        dims = tuple(range(2, logits.dim()))
        if self.batch_dice:
            dims = (0, *dims)
        intersection = (probabilities * one_hot).sum(dims)
        denominator = probabilities.sum(dims) + one_hot.sum(dims)
        dice = (2 * intersection + self.smooth) / (denominator + self.smooth).clamp_min(1e-8)
        if not self.include_background and num_classes > 1:
            dice = dice[..., 1:]
        return dice
