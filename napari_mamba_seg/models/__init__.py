"""Segmentation architectures and their registry.

>>> from napari_mamba_seg.models import create_model, list_models
>>> model = create_model("test_vm_unet", in_channels=1, num_classes=2)

Every module of this package whose name does not start with ``_`` (one per architecture family) is imported
here, which registers its variants; ``layers`` holds the shared building blocks.
"""

from __future__ import annotations

import importlib
import pkgutil

from napari_mamba_seg.models._base import ModelConfig, SegmentationModel, set_scan_backend
from napari_mamba_seg.models._registry import (
    ModelEntry,
    PaperFigures,
    config_from_dict,
    config_to_dict,
    create_model,
    create_seeded_model,
    get_model_entry,
    list_models,
    register_model,
)

__all__ = [
    "ModelConfig",
    "ModelEntry",
    "PaperFigures",
    "SegmentationModel",
    "config_from_dict",
    "config_to_dict",
    "create_model",
    "create_seeded_model",
    "get_model_entry",
    "list_models",
    "register_model",
    "set_scan_backend",
]


def _import_architectures() -> None:
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name != "layers":
            importlib.import_module(f"{__name__}.{info.name}")


_import_architectures()
