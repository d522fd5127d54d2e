"""Dice + cross-entropy loss with a trust mask: untrusted voxels contribute nothing, to the loss or its gradient."""

from __future__ import annotations

from collections.abc import Callable

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

    Optional per-voxel weights ``w`` (e.g. up-weighting the voxels a clinician corrected) multiply the mask: the
    cross-entropy becomes the ``w``-weighted mean over the trusted voxels, and every Dice sum counts a voxel ``w``
    times (``sum(p_k g_k w m)``, ``sum(p_k w m)``, ``sum(g_k w m)``), so a voxel of weight ``w`` gets ``w`` times
    the gradient of an otherwise identical voxel of weight 1. Without weights the loss is exactly the unweighted one.

    Args:
        dice_weight: Weight of the Dice term.
        ce_weight: Weight of the cross-entropy term.
        include_background: Average the Dice over class 0 too.
        batch_dice: One Dice per class over the batch instead of one per sample.
        smooth: Added to the Dice numerator and denominator.
        sum_across_processes: Data-parallel training: a function returning a tensor summed over every process
            (:func:`napari_mamba_seg.training.distributed.global_sum`). The cross-entropy's sums, the batch Dice's
            sums and the per-sample Dice values' sum and count then run over the global batch, so every process
            gets the loss of the whole global batch. None = this process's batch is the whole batch.

    Data-parallel training: a batch-wide sum (the cross-entropy's mean over the trusted voxels, ``batch_dice``)
    does not decompose over the processes (a mean of the per-process means is not the mean, when the processes
    hold different numbers of trusted voxels); summing the numerators and denominators over the processes first
    gives exactly the single-process loss of the global batch. The per-sample Dice does decompose (equal shares),
    and is summed the same way for uniformity.
    """

    def __init__(
        self,
        *,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        include_background: bool = False,
        batch_dice: bool = False,
        smooth: float = 1e-5,
        sum_across_processes: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if dice_weight < 0 or ce_weight < 0 or dice_weight + ce_weight == 0:
            raise ValueError(f"loss weights must be >= 0 and not both 0, got dice {dice_weight}, ce {ce_weight}")
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.include_background = include_background
        self.batch_dice = batch_dice
        self.smooth = smooth
        self.sum_across_processes = sum_across_processes

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        trusted: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss.

        Args:
            logits: ``(batch, K, *spatial)`` (computed in float32).
            target: ``(batch, *spatial)`` integer labels in ``[0, K)`` at the trusted voxels.
            trusted: ``(batch, *spatial)`` bool; None = all trusted.
            weight: ``(batch, *spatial)`` finite weights >= 0 of the trusted voxels; None = all 1.

        Returns:
            A scalar float32 tensor.

        Raises:
            ValueError: Mismatched shapes, a trusted label outside ``[0, K)``, or negative or non-finite weights.
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
        if weight is not None:
            mask = mask * _checked_weight(weight, target).to(logits.dtype)
        loss = logits.new_zeros(())
        if self.ce_weight:
            voxel_ce = F.cross_entropy(logits, target, reduction="none")
            total_ce, total_weight = self._global((voxel_ce * mask).sum()), self._global(mask.sum())
            loss = loss + self.ce_weight * total_ce / total_weight.clamp_min(1e-6)
        if self.dice_weight:
            loss = loss + self.dice_weight * (1.0 - self._mean_dice(self.soft_dice(logits, target, mask)))
        return loss

    def soft_dice(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Soft Dice per class (and per sample unless ``batch_dice``): ``(classes,)`` or ``(batch, classes)``.

        ``mask`` ``(batch, *spatial)``: the trust mask, times the voxel weights when there are any.
        """
        num_classes = logits.shape[1]
        probabilities = torch.softmax(logits, dim=1)
        one_hot = F.one_hot(target, num_classes).movedim(-1, 1).to(logits.dtype)
        dims = tuple(range(2, logits.dim()))
        if self.batch_dice:
            dims = (0, *dims)
        intersection = (probabilities * one_hot * mask[:, None]).sum(dims)
        denominator = (probabilities * mask[:, None]).sum(dims) + (one_hot * mask[:, None]).sum(dims)
        if self.batch_dice:  # data-parallel: the sums over the global batch
            intersection, denominator = self._global(intersection), self._global(denominator)
        dice = (2 * intersection + self.smooth) / (denominator + self.smooth).clamp_min(1e-8)
        if not self.include_background and num_classes > 1:
            dice = dice[..., 1:]
        return dice

    def _global(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the data-parallel processes (itself in a single process)."""
        return tensor if self.sum_across_processes is None else self.sum_across_processes(tensor)

    def _mean_dice(self, dice: torch.Tensor) -> torch.Tensor:
        """The mean of :meth:`soft_dice`'s values; per-sample values are averaged over the global batch."""
        if self.sum_across_processes is None or self.batch_dice:  # batch Dice: already global
            return dice.mean()
        count = torch.tensor(float(dice.numel()), dtype=dice.dtype, device=dice.device)
        return self._global(dice.sum()) / self._global(count)


def _checked_weight(weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``weight`` if it is a finite, non-negative ``(batch, *spatial)`` tensor like ``target``, else ValueError."""
    if tuple(weight.shape) != tuple(target.shape) or not weight.is_floating_point():
        raise ValueError(
            f"weight must be a floating-point tensor of the target's shape {tuple(target.shape)}, got "
            f"{weight.dtype} {tuple(weight.shape)}"
        )
    if not bool((torch.isfinite(weight) & (weight >= 0)).all()):
        raise ValueError("voxel weights must be finite and >= 0")
    return weight
