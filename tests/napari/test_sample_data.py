"""The "Breast DCE phantom" sample: three DCE phases and the ground-truth labels, placed in mm, named by class."""

from __future__ import annotations

import numpy as np
import pytest

from napari_mamba_seg._napari._layer_data import METADATA_KEY, geometry_from_layer
from napari_mamba_seg._napari._sample_data import GROUND_TRUTH_NAME, make_breast_phantom_sample
from napari_mamba_seg.data import LABELS

SHAPE = (60, 256, 256)
SPACING = (2.0, 0.7, 0.7)


@pytest.fixture(scope="module")
def sample_layers() -> list[tuple]:
    return make_breast_phantom_sample()


def test_sample_has_three_phases_and_the_ground_truth(sample_layers) -> None:
    assert [layer_type for _, _, layer_type in sample_layers] == ["image", "image", "image", "labels"]
    names = [kwargs["name"] for _, kwargs, _ in sample_layers]
    assert names == [
        "breast phantom (pre-contrast)",
        "breast phantom (early post-contrast)",
        "breast phantom (late post-contrast)",
        GROUND_TRUTH_NAME,
    ]
    for data, kwargs, _ in sample_layers:
        assert data.shape == SHAPE
        np.testing.assert_allclose(kwargs["scale"], SPACING, rtol=1e-12)
        assert kwargs["translate"] == sample_layers[0][1]["translate"]


def test_sample_labels_hold_every_class_and_name_them(sample_layers) -> None:
    import napari

    labels, kwargs, _ = sample_layers[-1]
    assert labels.dtype == np.uint8
    assert np.unique(labels).tolist() == sorted(LABELS)
    layer = napari.layers.Labels(labels, **kwargs)
    assert list(layer.features["class"]) == [LABELS[value] for value in sorted(LABELS)]
    image_geometry = geometry_from_layer(sample_layers[0][1], 3)
    assert geometry_from_layer(layer, 3) == image_geometry
    assert layer.metadata[METADATA_KEY]["spatial_shape"] == list(SHAPE)


def test_sample_phases_show_contrast_enhancement(sample_layers) -> None:
    labels = sample_layers[-1][0]
    lesion = labels == next(value for value, name in LABELS.items() if name == "lesion")
    pre, early, _late = (data for data, _, _ in sample_layers[:3])
    assert early[lesion].mean() > 1.3 * pre[lesion].mean()  # the lesion enhances after contrast
