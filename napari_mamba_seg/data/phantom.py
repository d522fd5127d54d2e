"""Synthetic breast DCE-MRI phantom: a labelled, fat-saturated, multi-phase volume in seconds.

The recipe (/work/shared/phantom-recipe.md) in short:

1. **Anatomy** on a fine grid (the acquisition grid supersampled in-plane): a prone torso (skin, subcutaneous
   fat, pectoralis, ribs, lungs, heart) with two pendant breasts; fibroglandular tissue (FGT) from thresholded
   smooth noise, the threshold set to hit the requested ACR density class; lesions inside the breast
   (malignant: irregular, spiculated, washout; benign: smooth oval, persistent).
2. **Signal** of a fat-saturated 3D spoiled gradient echo (TR 4.5 ms, flip 12°) from each tissue's T1 and proton
   density, with gadolinium uptake from the extended Tofts model and the Parker population AIF.
3. **Degradation**: partial volume (sub-voxel averaging), a mild slice profile, optional rigid motion between
   phases, a smooth bias field, Rician noise.

Intensities are scaled like the real UCSF-BR-06 case in ``shared/data/breast_nact``: pre-contrast FGT ≈ 50,
suppressed breast fat ≈ 15-25 (with its ligaments), malignant lesions ≈ 110-130 early (percent enhancement
≈ 100 %), background noise ≈ 4.

Labels (:data:`LABELS`) are exclusive per voxel and lie on the acquisition grid: each voxel takes the class that
covers most of its sub-voxels. **"breast" (1) is the adipose breast tissue only** (fat with its ligaments and small
vessels) **inside the skin**: the whole breast is labels 1 + 2 + 3, and the FGT fraction (ACR density) is
FGT / (1 + 2 + 3). The skin (1.5-2 mm) and the nipple are background (0), like mammographic and MRI density
measures that leave the skin out; so are subcutaneous fat outside the two breasts, lungs, heart, ribs and air.
The breast region of each side reaches back to the pectoralis. "muscle" (4) is the pectoralis and the
chest-wall muscle between the ribs.

This module imports numpy and scipy only (no torch, napari or Qt): napari opens it as sample data.

Example:
    >>> from napari_mamba_seg.data import make_phantom
    >>> phantom = make_phantom(shape=(16, 96, 96), spacing=(3.0, 1.8, 1.8), seed=1)
    >>> phantom.image.shape, phantom.labels.shape
    ((3, 16, 96, 96), (16, 96, 96))
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_mamba_seg._spacing import checked_spacing
from napari_mamba_seg.data import _anatomy as anat
from napari_mamba_seg.data._degrade import code_counts, degrade, majority_labels, subvoxel_views
from napari_mamba_seg.data._grid import Grid
from napari_mamba_seg.data._lesions import MAX_LESIONS, lesion_record, place_lesions, sample_lesions
from napari_mamba_seg.data._signal import FGT_PRE_CONTRAST_SIGNAL, render

if TYPE_CHECKING:  # pragma: no cover
    from napari_mamba_seg.io._image import MedicalImage

__all__ = ["LABELS", "Phantom", "PhantomConfig", "default_phase_times", "make_phantom"]

LABELS: dict[int, str] = {0: "background", 1: "breast", 2: "fibroglandular", 3: "lesion", 4: "muscle"}
"""Label values of :attr:`Phantom.labels`. 1 = adipose breast tissue inside the skin (breast minus FGT and lesion)."""

DENSITIES = ("a", "b", "c", "d")
LESION_KINDS = ("malignant", "benign", "random")
MIN_FOV_MM = (24.0, 100.0, 100.0)
MAX_PHASES = 9


def default_phase_times(phases: int) -> tuple[float, ...]:
    """Acquisition times (s after injection; 0 = pre-contrast) for a number of phases.

    Three phases give pre, early (2.5 min) and late (7.5 min) as in the breast DCE protocols behind the
    NACT data; more phases are 75 s apart (the recipe says 60-90 s).
    """
    if phases == 3:
        return (0.0, 150.0, 450.0)
    if phases == 2:
        return (0.0, 150.0)
    return tuple(75.0 * k for k in range(phases))


@dataclass(frozen=True)
class PhantomConfig:
    """Settings of a phantom. Invalid values raise ``ValueError`` naming the field and what it accepts.

    Attributes:
        shape: Acquisition grid ``(z, y, x)``: axial slices, rows anterior→posterior, columns right→left.
        spacing: Voxel size ``(z, y, x)`` in mm.
        density: ACR breast density class: ``"a"`` (< 25 % FGT), ``"b"`` (25-50 %), ``"c"`` (51-75 %),
            ``"d"`` (> 75 %), FGT as a fraction of the whole breast volume.
        lesions: Number of lesions (0-8).
        lesion_kind: ``"malignant"``, ``"benign"`` or ``"random"`` (each lesion 50/50).
        phases: Number of DCE phases, 1-9 (1 pre-contrast + post-contrast phases).
        noise: Rician noise level: standard deviation of each quadrature channel relative to the mean
            pre-contrast FGT signal (1 / SNR of FGT; the recipe's SNR 15-40 is 0.025-0.067; 0 = no noise).
        bias_field: Peak-to-peak range of the log bias field over the body (0.3 → max/min ≈ 1.35; 0 = none).
        seed: Random seed; the same seed and settings give identical arrays.
        fat_suppression: Fat-saturated (True, fat dark) or plain T1-weighted (False, fat bright).
        field_strength: 1.5 or 3.0 tesla (selects the T1 values).
        motion: Largest rigid shift (mm) of a post-contrast phase relative to the pre-contrast one (labels follow
            the pre-contrast phase).
        phase_times: Phase times in s after injection (first <= 0 = pre-contrast, then increasing); None for
            :func:`default_phase_times`.
        supersample: In-plane supersampling of the fine tissue grid (partial volume); 1 = none.
    """

    shape: tuple[int, int, int] = (60, 256, 256)
    spacing: tuple[float, float, float] = (2.0, 0.7, 0.7)
    density: str = "b"
    lesions: int = 1
    lesion_kind: str = "random"
    phases: int = 3
    noise: float = 0.06
    bias_field: float = 0.3
    seed: int = 0
    fat_suppression: bool = True
    field_strength: float = 1.5
    motion: float = 0.0
    phase_times: tuple[float, ...] | None = None
    supersample: int = 2

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def times_s(self) -> tuple[float, ...]:
        """Phase times in seconds after injection."""
        return default_phase_times(self.phases) if self.phase_times is None else tuple(self.phase_times)

    @property
    def channel_names(self) -> list[str]:
        """Names of the phases, e.g. ``["pre-contrast", "early post-contrast", "late post-contrast"]``."""
        if self.phase_times is None and self.phases <= 3:
            return ["pre-contrast", "early post-contrast", "late post-contrast"][: self.phases]
        names = []
        for k, t in enumerate(self.times_s):
            names.append("pre-contrast" if t <= 0 else f"post-contrast {k} ({t:g} s)")
        return names


def _invalid(name: str, value: Any, valid: str) -> ValueError:
    return ValueError(f"PhantomConfig.{name} must be {valid}, got {value!r}")


def _validate(config: PhantomConfig) -> None:
    """Check and normalise every field (raises ValueError naming the field and the valid values)."""
    shape, spacing = config.shape, config.spacing
    if len(tuple(shape)) != 3 or not all(isinstance(n, (int, np.integer)) and n > 0 for n in shape):
        raise _invalid("shape", shape, "three positive integers (z, y, x)")
    object.__setattr__(config, "shape", tuple(int(n) for n in shape))
    object.__setattr__(config, "spacing", checked_spacing(spacing, 3, name="PhantomConfig.spacing", axes="z, y, x"))
    if config.shape[0] < 8 or min(config.shape[1:]) < 48:
        raise _invalid("shape", config.shape, "at least (8, 48, 48) voxels (the shape is too small)")
    fov = [n * s for n, s in zip(config.shape, config.spacing, strict=True)]
    if any(f < m for f, m in zip(fov, MIN_FOV_MM, strict=True)):
        raise ValueError(
            f"PhantomConfig.shape × spacing gives a field of view of {fov[0]:g} × {fov[1]:g} × {fov[2]:g} mm "
            "(z, y, x); "
            f"two breasts need at least {MIN_FOV_MM[0]:g} × {MIN_FOV_MM[1]:g} × {MIN_FOV_MM[2]:g} mm: "
            "increase shape or spacing"
        )
    density = config.density.lower() if isinstance(config.density, str) else config.density
    if density not in DENSITIES:
        raise _invalid("density", config.density, "one of 'a', 'b', 'c', 'd' (ACR breast density class)")
    object.__setattr__(config, "density", density)
    if not isinstance(config.lesions, (int, np.integer)) or not 0 <= config.lesions <= MAX_LESIONS:
        raise _invalid("lesions", config.lesions, f"an integer from 0 to {MAX_LESIONS}")
    if config.lesion_kind not in LESION_KINDS:
        raise _invalid("lesion_kind", config.lesion_kind, "one of 'malignant', 'benign', 'random'")
    if not isinstance(config.phases, (int, np.integer)) or not 1 <= config.phases <= MAX_PHASES:
        raise _invalid("phases", config.phases, f"an integer from 1 to {MAX_PHASES}")
    _check_range(config, "noise", 0.0, 1.0)
    _check_range(config, "bias_field", 0.0, 2.0)
    _check_range(config, "motion", 0.0, 10.0)
    if not isinstance(config.seed, (int, np.integer)) or config.seed < 0:
        raise _invalid("seed", config.seed, "a non-negative integer")
    if config.field_strength not in (1.5, 3.0):
        raise _invalid("field_strength", config.field_strength, "1.5 or 3.0 (tesla)")
    object.__setattr__(config, "field_strength", float(config.field_strength))
    if not isinstance(config.supersample, (int, np.integer)) or not 1 <= config.supersample <= 4:
        raise _invalid("supersample", config.supersample, "an integer from 1 to 4")
    if config.phase_times is not None:
        times = tuple(float(t) for t in config.phase_times)
        if (
            len(times) != config.phases
            or times[0] > 0
            or any(b <= a for a, b in itertools.pairwise(times))
            or any(t <= 0 for t in times[1:])
            or times[-1] > 1800
        ):
            raise _invalid(
                "phase_times",
                config.phase_times,
                f"{config.phases} increasing times in s (the first <= 0, pre-contrast; the others in (0, 1800])",
            )
        object.__setattr__(config, "phase_times", times)


def _check_range(config: PhantomConfig, name: str, lo: float, hi: float) -> None:
    value = getattr(config, name)
    if not isinstance(value, (int, float, np.number)) or not math.isfinite(value) or not lo <= value <= hi:
        raise _invalid(name, value, f"a number from {lo:g} to {hi:g}")
    object.__setattr__(config, name, float(value))


@dataclass
class Phantom:
    """A generated phantom.

    Attributes:
        image: ``(phases, z, y, x)`` float32 magnitude images.
        labels: ``(z, y, x)`` uint8 labels (:data:`LABELS`) on the acquisition grid.
        spacing: Voxel size ``(z, y, x)`` in mm.
        lesion_info: Per lesion: ``kind``, ``centre`` (voxel index ``(z, y, x)``, float), ``radius_mm``
            (radius of the sphere with the mass's volume), ``extent_mm`` (farthest reach incl. spicules),
            ``volume_ml`` (from the fine grid), ``side``, ``pattern``, ``spicules``, ``ktrans``, ``ve``, ``vp``,
            ``curve`` (Kuhl type: washout / plateau / persistent).
        fgt_fraction: FGT volume / whole-breast volume (labels 1 + 2 + 3), measured on the fine grid.
        config: The settings used.
        channel_names: One name per phase.
        phase_times_s: Phase times in s after injection.
        noise_sigma: Standard deviation of each quadrature noise channel (intensity units).
        anatomy_scale: Scale of the breasts relative to the real size drawn (1 = real; smaller when the field of
            view is too narrow for two real breasts; the torso always keeps its real size).
    """

    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    lesion_info: list[dict]
    fgt_fraction: float
    config: PhantomConfig
    channel_names: list[str] = field(default_factory=list)
    phase_times_s: tuple[float, ...] = ()
    noise_sigma: float = 0.0
    anatomy_scale: float = 1.0

    def geometry_affine(self) -> np.ndarray:
        """``(4, 4)`` array-index → RAS+ mm affine: axial slices, x → patient left, y → posterior, z → superior."""
        spacing = np.asarray(self.spacing)
        shape = np.asarray(self.labels.shape)
        direction = np.array([[0.0, 0.0, -1.0], [0.0, -1.0, 0.0], [1.0, 0.0, 0.0]])  # columns: z, y, x
        affine = np.eye(4)
        affine[:3, :3] = direction * spacing[None, :]
        affine[:3, 3] = -affine[:3, :3] @ ((shape - 1) / 2)  # the volume centre is the world origin
        return affine

    def to_medical_image(self) -> MedicalImage:
        """The image as a :class:`~napari_mamba_seg.io.MedicalImage` (channels = phases, RAS+ geometry).

        The labels share the geometry; they and the lesion list travel in ``metadata``.
        """
        from napari_mamba_seg.io._image import ImageGeometry, MedicalImage

        return MedicalImage(
            array=self.image,
            geometry=ImageGeometry(self.geometry_affine()),
            channel_names=list(self.channel_names),
            format="array",
            metadata={
                "labels": self.labels,
                "label_names": dict(LABELS),
                "lesions": self.lesion_info,
                "fgt_fraction": self.fgt_fraction,
                "phase_times_s": self.phase_times_s,
                "phantom_config": dataclasses.asdict(self.config),
            },
        )


def make_phantom(config: PhantomConfig | None = None, **overrides: Any) -> Phantom:
    """Generate a synthetic breast DCE-MRI volume with its labels.

    Args:
        config: Settings; the defaults when None.
        **overrides: Fields of :class:`PhantomConfig` to change, e.g. ``density="d", seed=3``.

    Returns:
        The phantom.

    Raises:
        ValueError: An unknown or invalid setting (the message names the field and the valid values).
    """
    config = _resolve_config(config, overrides)
    rng = np.random.default_rng(config.seed)
    grid = Grid(config.shape, config.spacing, config.supersample)
    times = np.asarray(config.times_s)
    early, late = _early_late(times)

    body = anat.sample_body(rng, grid, config.density)
    tissue, boxes = anat.build_anatomy(body, grid)
    scores, candidates = anat.fgt_score(rng, body, grid, boxes)
    lesions = sample_lesions(rng, config.lesions, config.lesion_kind, times, early, late)
    placed = place_lesions(rng, lesions, body, grid, tissue, boxes, scores, candidates)
    fgt_fraction = anat.grow_fgt(body, tissue, boxes, scores, candidates)

    subvoxels = subvoxel_views(tissue, grid.factor)
    labels = majority_labels(subvoxels, anat.TISSUE_TO_LABEL, len(LABELS))
    present = np.flatnonzero(np.bincount(tissue.ravel(), minlength=anat.N_TISSUE_CODES))
    counts = code_counts(subvoxels, present)
    del subvoxels, tissue

    signal = render(rng, config.fat_suppression, config.field_strength, grid, counts, placed, times, boxes)
    sigma = config.noise * FGT_PRE_CONTRAST_SIGNAL
    image = degrade(rng, grid, signal, counts, config.bias_field, config.motion, sigma)
    lesion_info = [lesion_record(lesion, volume, grid) for lesion, volume in placed]
    return Phantom(
        image=image,
        labels=labels,
        spacing=config.spacing,
        lesion_info=lesion_info,
        fgt_fraction=fgt_fraction,
        config=config,
        channel_names=config.channel_names,
        phase_times_s=config.times_s,
        noise_sigma=config.noise * FGT_PRE_CONTRAST_SIGNAL,
        anatomy_scale=body.scale,
    )


def _resolve_config(config: PhantomConfig | None, overrides: dict[str, Any]) -> PhantomConfig:
    if config is not None and not isinstance(config, PhantomConfig):
        raise ValueError(f"config must be a PhantomConfig or None, got {type(config).__name__}")
    names = {f.name for f in dataclasses.fields(PhantomConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown PhantomConfig field(s) {unknown}; valid fields: {sorted(names)}")
    config = config or PhantomConfig()
    return dataclasses.replace(config, **overrides) if overrides else config


def _early_late(times: np.ndarray) -> tuple[int, int]:
    """Indices of the early phase (post-contrast closest to 2.5 min) and the late (last) phase."""
    post = np.flatnonzero(times > 0)
    if post.size == 0:
        return 0, 0
    early = int(post[np.argmin(np.abs(times[post] - 150.0))])
    return early, len(times) - 1
