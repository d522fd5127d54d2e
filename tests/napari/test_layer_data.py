"""The layer conventions shared by the reader, the writers and the widgets: image layer data, geometry from a layer,
Labels layers that show class names in fixed colours. Headless: napari layers need no viewer."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from napari_mamba_seg._napari._layer_data import (
    METADATA_KEY,
    class_colors,
    geometry_from_layer,
    image_layer_data,
    labels_layer_kwargs,
)
from napari_mamba_seg.data import LABELS
from napari_mamba_seg.io import ImageGeometry, MedicalImage

BREAST_CLASSES = [LABELS[value] for value in sorted(LABELS)]


def _oblique_image(channels: int = 3, shape=(5, 7, 9)) -> MedicalImage:
    direction = Rotation.from_euler("zyx", [30.0, 10.0, -15.0], degrees=True).as_matrix()
    geometry = ImageGeometry.from_spacing((2.0, 0.7, 0.6), origin=(-40.0, 12.5, 88.0), direction=direction)
    rng = np.random.default_rng(0)
    array = rng.random((channels, *shape), dtype=np.float32) * 100 + np.arange(channels)[:, None, None, None] * 50
    names = ["pre", "early", "late"][:channels] if channels <= 3 else []
    return MedicalImage(array, geometry, channel_names=names, format="array")


def test_image_layer_data_gives_one_view_per_phase_with_the_geometry() -> None:
    image = _oblique_image()
    layers = image_layer_data(image, name="case 7")
    assert [kwargs["name"] for _, kwargs, _ in layers] == ["case 7 (pre)", "case 7 (early)", "case 7 (late)"]
    scale, translate = image.geometry.napari_scale_translate()
    np.testing.assert_allclose(scale, (2.0, 0.7, 0.6), rtol=1e-12)
    for index, (data, kwargs, layer_type) in enumerate(layers):
        assert layer_type == "image"
        assert np.shares_memory(data, image.array) and data.shape == (5, 7, 9)
        np.testing.assert_array_equal(data, image.array[index])
        assert kwargs["scale"] == scale and kwargs["translate"] == translate
        assert kwargs["colormap"] == "gray" and kwargs["rgb"] is False
        entry = kwargs["metadata"][METADATA_KEY]
        assert entry["channel_index"] == index and entry["channel_names"] == ["pre", "early", "late"]
        assert ImageGeometry(entry["affine"]) == image.geometry
        json.dumps(kwargs["metadata"])  # plain values only: napari can copy and save them
    low, high = layers[0][1]["contrast_limits"]
    assert image.array.min() <= low < high <= image.array.max()
    assert high > image.array[0].max()  # one window over all phases: the brighter late phase is not clipped to pre


def test_image_layer_data_with_a_channel_axis_and_for_a_single_channel() -> None:
    image = _oblique_image()
    [(data, kwargs, _)] = image_layer_data(image, channels_as="axis")
    assert data is image.array
    assert kwargs["name"] == "image"
    scale, translate = image.geometry.napari_scale_translate()
    assert kwargs["scale"] == (1.0, *scale) and kwargs["translate"] == (0.0, *translate)
    assert kwargs["metadata"][METADATA_KEY]["channel_index"] is None
    single = _oblique_image(channels=1)
    for channels_as in ("layers", "axis"):
        [(data, kwargs, _)] = image_layer_data(single, channels_as=channels_as)
        assert data.shape == (5, 7, 9) and kwargs["scale"] == scale
    with pytest.raises(ValueError, match="channels_as must be one of"):
        image_layer_data(image, channels_as="stack")


def test_geometry_comes_back_from_any_form_of_the_layer() -> None:
    import napari

    image = _oblique_image()
    [(_, axis_kwargs, _)] = image_layer_data(image, channels_as="axis")
    layer = napari.layers.Image(image.array, **axis_kwargs)
    for form in (layer, axis_kwargs, layer.metadata, layer.metadata[METADATA_KEY], layer.as_layer_data_tuple()[1]):
        assert geometry_from_layer(form, 3) == image.geometry  # the rotation is kept, not just scale/translate
    with pytest.raises(ValueError, match="describes a 3D image"):
        geometry_from_layer(layer, 2)


def test_geometry_from_a_layer_that_no_longer_matches_its_metadata_is_refused() -> None:
    import napari

    image = _oblique_image()
    [(data, kwargs, _), *_] = image_layer_data(image)
    rescaled = napari.layers.Image(data, **{**kwargs, "scale": (2.0, 1.0, 1.0)})
    with pytest.raises(ValueError, match="moved or rescaled"):
        geometry_from_layer(rescaled, 3)
    rotated = napari.layers.Image(data, **{**kwargs, "rotate": 30})
    with pytest.raises(ValueError, match="rotate"):
        geometry_from_layer(rotated, 3)
    cropped = napari.layers.Image(data[:, :5], **kwargs)
    with pytest.raises(ValueError, match=r"spatial shape \(5, 5, 9\)"):
        geometry_from_layer(cropped, 3)


def test_geometry_from_scale_and_translate_only_warns_and_keeps_flips() -> None:
    import napari

    layer = napari.layers.Labels(np.zeros((3, 4, 5), np.uint8), scale=(3.0, -0.5, 0.5), translate=(1.0, 2.0, 3.0))
    with pytest.warns(UserWarning, match="orientation"):
        geometry = geometry_from_layer(layer, 3)
    assert geometry.spacing == (3.0, 0.5, 0.5) and geometry.origin == (1.0, 2.0, 3.0)
    np.testing.assert_array_equal(geometry.direction, np.diag([1.0, -1.0, 1.0]))
    layer.rotate = 20
    with warnings.catch_warnings(), pytest.raises(ValueError, match="rotate"):
        warnings.simplefilter("ignore")
        geometry_from_layer(layer, 3)
    with pytest.raises(ValueError, match="No geometry"):
        geometry_from_layer({"some": "metadata"}, 3)


def test_labels_layer_shows_class_names_in_fixed_distinct_colours() -> None:
    import napari

    labels = np.zeros((6, 8), np.uint8)
    labels[2, 3], labels[4, 5] = 3, 7  # a lesion, and a value with no class
    layer = napari.layers.Labels(labels, **labels_layer_kwargs(BREAST_CLASSES))
    rgba = layer.colormap.map(np.arange(len(BREAST_CLASSES)))
    assert rgba[0, 3] == 0.0  # background transparent
    assert np.all(rgba[1:, 3] == 1.0)
    foreground = rgba[1:, :3]
    distances = np.linalg.norm(foreground[:, None] - foreground[None], axis=-1)
    assert distances[np.triu_indices(len(foreground), 1)].min() > 0.3  # clearly different colours
    assert layer.get_status((2, 3))["value"] == "3; class: lesion"
    assert layer.get_status((1, 1))["value"] == "0; class: background"
    assert layer.get_status((4, 5))["value"] == "7; [No Properties]"
    assert layer.metadata[METADATA_KEY]["class_names"] == BREAST_CLASSES
    again = napari.layers.Labels(labels, **labels_layer_kwargs(BREAST_CLASSES))
    np.testing.assert_array_equal(again.colormap.map(np.arange(5)), rgba)  # fixed, not random per layer


def test_class_colours_stay_distinct_for_many_classes() -> None:
    colors = class_colors(40)
    rgb = np.array([colors[label][:3] for label in range(1, 40)])
    assert len({tuple(np.round(c, 3)) for c in rgb}) == 39
    assert colors[0][3] == 0.0 and None in colors


def test_labels_layer_kwargs_place_labels_like_the_image() -> None:
    import napari

    image = _oblique_image()
    [(_, axis_kwargs, _)] = image_layer_data(image, channels_as="axis")
    for like in (image, axis_kwargs, napari.layers.Image(image.array, **axis_kwargs)):
        kwargs = labels_layer_kwargs(BREAST_CLASSES, like=like)
        assert (kwargs["scale"], kwargs["translate"]) == image.geometry.napari_scale_translate()
        layer = napari.layers.Labels(np.zeros(image.spatial_shape, np.uint8), **kwargs)
        assert geometry_from_layer(layer, 3) == image.geometry
        assert layer.metadata[METADATA_KEY]["channel_index"] is None
    plain = napari.layers.Image(np.zeros((2, 3, 4, 5), np.float32), scale=(1, 2, 3, 4), translate=(0, 5, 6, 7))
    kwargs = labels_layer_kwargs(["background", "tumour"], like=plain)
    assert kwargs["scale"] == (2.0, 3.0, 4.0) and kwargs["translate"] == (5.0, 6.0, 7.0)
    assert set(kwargs["metadata"][METADATA_KEY]) == {"class_names"}  # no invented geometry
    with pytest.raises(ValueError, match="distinct non-empty names"):
        labels_layer_kwargs(["background", "lesion", "lesion"])
