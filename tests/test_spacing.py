"""Every part that takes a voxel spacing refuses the same bad ones, with a message naming the value and the fix.

A NaN compares false with everything, so a bare ``min(spacing) <= 0`` let it through: a model card and HD95 took a
NaN spacing before they shared :func:`checked_spacing`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_mamba_seg._spacing import checked_spacing
from napari_mamba_seg.bundles import ModelCard
from napari_mamba_seg.data import PhantomConfig
from napari_mamba_seg.interactive import ReviewState, interpolate_slices
from napari_mamba_seg.io import ImageGeometry
from napari_mamba_seg.training import TrainingCase, hd95
from napari_mamba_seg.training.anchor import defer_extent
from napari_mamba_seg.training.finetune import CorrectedStudy

BAD_SPACINGS = {
    "one-value": (1.0,),
    "four-values": (1.0, 1.0, 1.0, 1.0),
    "zero": (1.0, 0.0, 1.0),
    "negative": (1.0, -0.5, 1.0),
    "nan": (1.0, math.nan, 1.0),
    "inf": (math.inf, 1.0, 1.0),
    "string": "111",
    "not-numbers": ("a", "b", "c"),
    "a-number": 2.0,
}


def _labels() -> np.ndarray:
    labels = np.zeros((4, 8, 8), np.uint8)
    labels[0, 2:5, 2:5] = labels[3, 3:6, 3:6] = 1
    return labels


def _study(spacing):
    labels = _labels()
    return CorrectedStudy(labels[None].astype(np.float32), labels, ReviewState(0, labels.shape[0], {0}), spacing)


TAKERS = {
    "checked_spacing": lambda spacing: checked_spacing(spacing, 3),
    "TrainingCase": lambda spacing: (
        TrainingCase(_labels()[None].astype(np.float32), _labels(), spacing=spacing).spacing
    ),
    "CorrectedStudy": lambda spacing: _study(spacing).spacing,
    "defer_extent": lambda spacing: defer_extent(spacing, 0),
    "hd95": lambda spacing: hd95(_labels() == 1, _labels() == 1, spacing),
    "interpolate_slices": lambda spacing: interpolate_slices(_labels(), 0, 0, 3, spacing=spacing),
    "ModelCard": lambda spacing: ModelCard(spacing=spacing).spacing,
    "PhantomConfig": lambda spacing: PhantomConfig(spacing=spacing).spacing,
    "ImageGeometry": lambda spacing: ImageGeometry.from_spacing(spacing).spacing,
}


@pytest.mark.parametrize("taker", TAKERS.values(), ids=TAKERS.keys())
@pytest.mark.parametrize("spacing", BAD_SPACINGS.values(), ids=BAD_SPACINGS.keys())
def test_a_bad_spacing_is_refused_everywhere_with_what_is_expected(taker, spacing) -> None:
    with pytest.raises(ValueError, match=r"spacing must be [23 or]+ positive finite voxel sizes in mm \(.+\), got "):
        taker(spacing)


@pytest.mark.parametrize("taker", TAKERS.values(), ids=TAKERS.keys())
def test_a_good_spacing_is_taken_as_floats(taker) -> None:
    assert taker(np.array([3, 0.5, 0.5])) is not None
    assert checked_spacing(np.array([3, 1]), (2, 3)) == (3.0, 1.0)
    assert all(type(s) is float for s in checked_spacing([np.float32(2.5), 1, np.int64(4)], 3))
