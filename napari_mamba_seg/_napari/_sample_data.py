"""npe2 sample data "Breast DCE phantom": a synthetic 3-phase breast DCE-MRI volume and its ground-truth labels.

Generated on the fly (no download) by :func:`napari_mamba_seg.data.make_phantom` with a fixed seed, so every user
sees the same case. Imports numpy and scipy only (never torch).
"""

from __future__ import annotations

from napari_mamba_seg._napari._layer_data import LayerData, image_layer_data, labels_layer_kwargs

__all__ = ["PHANTOM_SEED", "PHANTOM_SHAPE", "make_breast_phantom_sample"]

PHANTOM_SEED = 0
PHANTOM_SHAPE = (60, 256, 256)  # (z, y, x) at 2 × 0.7 × 0.7 mm: about 2 s to generate on one core
GROUND_TRUTH_NAME = "phantom ground truth"


def make_breast_phantom_sample(
    shape: tuple[int, int, int] = PHANTOM_SHAPE, seed: int = PHANTOM_SEED
) -> list[LayerData]:
    """The sample's layers: the DCE phases as Image layers and the ground truth as a Labels layer.

    Args:
        shape: Acquisition grid ``(z, y, x)`` (napari calls this with the default).
        seed: Random seed of the phantom.

    Returns:
        ``[(phase, kwargs, "image")] * phases + [(labels, kwargs, "labels")]``: phases ``(z, y, x)`` float32 named
        ``"breast phantom (pre-contrast)"``, ...; labels ``(z, y, x)`` uint8 with the class names of
        :data:`napari_mamba_seg.data.LABELS`; all with the phantom's spacing and geometry metadata.
    """
    from napari_mamba_seg.data import LABELS, make_phantom

    phantom = make_phantom(shape=shape, seed=seed)
    image = phantom.to_medical_image()
    class_names = [LABELS[value] for value in sorted(LABELS)]
    labels_kwargs = {**labels_layer_kwargs(class_names, like=image), "name": GROUND_TRUTH_NAME}
    layers = image_layer_data(image, channels_as="layers", name="breast phantom")
    return [*layers, (phantom.labels, labels_kwargs, "labels")]
