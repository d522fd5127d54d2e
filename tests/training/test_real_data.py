"""Training on real MR data (IBSI soft-tissue sarcoma, T1, tumour mask) from ../shared/data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from training_cases import cpu_config

from napari_mamba_seg.bundles import ModelCard, load_bundle
from napari_mamba_seg.io import read_image
from napari_mamba_seg.models import create_model
from napari_mamba_seg.training import SegmentationDataset, Trainer, TrainingCase


def _sarcoma_case(shared_data, patient: str) -> TrainingCase:
    folder = shared_data / "ibsi_sarcoma_mr" / patient
    if not (folder / "image.nii.gz").is_file():
        pytest.skip(f"IBSI sarcoma case {patient} not found in {shared_data}")
    return TrainingCase.from_images(read_image(folder / "image.nii.gz"), read_image(folder / "mask.nii.gz"))


def test_a_short_training_on_sarcoma_mr_cases_runs_validates_and_saves(shared_data, tmp_path):
    train = [_sarcoma_case(shared_data, "STS_002"), _sarcoma_case(shared_data, "STS_004")]
    val = _sarcoma_case(shared_data, "STS_002")
    assert train[0].spacing[0] > 3 and train[0].name == "image"  # 3.27 mm slices: the slice axis is axis 0
    card = ModelCard(class_names=["background", "tumour"], modality="MR T1", normalization={"method": "zscore"})

    dataset = SegmentationDataset(train, (32, 32), spatial_dims=2, num_classes=2, foreground_fraction=0.5)
    items = [dataset[i] for i in range(8)]
    assert sum(bool(item["labels"].any()) for item in items) >= 4  # every other patch is centred on the tumour

    torch.manual_seed(0)
    trainer = Trainer(
        create_model("test_unet", in_channels=1, num_classes=2),
        card,
        train,
        [val],
        cpu_config(steps=3, val_every=3, lr=3e-3, patch_size=(64, 64), validation_overlap=0.25),
        tmp_path / "run",
    )
    losses = []
    result = trainer.train(progress=lambda p: losses.append(p.loss) if p.stage == "train" else None)
    assert len(losses) == 3 and np.isfinite(losses).all()
    assert 0 <= result.best_metrics["dice_tumour"] <= 1
    bundle = load_bundle(result.best_bundle)
    assert bundle.card.modality == "MR T1" and bundle.card.metrics["step"] == 3
