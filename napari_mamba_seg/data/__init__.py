"""Synthetic breast DCE-MRI phantoms: labelled sample data that needs no download.

Imports numpy and scipy only (never torch, napari or Qt), so napari can open the sample data cheaply.

Example:
    >>> from napari_mamba_seg.data import LABELS, make_phantom
    >>> phantom = make_phantom(shape=(16, 96, 96), spacing=(3.0, 1.8, 1.8), density="c", seed=2)
    >>> sorted(LABELS.values())
    ['background', 'breast', 'fibroglandular', 'lesion', 'muscle']
"""

from __future__ import annotations

from napari_mamba_seg.data.phantom import LABELS, Phantom, PhantomConfig, default_phase_times, make_phantom

__all__ = ["LABELS", "Phantom", "PhantomConfig", "default_phase_times", "make_phantom"]
