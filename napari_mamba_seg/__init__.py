"""napari-mamba-seg: Mamba (selective state-space) segmentation networks in napari.

Importing this package is cheap: it does not import torch, numba, napari or Qt. The public
API below is resolved lazily (PEP 562) on first attribute access, so
``napari_mamba_seg.selective_scan`` imports the selective-scan engine (and torch) only then.

Example:
    >>> import napari_mamba_seg
    >>> napari_mamba_seg.__version__
    '0.1.0.dev0'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

# public name -> module that defines it (imported on first access)
_LAZY_API: dict[str, str] = {
    "selective_scan": "napari_mamba_seg.kernels",
    "available_backends": "napari_mamba_seg.kernels",
    "create_model": "napari_mamba_seg.models",
    "list_models": "napari_mamba_seg.models",
    "save_bundle": "napari_mamba_seg.bundles",
    "load_bundle": "napari_mamba_seg.bundles",
    "list_bundled": "napari_mamba_seg.bundles",
}

__all__ = [  # = __version__ + _LAZY_API
    "__version__",
    "available_backends",
    "create_model",
    "list_bundled",
    "list_models",
    "load_bundle",
    "save_bundle",
    "selective_scan",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from napari_mamba_seg.bundles import list_bundled, load_bundle, save_bundle
    from napari_mamba_seg.kernels import available_backends, selective_scan
    from napari_mamba_seg.models import create_model, list_models


def __getattr__(name: str) -> Any:
    """Resolve a public name lazily: import its module, cache the attribute here."""
    module_name = _LAZY_API.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_API})
