"""The inference engine: numpy image in, labels (and class probabilities) out, on any device.

No napari or Qt here: the command line, the tests and the napari widgets drive the same code. Importing this
package imports torch.

Main entry points:

* :class:`Predictor` (``Predictor.from_bundle(name_or_folder, settings)``, ``plan``, ``check_image``,
  ``predict``, ``iter_predict``) with :class:`PredictionSettings`, :class:`PredictionPlan`,
  :class:`PredictionProgress`, :class:`Prediction` and :class:`PredictionCancelled`;
* :func:`select_device` and :func:`available_devices`;
* the building blocks: :func:`normalize_image`, :func:`resample_to_shape`, :func:`sliding_window_probabilities`,
  :func:`gaussian_importance_map`, :func:`tile_starts`.
"""

from napari_mamba_seg.inference.device import (
    DeviceUnavailableError,
    available_devices,
    resolve_precision,
    select_device,
)
from napari_mamba_seg.inference.memory import activation_bytes_per_voxel, default_memory_budget_mb
from napari_mamba_seg.inference.normalization import NORMALIZATION_METHODS, check_normalization, normalize_image
from napari_mamba_seg.inference.predictor import (
    Prediction,
    PredictionCancelled,
    PredictionPlan,
    PredictionProgress,
    PredictionSettings,
    Predictor,
)
from napari_mamba_seg.inference.resampling import resample_to_shape, resampled_shape
from napari_mamba_seg.inference.sliding_window import (
    gaussian_importance_map,
    sliding_window_probabilities,
    tile_starts,
)

__all__ = [
    "NORMALIZATION_METHODS",
    "DeviceUnavailableError",
    "Prediction",
    "PredictionCancelled",
    "PredictionPlan",
    "PredictionProgress",
    "PredictionSettings",
    "Predictor",
    "activation_bytes_per_voxel",
    "available_devices",
    "check_normalization",
    "default_memory_budget_mb",
    "gaussian_importance_map",
    "normalize_image",
    "resample_to_shape",
    "resampled_shape",
    "resolve_precision",
    "select_device",
    "sliding_window_probabilities",
    "tile_starts",
]
