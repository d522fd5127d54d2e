"""Building blocks shared by the architectures: the Mamba mixer, SS2D and the VSS block."""

from napari_mamba_seg.models.layers.mamba import Mamba
from napari_mamba_seg.models.layers.ss2d import SS2D, DropPath, VSSBlock, cross_merge, cross_scan

__all__ = ["SS2D", "DropPath", "Mamba", "VSSBlock", "cross_merge", "cross_scan"]
