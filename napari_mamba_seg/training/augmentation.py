"""Data augmentation of training patches with torch ops: spatial (flips, in-plane rot90, small in-plane rotations and
scaling) and intensity (brightness, contrast, gamma, a smooth multiplicative bias field, Gaussian noise).

The spatial transforms move the image, the labels and the trust mask together: the image is interpolated
linearly, the labels and the trust mask with nearest neighbours, and voxels that a rotation or a zoom-out brings in
from outside the patch become untrusted (label 0), so they add nothing to the loss. Flips and rot90 are exact
permutations of the voxels. "In-plane" means the last two axes of the patch (``(y, x)`` of an axial volume), so
rotations never mix the coarse slice axis of anisotropic MRI into the plane.

Every random choice comes from the ``torch.Generator`` passed in: the same generator state gives the same result.
The intensity transforms act on each channel with its own random factors.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["AugmentationConfig", "AugmentationParams", "Augmenter"]


@dataclass
class AugmentationConfig:
    """Which augmentations run, how often (probability per patch) and how strongly.

    Attributes:
        enabled: False turns every augmentation off.
        flip_probability: Probability of flipping each axis in ``flip_axes``.
        flip_axes: Spatial axes of the patch that may be flipped (array order); None = all.
        rot90_probability: Probability of an in-plane rotation by 90, 180 or 270 degrees (90/270 only for a square
            plane).
        rotation_probability: Probability of a small in-plane rotation.
        max_rotation_degrees: The rotation angle is uniform in ``[-max, max]``.
        scale_probability: Probability of a zoom (all axes of the patch by the same factor).
        scale_range: The zoom factor is uniform in this range (> 1 enlarges the content).
        brightness_probability: Probability of multiplying a channel by a factor from ``brightness_range``.
        brightness_range: Multiplicative brightness factors.
        contrast_probability: Probability of scaling a channel's deviations from its mean.
        contrast_range: Contrast factors.
        gamma_probability: Probability of a gamma curve on a channel (applied on its range rescaled to [0, 1]).
        gamma_range: Gamma exponents.
        bias_field_probability: Probability of multiplying a channel by a smooth field ``exp(s * g)``, ``g`` a
            Gaussian random field on a coarse grid upsampled smoothly.
        bias_field_strength: ``s``: the standard deviation of the field's logarithm.
        bias_field_grid: Points per axis of the coarse grid.
        noise_probability: Probability of adding Gaussian noise to a channel.
        noise_std_range: The noise's standard deviation, uniform in this range, relative to the channel's standard
            deviation.
    """

    enabled: bool = True
    flip_probability: float = 0.5
    flip_axes: tuple[int, ...] | None = None
    rot90_probability: float = 0.5
    rotation_probability: float = 0.2
    max_rotation_degrees: float = 15.0
    scale_probability: float = 0.2
    scale_range: tuple[float, float] = (0.85, 1.25)
    brightness_probability: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    contrast_probability: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    gamma_probability: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    bias_field_probability: float = 0.1
    bias_field_strength: float = 0.3
    bias_field_grid: int = 4
    noise_probability: float = 0.1
    noise_std_range: tuple[float, float] = (0.0, 0.1)

    def __post_init__(self) -> None:
        """Check the probabilities and ranges (lists from JSON become tuples)."""
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, list):
                setattr(self, item.name, tuple(value))
            if item.name.endswith("_probability") and not 0 <= value <= 1:
                raise ValueError(f"augmentation {item.name} must lie in [0, 1], got {value}")
            if item.name.endswith("_range") and (len(getattr(self, item.name)) != 2 or value[0] > value[1]):
                raise ValueError(f"augmentation {item.name} must be (low, high) with low <= high, got {value}")
        if self.scale_range[0] <= 0 or self.gamma_range[0] <= 0:
            raise ValueError("augmentation scale_range and gamma_range must be positive")
        if self.bias_field_grid < 2:
            raise ValueError(f"bias_field_grid must be >= 2, got {self.bias_field_grid}")

    @classmethod
    def none(cls) -> AugmentationConfig:
        """No augmentation at all."""
        return cls(enabled=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AugmentationConfig:
        """Rebuild from :meth:`to_dict` output; ValueError for unknown keys."""
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown augmentation setting(s) {unknown}; valid: {sorted(known)}")
        return cls(**values)


@dataclass
class AugmentationParams:
    """The random choices for one patch (drawn by :meth:`Augmenter.draw`, applied by :meth:`Augmenter.apply`).

    Attributes:
        rotation_degrees: In-plane rotation angle (0 = none).
        scale: Zoom factor (1 = none).
        flip_axes: Spatial axes flipped (array order).
        rot90_k: In-plane quarter turns (``torch.rot90`` of the last two axes, ``k`` times).
        brightness: Per channel multiplicative factor, or None.
        contrast: Per channel contrast factor, or None.
        gamma: Per channel gamma, or None.
        bias_field: Per channel coarse log-field ``(C, *grid)``, or None.
        noise_std: Per channel noise standard deviation (relative), or None.
        noise_seed: Seed of the noise.
    """

    rotation_degrees: float = 0.0
    scale: float = 1.0
    flip_axes: tuple[int, ...] = ()
    rot90_k: int = 0
    brightness: list[float | None] = field(default_factory=list)
    contrast: list[float | None] = field(default_factory=list)
    gamma: list[float | None] = field(default_factory=list)
    bias_field: list[torch.Tensor | None] = field(default_factory=list)
    noise_std: list[float | None] = field(default_factory=list)
    noise_seed: int = 0

    @property
    def has_affine(self) -> bool:
        """Whether an interpolating (rotation or zoom) transform is applied."""
        return self.rotation_degrees != 0.0 or self.scale != 1.0


class Augmenter:
    """Random augmentation of ``(image, labels, trusted)`` patches (see the module docstring).

    Args:
        config: What to apply; None = :class:`AugmentationConfig` defaults.

    Example:
        >>> augmenter = Augmenter(AugmentationConfig(rotation_probability=0.5))
        >>> image, labels, trusted = augmenter(image, labels, trusted, generator=torch.Generator().manual_seed(0))
    """

    def __init__(self, config: AugmentationConfig | None = None) -> None:
        self.config = config if config is not None else AugmentationConfig()

    def __call__(
        self,
        image: torch.Tensor,
        labels: torch.Tensor,
        trusted: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Augment one patch.

        Args:
            image: ``(C, *spatial)`` float (2 or 3 spatial axes), any device.
            labels: ``(*spatial)`` integer labels.
            trusted: ``(*spatial)`` bool trust mask; None = all trusted.
            generator: A CPU ``torch.Generator``: every random choice comes from it (None = torch's default).

        Returns:
            ``(image, labels, trusted)``: the augmented ``(C, *spatial)`` float32 image, ``(*spatial)`` int64 labels
            and ``(*spatial)`` bool trust mask.
        """
        if trusted is None:
            trusted = torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
        _check_patch(image, labels, trusted)
        if not self.config.enabled:
            return image.float(), labels.long(), trusted
        params = self.draw(tuple(image.shape), generator)
        return self.apply(image, labels, trusted, params)

    def draw(self, image_shape: tuple[int, ...], generator: torch.Generator | None = None) -> AugmentationParams:
        """The random choices for a patch with ``image_shape`` ``(C, *spatial)``."""
        config = self.config
        channels, spatial = image_shape[0], image_shape[1:]

        def chance(probability: float) -> bool:
            return probability > 0 and float(torch.rand((), generator=generator)) < probability

        def uniform(low: float, high: float) -> float:
            return low + (high - low) * float(torch.rand((), generator=generator))

        params = AugmentationParams()
        if chance(config.rotation_probability):
            params.rotation_degrees = uniform(-config.max_rotation_degrees, config.max_rotation_degrees)
        if chance(config.scale_probability):
            params.scale = uniform(*config.scale_range)
        axes = range(len(spatial)) if config.flip_axes is None else config.flip_axes
        params.flip_axes = tuple(axis for axis in axes if chance(config.flip_probability))
        if chance(config.rot90_probability):
            square = spatial[-1] == spatial[-2]
            params.rot90_k = int(torch.randint(1, 4, (), generator=generator)) if square else 2
        grid = (config.bias_field_grid,) * len(spatial)
        for _ in range(channels):
            params.brightness.append(
                uniform(*config.brightness_range) if chance(config.brightness_probability) else None
            )
            params.contrast.append(uniform(*config.contrast_range) if chance(config.contrast_probability) else None)
            params.gamma.append(uniform(*config.gamma_range) if chance(config.gamma_probability) else None)
            bias = chance(config.bias_field_probability)
            params.bias_field.append(
                torch.randn(grid, generator=generator) * config.bias_field_strength if bias else None
            )
            params.noise_std.append(uniform(*config.noise_std_range) if chance(config.noise_probability) else None)
        params.noise_seed = int(torch.randint(0, 2**62, (), generator=generator))
        return params

    def apply(
        self, image: torch.Tensor, labels: torch.Tensor, trusted: torch.Tensor, params: AugmentationParams
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Apply drawn ``params`` to a patch (same arguments and results as :meth:`__call__`)."""
        image, labels = image.float(), labels.long()
        if params.has_affine:
            image, labels, trusted = affine_transform(image, labels, trusted, params.rotation_degrees, params.scale)
        image, labels, trusted = flip_and_rotate90(image, labels, trusted, params.flip_axes, params.rot90_k)
        return _intensity(image, params), labels, trusted


def flip_and_rotate90(
    image: torch.Tensor, labels: torch.Tensor, trusted: torch.Tensor, flip_axes: tuple[int, ...], rot90_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flip the spatial ``flip_axes`` then rotate the last two axes by ``rot90_k`` quarter turns (exact).

    Args:
        image: ``(C, *spatial)``.
        labels: ``(*spatial)``.
        trusted: ``(*spatial)``.
        flip_axes: Spatial axes (array order) to flip.
        rot90_k: Quarter turns (``torch.rot90`` of the last two axes).
    """
    if flip_axes:
        image = image.flip([1 + a for a in flip_axes])
        labels = labels.flip(list(flip_axes))
        trusted = trusted.flip(list(flip_axes))
    if rot90_k % 4:
        image = torch.rot90(image, rot90_k, dims=(-2, -1))
        labels = torch.rot90(labels, rot90_k, dims=(-2, -1))
        trusted = torch.rot90(trusted, rot90_k, dims=(-2, -1))
    return image.contiguous(), labels.contiguous(), trusted.contiguous()


def affine_transform(
    image: torch.Tensor, labels: torch.Tensor, trusted: torch.Tensor, rotation_degrees: float, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotate the patch in-plane about its centre and zoom it; linear for the image, nearest for labels and trust.

    Voxels sampled from outside the patch get image 0, label 0 and ``trusted=False``.

    Args:
        image: ``(C, *spatial)`` float.
        labels: ``(*spatial)`` int64.
        trusted: ``(*spatial)`` bool.
        rotation_degrees: Counter-clockwise angle in the plane of the last two axes.
        scale: Zoom factor (> 1 enlarges the content).
    """
    spatial = tuple(image.shape[1:])
    n = len(spatial)
    # voxel-space map from an output position to the input position it samples (centred coordinates, grid order x, y, z)
    angle = math.radians(rotation_degrees)
    matrix = torch.eye(n, dtype=torch.float64)
    matrix[0, 0], matrix[0, 1] = math.cos(angle), -math.sin(angle)
    matrix[1, 0], matrix[1, 1] = math.sin(angle), math.cos(angle)
    matrix /= scale
    half = torch.tensor(spatial[::-1], dtype=torch.float64) / 2  # align_corners=False: index i <-> (2i + 1) / S - 1
    theta = torch.zeros(1, n, n + 1, dtype=torch.float64)
    theta[0, :, :n] = matrix * half[None, :] / half[:, None]
    grid = F.affine_grid(theta.float(), [1, 1, *spatial], align_corners=False).to(image.device)
    image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    stacked = torch.stack([labels.float(), trusted.float()])[None]
    nearest = F.grid_sample(stacked, grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
    trusted = nearest[1] > 0.5
    labels = torch.where(trusted, nearest[0].round().long(), 0)
    return image, labels, trusted


def _intensity(image: torch.Tensor, params: AugmentationParams) -> torch.Tensor:
    """Brightness, contrast, gamma, bias field and noise, channel by channel."""
    channels = []
    noise_generator = torch.Generator().manual_seed(params.noise_seed)
    for c in range(image.shape[0]):
        x = image[c]
        if params.brightness and params.brightness[c] is not None:
            x = x * params.brightness[c]
        if params.contrast and params.contrast[c] is not None:
            mean = x.mean()
            x = (x - mean) * params.contrast[c] + mean
        if params.gamma and params.gamma[c] is not None:
            low, high = x.min(), x.max()
            span = (high - low).clamp_min(1e-7)
            x = ((x - low) / span).clamp(0, 1).pow(params.gamma[c]) * span + low
        if params.bias_field and params.bias_field[c] is not None:
            coarse = params.bias_field[c][None, None].to(x.device)
            mode = "bilinear" if x.dim() == 2 else "trilinear"
            log_field = F.interpolate(coarse, size=tuple(x.shape), mode=mode, align_corners=True)[0, 0]
            x = x * torch.exp(log_field)
        if params.noise_std and params.noise_std[c] is not None:
            noise = torch.randn(tuple(x.shape), generator=noise_generator).to(x.device)
            x = x + noise * (params.noise_std[c] * x.std().clamp_min(1e-7))
        channels.append(x)
    return torch.stack(channels)


def _check_patch(image: torch.Tensor, labels: torch.Tensor, trusted: torch.Tensor) -> None:
    if image.dim() not in (3, 4):
        raise ValueError(f"image patch must be (C, H, W) or (C, D, H, W), got shape {tuple(image.shape)}")
    if tuple(labels.shape) != tuple(image.shape[1:]) or tuple(trusted.shape) != tuple(image.shape[1:]):
        raise ValueError(
            f"labels {tuple(labels.shape)} and trusted {tuple(trusted.shape)} must have the image's spatial shape "
            f"{tuple(image.shape[1:])}"
        )
    if trusted.dtype != torch.bool:
        raise ValueError(f"trusted must be a bool tensor, got {trusted.dtype}")
