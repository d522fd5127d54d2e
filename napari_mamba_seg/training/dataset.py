"""Random training patches from cases: normalised as inference does, foreground oversampled, seeded per sample.

:class:`SegmentationDataset` is a map-style torch data set indexed by a *global sample index*: sample ``i`` is a
pure function of ``(seed, i)``, so a batch is the same whichever process, worker or resumed run draws it. The
trainer draws samples ``step * batch_size ... step * batch_size + batch_size - 1`` for each global step.

Sampling of sample ``i``:

1. the case: uniformly at random;
2. the centre: for a share ``foreground_fraction`` of the samples (every third one for 1/3: sample ``i`` is a
   foreground sample when ``floor((i + 1) f) > floor(i f)``), a random trusted voxel of a random foreground class
   present in the case; otherwise a random trusted voxel (any voxel when the whole case is trusted);
3. the patch: ``patch_size`` around the centre, shifted to lie inside the image; an image smaller than the patch
   is padded (image 0, label 0, trusted False). A 2D model gets the slice through the centre along the slice
   axis (``"auto"`` = the axis with the coarsest spacing, as the predictor slices);
4. the augmentation (:class:`~napari_mamba_seg.training.augmentation.Augmenter`), seeded from the same sample seed.

Optional per-voxel loss weights (``voxel_weights``, one array per case) are cut, sliced, resampled (nearest) and
augmented exactly like the labels: the augmenter moves ``labels * n + i`` (``i`` the index of the voxel's weight
among the ``n`` distinct weights of the patch), which flips, rotates and zooms with nearest neighbours exactly, and
the weights are read back from it; the image, labels and trust mask come out as without weights.

Each case is normalised once, channel by channel, with the inference code and the card's ``normalization`` dict
(:func:`napari_mamba_seg.inference.normalize_image`), and, when a target spacing is given (cards with
``resample=True``), resampled to it like the predictor does (linear image, nearest labels; in-plane only for 2D
models).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from napari_mamba_seg.inference.normalization import check_normalization, normalize_image
from napari_mamba_seg.inference.predictor import slice_axis_for
from napari_mamba_seg.inference.resampling import resample_to_shape, resampled_shape
from napari_mamba_seg.training.augmentation import Augmenter
from napari_mamba_seg.training.cases import NnUNetRawDataset, TrainingCase

__all__ = ["PreparedCase", "SegmentationDataset", "is_foreground_sample", "slice_axis_for"]

MAX_FOREGROUND_VOXELS = 10_000
"""Per class and case, at most this many foreground voxel positions are kept to draw centres from (nnU-Net too)."""
MAX_TRUSTED_VOXELS = 100_000
"""At most this many trusted voxel positions are kept per partially trusted case to draw centres from."""


def is_foreground_sample(index: int, fraction: float) -> bool:
    """Whether global sample ``index`` is centred on foreground: exactly ``fraction`` of any run of samples.

    Sample ``i`` is a foreground sample when ``floor((i + 1) * fraction) > floor(i * fraction)``, so any ``n``
    consecutive samples hold ``floor(n * fraction)`` or one more foreground samples.
    """
    return math.floor((index + 1) * fraction + 1e-9) > math.floor(index * fraction + 1e-9)


@dataclass
class PreparedCase:
    """A case ready for sampling: normalised (and resampled) image, labels, trust and centre candidates.

    Attributes:
        image: ``(C, *spatial)`` float32, normalised.
        labels: ``(*spatial)`` integer labels.
        trusted: ``(*spatial)`` bool, or None when every voxel is trusted.
        slice_axis: The slice axis for a 2D model on a volume, else None.
        foreground: Class -> flat indices of (up to :data:`MAX_FOREGROUND_VOXELS`) trusted voxels of that class,
            for the foreground classes present.
        trusted_voxels: Flat indices of (up to :data:`MAX_TRUSTED_VOXELS`) trusted voxels, or None when every
            voxel is trusted.
        name: The case name.
        weight: ``(*spatial)`` float32 loss weight of each voxel, or None (no weights: all 1).
    """

    image: np.ndarray
    labels: np.ndarray
    trusted: np.ndarray | None
    slice_axis: int | None
    foreground: dict[int, np.ndarray]
    trusted_voxels: np.ndarray | None
    name: str
    weight: np.ndarray | None = None

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[1:])


class SegmentationDataset(Dataset):
    """Random patches of training cases; ``dataset[i]`` is global sample ``i`` (deterministic in ``seed`` and ``i``).

    Args:
        cases: The cases: a list (prepared, i.e. normalised, once up front) or a lazy sequence such as
            :class:`~napari_mamba_seg.training.cases.NnUNetRawDataset` (read and prepared when drawn, the last
            ``cache_size`` prepared cases kept).
        patch_size: Patch size in voxels: 2 sizes for a 2D model (in-plane, array order), 3 for a 3D model.
        spatial_dims: The model's spatial dimensions, 2 or 3.
        in_channels: The model's input channels (checked against every case), or None.
        num_classes: The model's classes (labels must lie in ``[0, num_classes)``), or None.
        normalization: The card's ``normalization`` dict (``{}`` = z-score).
        foreground_fraction: Share of the samples centred on a foreground voxel, in [0, 1].
        slice_axis: Slice axis for 2D models on volumes: ``"auto"`` (coarsest spacing) or 0, 1, 2.
        target_spacing: Resample every case to this spacing (mm; 2 in-plane values for a 2D model, 3 for a 3D
            model), as the predictor does for a card with ``resample=True``; None = no resampling.
        augmenter: Applied to every patch; None = no augmentation.
        seed: The seed of every random choice.
        cache_size: For a lazy ``cases`` sequence, how many prepared cases to keep; None = all.
        voxel_weights: One ``(*spatial)`` array of finite loss weights >= 0 per case (None for a case = all 1), on
            the case's grid; None = no weights.

    Each item is a dict: ``"image"`` ``(C, *patch)`` float32, ``"labels"`` ``(*patch)`` int64, ``"trusted"``
    ``(*patch)`` bool, ``"case"`` (int index into ``cases``), ``"foreground"`` (bool: a foreground-centred sample),
    and with ``voxel_weights`` ``"weight"`` ``(*patch)`` float32 (0 where untrusted).

    Raises:
        ValueError: Bad arguments, or a case that does not fit the model (the message names it).
    """

    def __init__(
        self,
        cases: Sequence[TrainingCase],
        patch_size: Sequence[int],
        *,
        spatial_dims: int,
        in_channels: int | None = None,
        num_classes: int | None = None,
        normalization: Mapping[str, Any] | None = None,
        foreground_fraction: float = 1 / 3,
        slice_axis: int | str = "auto",
        target_spacing: Sequence[float] | None = None,
        augmenter: Augmenter | None = None,
        seed: int = 0,
        cache_size: int | None = None,
        voxel_weights: Sequence[np.ndarray | None] | None = None,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != spatial_dims or min(self.patch_size) < 1:
            raise ValueError(
                f"patch_size must be {spatial_dims} positive sizes for a {spatial_dims}D model, got {patch_size}"
            )
        if not 0 <= foreground_fraction <= 1:
            raise ValueError(f"foreground_fraction must lie in [0, 1], got {foreground_fraction}")
        if len(cases) == 0:
            raise ValueError("no training cases: give at least one TrainingCase")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if voxel_weights is not None and len(voxel_weights) != len(cases):
            raise ValueError(f"{len(voxel_weights)} voxel_weights for {len(cases)} cases: give one per case (or None)")
        self.voxel_weights = voxel_weights
        self.cases = cases
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.normalization = check_normalization(normalization)
        self.foreground_fraction = float(foreground_fraction)
        self.slice_axis = slice_axis
        slice_axis_for(None, slice_axis)  # validates
        self.target_spacing = None if target_spacing is None else tuple(float(s) for s in target_spacing)
        if self.target_spacing is not None and len(self.target_spacing) != spatial_dims:
            raise ValueError(f"target_spacing must have {spatial_dims} values for a {spatial_dims}D model")
        self.augmenter = augmenter
        self.seed = int(seed)
        self.cache_size = cache_size
        self._cache: collections.OrderedDict[int, PreparedCase] = collections.OrderedDict()
        self._lazy = isinstance(cases, NnUNetRawDataset) or not isinstance(cases, list | tuple)
        if not self._lazy:
            for index in range(len(cases)):
                self._cache[index] = self.prepare(cases[index], self._weight_of(index))

    @property
    def num_cases(self) -> int:
        """Number of cases."""
        return len(self.cases)

    def prepared_case(self, index: int) -> PreparedCase:
        """Case ``index`` normalised and ready for sampling (read and prepared now for a lazy sequence)."""
        prepared = self._cache.get(index)
        if prepared is not None:
            self._cache.move_to_end(index)
            return prepared
        prepared = self.prepare(self.cases[index], self._weight_of(index))
        self._cache[index] = prepared
        if self.cache_size is not None:
            while len(self._cache) > max(1, self.cache_size):
                self._cache.popitem(last=False)
        return prepared

    def _weight_of(self, index: int) -> np.ndarray | None:
        """Case ``index``'s voxel weights: None without ``voxel_weights``, all 1 for a case given None."""
        if self.voxel_weights is None:
            return None
        weight = self.voxel_weights[index]
        return np.ones(self.cases[index].spatial_shape, np.float32) if weight is None else weight

    def prepare(self, case: TrainingCase, weight: np.ndarray | None = None) -> PreparedCase:
        """Check ``case`` (and its ``(*spatial)`` voxel ``weight``, if any) against the model, normalise (and
        resample) it, and find its centre candidates."""
        self._check_case(case)
        weight = None if weight is None else _checked_weight(weight, case)
        spatial = case.spatial_shape
        axis = slice_axis_for(case.spacing, self.slice_axis) if self.spatial_dims == 2 and len(spatial) == 3 else None
        image = normalize_image(case.image, self.normalization)
        labels, trusted = case.labels, case.trusted
        if trusted is not None and trusted.all():
            trusted = None
        if self.target_spacing is not None:
            resampled_image, labels, trusted = self._resample(case, axis, image, labels, trusted)
            if weight is not None and resampled_image.shape != image.shape:
                weight = _nearest(weight, resampled_image.shape[1:])
            image = resampled_image
        rng = np.random.default_rng([self.seed, 0x5EED])  # subsampling of the centre candidates only
        return PreparedCase(
            image=image,
            labels=labels,
            trusted=trusted,
            slice_axis=axis,
            foreground=_foreground_voxels(labels, trusted, rng),
            trusted_voxels=None if trusted is None else _subsample(np.flatnonzero(trusted), MAX_TRUSTED_VOXELS, rng),
            name=case.name,
            weight=weight,
        )

    def _check_case(self, case: TrainingCase) -> None:
        dims = len(case.spatial_shape)
        if self.spatial_dims == 3 and dims != 3:
            raise ValueError(f"case {case.name!r} is 2D (shape {case.image.shape}) but the model is 3D; use a 2D model")
        if self.in_channels is not None and case.num_channels != self.in_channels:
            raise ValueError(
                f"case {case.name!r} has {case.num_channels} channel(s) (image shape {case.image.shape}) but the model "
                f"takes {self.in_channels}; stack the same channels for every case"
            )
        if self.num_classes is not None and case.labels.size:
            labels = case.labels if case.trusted is None else case.labels[case.trusted]
            high = int(labels.max()) if labels.size else 0
            low = int(labels.min()) if labels.size else 0
            if low < 0 or high >= self.num_classes:
                raise ValueError(
                    f"case {case.name!r} has label values in [{low}, {high}] but the model has {self.num_classes} "
                    f"classes (0 to {self.num_classes - 1}); fix the labels or build the model with more classes"
                )
        if self.target_spacing is not None and case.spacing is None:
            raise ValueError(
                f"case {case.name!r} has no spacing, but the model card resamples to {self.target_spacing} mm; "
                "give the case's spacing"
            )

    def _resample(
        self,
        case: TrainingCase,
        axis: int | None,
        image: np.ndarray,
        labels: np.ndarray,
        trusted: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Image (linear), labels and trust (nearest) on the target spacing grid; the slice axis kept."""
        spatial, spacing = case.spatial_shape, case.spacing
        in_model = [a for a in range(len(spatial)) if a != axis]
        target = resampled_shape([spatial[a] for a in in_model], [spacing[a] for a in in_model], self.target_spacing)
        grid = list(spatial)
        for a, size in zip(in_model, target, strict=True):
            grid[a] = size
        grid = tuple(grid)
        if grid == spatial:
            return image, labels, trusted
        image = resample_to_shape(image, grid)
        labels = _nearest(labels, grid).astype(labels.dtype)
        trusted = None if trusted is None else _nearest(trusted.astype(np.uint8), grid).astype(bool)
        return image, labels, trusted

    # -------------------------------------------------------------------------------------------------- sampling

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Global sample ``index``: a patch of a random case (see the module docstring)."""
        index = int(index)
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, index])
        case_index = int(rng.integers(self.num_cases))
        case = self.prepared_case(case_index)
        foreground = is_foreground_sample(index, self.foreground_fraction)
        centre, used_foreground = self._centre(case, foreground, rng)
        image, labels, trusted = self._crop(case, centre)
        image_t = torch.from_numpy(image)
        labels_t = torch.from_numpy(labels.astype(np.int64))
        trusted_t = torch.from_numpy(trusted)
        weight_t = None if case.weight is None else torch.from_numpy(self._crop_weight(case, centre))
        if self.augmenter is not None:
            generator = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
            if weight_t is None:
                image_t, labels_t, trusted_t = self.augmenter(image_t, labels_t, trusted_t, generator=generator)
            else:
                image_t, labels_t, trusted_t, weight_t = _augment_with_weight(
                    self.augmenter, image_t, labels_t, trusted_t, weight_t, generator
                )
        item = {
            "image": image_t,
            "labels": labels_t,
            "trusted": trusted_t,
            "case": case_index,
            "foreground": used_foreground,
        }
        if weight_t is not None:
            item["weight"] = torch.where(trusted_t, weight_t, 0.0)
        return item

    def _crop_weight(self, case: PreparedCase, centre: tuple[int, ...]) -> np.ndarray:
        """The ``(*patch)`` float32 weights around ``centre``, cut exactly like the image (0 where padded)."""
        weight_as_image = dataclasses.replace(case, image=case.weight[None])
        return self._crop(weight_as_image, centre)[0][0]

    def _centre(self, case: PreparedCase, foreground: bool, rng: np.random.Generator) -> tuple[tuple[int, ...], bool]:
        """A centre voxel (array order) and whether it lies on foreground."""
        shape = case.spatial_shape
        if foreground and case.foreground:
            classes = sorted(case.foreground)
            voxels = case.foreground[classes[int(rng.integers(len(classes)))]]
            return tuple(int(v) for v in np.unravel_index(voxels[int(rng.integers(len(voxels)))], shape)), True
        if case.trusted_voxels is not None and len(case.trusted_voxels):
            flat = case.trusted_voxels[int(rng.integers(len(case.trusted_voxels)))]
            return tuple(int(v) for v in np.unravel_index(flat, shape)), False
        return tuple(int(rng.integers(s)) for s in shape), False

    def _crop(self, case: PreparedCase, centre: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The patch around ``centre``: image ``(C, *patch)``, labels and trust ``(*patch)``."""
        image, labels, trusted = case.image, case.labels, case.trusted
        if case.slice_axis is not None:  # 2D model on a volume: the slice through the centre
            axis, index = case.slice_axis, centre[case.slice_axis]
            image = np.take(image, index, axis=1 + axis)
            labels = np.take(labels, index, axis=axis)
            trusted = None if trusted is None else np.take(trusted, index, axis=axis)
            centre = tuple(c for a, c in enumerate(centre) if a != axis)
        shape = labels.shape
        source, target = [], []
        for size, patch, c in zip(shape, self.patch_size, centre, strict=True):
            start = min(max(c - patch // 2, 0), size - patch) if size >= patch else 0
            length = min(patch, size)
            source.append(slice(start, start + length))
            target.append(slice(0, length))
        source, target = tuple(source), tuple(target)
        out_image = np.zeros((image.shape[0], *self.patch_size), dtype=np.float32)
        out_labels = np.zeros(self.patch_size, dtype=labels.dtype)
        out_trusted = np.zeros(self.patch_size, dtype=bool)
        out_image[(slice(None), *target)] = image[(slice(None), *source)]
        out_labels[target] = labels[source]
        out_trusted[target] = True if trusted is None else trusted[source]
        return out_image, out_labels, out_trusted


def _checked_weight(weight: np.ndarray, case: TrainingCase) -> np.ndarray:
    """``weight`` as float32 if it fits ``case`` and is finite and >= 0, else a ValueError naming the case."""
    weight = np.asarray(weight)
    if weight.shape != case.spatial_shape or weight.dtype.kind not in "biuf":
        raise ValueError(
            f"case {case.name!r}: voxel weights of shape {weight.shape} and dtype {weight.dtype} do not fit its "
            f"spatial shape {case.spatial_shape}; give one real weight per voxel"
        )
    weight = weight.astype(np.float32)
    if not np.all(np.isfinite(weight) & (weight >= 0)):
        raise ValueError(f"case {case.name!r}: voxel weights must be finite and >= 0")
    return weight


def _augment_with_weight(
    augmenter: Augmenter,
    image: torch.Tensor,
    labels: torch.Tensor,
    trusted: torch.Tensor,
    weight: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Augment a patch and its ``(*patch)`` weights with one draw: the weights ride in the labels (module docstring).

    Returns:
        ``(image, labels, trusted, weight)`` as the augmenter returns them, and the moved weights.
    """
    values, index = torch.unique(weight, return_inverse=True)
    count = len(values)
    combined = labels.long() * count + index
    if int(combined.max()) >= 2**24:  # the affine transform moves labels as float32: exact below 2**24
        raise ValueError(
            f"a patch has {count} distinct voxel weights: too many to augment exactly; use fewer distinct weights"
        )
    image, combined, trusted = augmenter(image, combined, trusted, generator=generator)
    return image, combined // count, trusted, values[combined % count]


def _foreground_voxels(
    labels: np.ndarray, trusted: np.ndarray | None, rng: np.random.Generator
) -> dict[int, np.ndarray]:
    """Per foreground class present among the trusted voxels, flat indices of up to MAX_FOREGROUND_VOXELS of them."""
    flat_labels = labels.reshape(-1)
    candidates = np.flatnonzero(flat_labels if trusted is None else flat_labels * trusted.reshape(-1))
    if candidates.size == 0:
        return {}
    values = flat_labels[candidates]
    return {
        int(value): _subsample(candidates[values == value], MAX_FOREGROUND_VOXELS, rng) for value in np.unique(values)
    }


def _subsample(indices: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    if indices.size <= limit:
        return indices
    return np.sort(rng.choice(indices, size=limit, replace=False))


def _nearest(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``array`` ``(*spatial)`` resampled to ``shape`` with nearest neighbours on the predictor's grid convention."""
    source = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    return F.interpolate(source, size=shape, mode="nearest-exact")[0, 0].numpy()
