"""Training tests run torch on one thread: on 2 shared, busy cores, two OpenMP threads make every small op wait for a
descheduled thread (test_unet steps took 1.4 s instead of 0.04 s under load); results do not depend on it. The
``parent`` fixture is the tiny bundle the fine-tuning tests start from."""

from __future__ import annotations

import pytest
import torch

from napari_mamba_seg.bundles import ModelCard, save_bundle
from napari_mamba_seg.models import create_model


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def parent(tmp_path):
    """A seeded 1-channel, 2-class ``test_unet`` bundle at ``tmp_path/models/tiny`` with 32×32 patches."""
    torch.manual_seed(0)
    folder = tmp_path / "models" / "tiny"
    card = ModelCard(class_names=["background", "lesion"], channel_names=["T1"], patch_size=[32, 32])
    save_bundle(create_model("test_unet", in_channels=1, num_classes=2), folder, card)
    return folder
