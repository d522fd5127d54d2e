"""The Dice + cross-entropy loss: exact values, and untrusted voxels removed from the loss and its gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_mamba_seg.models import create_model
from napari_mamba_seg.training import DiceCELoss


def _batch(seed: int = 0, shape=(2, 3, 8, 8)):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=generator)
    labels = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=generator)
    trusted = torch.rand((shape[0], *shape[2:]), generator=generator) < 0.6
    return logits, labels, trusted


def test_loss_equals_a_direct_computation_on_the_trusted_voxels():
    logits, labels, trusted = _batch()
    loss = DiceCELoss(smooth=0.0)(logits, labels, trusted)
    # independent computation with numpy on the trusted voxels only
    p = torch.softmax(logits, 1).numpy()
    y, keep = labels.numpy(), trusted.numpy()
    ce = -np.log(np.take_along_axis(p, y[:, None], 1)[:, 0])[keep].mean()
    dice = []
    for b in range(2):
        for k in (1, 2):
            pk, gk = p[b, k][keep[b]], (y[b] == k)[keep[b]]
            dice.append(2 * (pk * gk).sum() / (pk.sum() + gk.sum()))
    assert loss.item() == pytest.approx(ce + 1 - np.mean(dice), rel=1e-5)


def test_untrusted_voxels_get_exactly_zero_logit_gradient():
    logits, labels, trusted = _batch(1)
    for loss_fn in (DiceCELoss(), DiceCELoss(batch_dice=True, include_background=True), DiceCELoss(dice_weight=0)):
        logits_grad = logits.clone().requires_grad_(True)
        loss_fn(logits_grad, labels, trusted).backward()
        gradient = logits_grad.grad.movedim(1, -1)  # (b, H, W, K)
        assert torch.count_nonzero(gradient[~trusted]) == 0
        assert torch.count_nonzero(gradient[trusted]) > 0.9 * gradient[trusted].numel()


def test_labels_at_untrusted_voxels_change_neither_loss_nor_parameter_gradients():
    torch.manual_seed(0)
    model = create_model("test_unet", in_channels=1, num_classes=3)
    image = torch.randn(2, 1, 16, 16)
    _, labels, trusted = _batch(2, (2, 3, 16, 16))
    other = labels.clone()
    other[~trusted] = (labels[~trusted] + 1) % 3
    other[0, 0, 0] = 7 if not trusted[0, 0, 0] else other[0, 0, 0]  # even an invalid class there is ignored
    loss_fn = DiceCELoss()

    def loss_and_gradients(target):
        model.zero_grad()
        loss = loss_fn(model(image), target, trusted)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_a, grads_a = loss_and_gradients(labels)
    loss_b, grads_b = loss_and_gradients(other)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    # and a label change at a trusted voxel does change them (the check above can fail)
    changed = labels.clone()
    changed[trusted] = (labels[trusted] + 1) % 3
    loss_c, grads_c = loss_and_gradients(changed)
    assert not torch.equal(loss_a, loss_c)
    assert not all(torch.equal(a, c) for a, c in zip(grads_a, grads_c, strict=True))


def test_nothing_trusted_gives_zero_loss_and_zero_gradient():
    logits, labels, _ = _batch(3)
    logits.requires_grad_(True)
    loss = DiceCELoss()(logits, labels, torch.zeros_like(labels, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_perfect_prediction_has_low_loss_and_bad_inputs_raise():
    labels = torch.randint(0, 3, (1, 8, 8), generator=torch.Generator().manual_seed(4))
    perfect = F.one_hot(labels, 3).movedim(-1, 1).float() * 30
    assert DiceCELoss()(perfect, labels).item() < 1e-4
    with pytest.raises(ValueError, match="lie in"):
        DiceCELoss()(perfect, labels + 3)
    with pytest.raises(ValueError, match="does not match"):
        DiceCELoss()(perfect, labels[:, :4])
