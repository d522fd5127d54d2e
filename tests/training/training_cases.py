"""Synthetic training cases for the training tests: small volumes whose intensity encodes the label."""

from __future__ import annotations

import numpy as np

from napari_mamba_seg.training import TrainingCase, TrainingConfig


def synthetic_case(
    name: str = "case",
    *,
    shape: tuple[int, ...] = (6, 40, 40),
    spacing: tuple[float, ...] | None = (3.0, 1.0, 1.0),
    channels: int = 1,
    seed: int = 0,
    noise: float = 0.3,
    trusted: np.ndarray | None = None,
) -> TrainingCase:
    """A case with a box of class 1 holding a smaller box of class 2; the image is ``10 * label + 50`` plus noise.

    The offset and scale make normalisation matter (z-score of this image differs from the raw values).
    """
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    inner = tuple(slice(s // 4, s // 4 + max(1, s // 2)) for s in shape)
    core = tuple(slice(s // 4 + max(1, s // 8), s // 4 + max(2, s // 4)) for s in shape)
    labels[inner] = 1
    labels[core] = 2
    image = 10.0 * labels[None] + 50.0 + rng.normal(0, noise * 10, (channels, *shape))
    return TrainingCase(image.astype(np.float32), labels, trusted, spacing, name)


def cpu_config(**changes) -> TrainingConfig:
    """A tiny CPU config: 32² patches, batch 2, no augmentation, no validation or checkpoints unless asked."""
    from napari_mamba_seg.training import AugmentationConfig

    values = {
        "steps": 4,
        "batch_size": 2,
        "patch_size": (32, 32),
        "device": "cpu",
        "val_every": 0,
        "checkpoint_every": 0,
        "augmentation": AugmentationConfig.none(),
        "seed": 0,
    }
    values.update(changes)
    return TrainingConfig(**values)
