"""Breast lesions: shape, placement inside the breast, and contrast kinetics.

Recipe (/work/shared/phantom-recipe.md):

* mass: an ellipsoid of 5-40 mm perturbed by low-order spherical harmonics (here: polynomials of degree 2-4 in
  the unit direction, which span the same functions as spherical harmonics of those degrees);
* malignant: irregular outline with 5-20 tapered spicules of 2-10 mm; rim enhancement or a necrotic core;
  extended Tofts Ktrans 0.2-0.8 /min, ve 0.2-0.4, vp 0.02-0.1, drawn until the curve washes out (Kuhl type III);
* benign: smooth oval, homogeneous; Ktrans 0.05-0.2 /min, ve 0.3-0.5, no vp, drawn until the curve is
  persistent (Kuhl type I).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from itertools import combinations_with_replacement

import numpy as np
from scipy import ndimage as ndi

from napari_mamba_seg.data import _anatomy as anat
from napari_mamba_seg.data._anatomy import MAX_LESIONS
from napari_mamba_seg.data._grid import Grid
from napari_mamba_seg.data._signal import RELAXIVITY_PER_S_PER_MM, TUMOUR_PD, TUMOUR_T1_RANGE_MS, spgr_signal
from napari_mamba_seg.data._signal import tofts_concentration as _tofts

__all__ = ["MAX_LESIONS", "Lesion", "lesion_record", "place_lesions", "sample_lesions"]

MIN_LESION_RADIUS_MM = 2.5
KINETIC_RANGES = {
    "malignant": {"ktrans": (0.2, 0.8), "ve": (0.2, 0.4), "vp": (0.02, 0.1)},
    "benign": {"ktrans": (0.05, 0.2), "ve": (0.3, 0.5), "vp": (0.0, 0.0)},
}


@dataclass
class Lesion:
    """One lesion in mm (centred world coordinates ``(z, y, x)``)."""

    kind: str
    centre: np.ndarray
    radius: float  # size of the mass (mm): its largest semi-axis before the outline perturbation
    rotation: np.ndarray  # (3, 3): columns are the lesion's own axes in world (z, y, x)
    axes: np.ndarray  # (3,) relative semi-axes (largest 1)
    coefficients: np.ndarray  # outline perturbation, one per monomial
    degrees: list[tuple[int, ...]]  # monomials of the unit direction
    spicules: list[tuple[np.ndarray, float, float]] = field(default_factory=list)  # (direction, length, half width)
    outline_max: float = 1.0  # largest relative outline radius over all directions
    pattern: str = "homogeneous"  # "homogeneous", "rim" or "necrotic core"
    core: float = 0.0  # necrotic core radius (relative)
    t1_ms: float = 1150.0
    ktrans: float = 0.0
    ve: float = 0.3
    vp: float = 0.0

    @property
    def extent(self) -> float:
        """Largest distance (mm) from the centre that the lesion can reach."""
        body = self.radius * float(self.axes.max()) * self.outline_max
        return float(body + max((length for _, length, _ in self.spicules), default=0.0))

    def outline(self, directions: np.ndarray) -> np.ndarray:
        """Relative outline radius ``1 + perturbation`` along unit directions in the lesion frame ``(..., 3)``."""
        total = np.ones(directions.shape[:-1], np.float32)
        for coefficient, degree in zip(self.coefficients, self.degrees, strict=True):
            term = np.float32(coefficient)
            for axis in degree:
                term = term * directions[..., axis]
            total = total + term
        return total

    def local(self, offsets: np.ndarray) -> np.ndarray:
        """World offsets ``(..., 3)`` from the centre → lesion-frame coordinates scaled by radius and axes."""
        return (offsets @ self.rotation.astype(np.float32)) / (self.radius * self.axes).astype(np.float32)

    def surface_radius(self, direction: np.ndarray) -> float:
        """Distance (mm) from the centre to the mass surface along a world unit direction."""
        local = direction @ self.rotation / (self.radius * self.axes)
        norm = float(np.linalg.norm(local))
        return float(self.outline((local / norm)[None])[0]) / norm

    def normalised_radius(self, offsets: np.ndarray) -> np.ndarray:
        """``(...)`` radius relative to the outline: < 1 inside the mass."""
        q = self.local(offsets)
        rho = np.sqrt((q**2).sum(axis=-1))
        unit = q / np.maximum(rho, np.float32(1e-6))[..., None]
        return rho / self.outline(unit)

    def inside(self, offsets: np.ndarray) -> np.ndarray:
        """bool mask of points (world offsets from the centre, mm, ``(..., 3)``) in the mass or a spicule."""
        mask = self.normalised_radius(offsets) <= 1
        for direction, length, half_width in self.spicules:
            start = 0.7 * self.surface_radius(direction)
            along = offsets @ direction.astype(np.float32)
            across = np.sqrt(np.maximum((offsets**2).sum(axis=-1) - along**2, 0))
            taper = 1 - (along - start) / (self.surface_radius(direction) + length - start)
            mask |= (along >= start) & (taper > 0) & (across <= half_width * taper)
        return mask

    def enhancement_map(self, axes: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[tuple[slice, ...], np.ndarray]:
        """The relative enhancement (rim, core) on a grid given by its 1-D axes (mm), within the bounding box.

        Returns:
            ``(box, weight)``: index slices of the bounding box and the float32 weights inside it.
        """
        box, offsets = _box_offsets(self, axes)
        return box, self.enhancement_weight(offsets)

    def enhancement_weight(self, offsets: np.ndarray) -> np.ndarray:
        """Relative Ktrans/vp across the lesion (rim enhancement, necrotic core or 1), float32 ``(...)``."""
        nu = np.clip(self.normalised_radius(offsets), 0, 1)
        if self.pattern == "rim":
            return (0.45 + 0.75 * nu**2).astype(np.float32)
        if self.pattern == "necrotic core":
            return np.interp(nu, [0, self.core, self.core + 0.15, 1], [0.08, 0.08, 1.1, 1.1]).astype(np.float32)
        return np.ones(nu.shape, np.float32)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _monomials(max_degree: int) -> list[tuple[int, ...]]:
    return [d for n in range(2, max_degree + 1) for d in combinations_with_replacement(range(3), n)]


def sample_lesion_shape(rng: np.random.Generator, kind: str, radius: float) -> Lesion:
    """Draw a lesion's shape (not yet placed) with mean mass radius ``radius`` mm."""
    malignant = kind == "malignant"
    degrees = _monomials(4 if malignant else 2)
    coefficients = rng.normal(size=len(degrees))
    # normalise the perturbation to a target peak amplitude over directions
    probe = rng.normal(size=(400, 3))
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    lesion = Lesion(kind, np.zeros(3), radius, _random_rotation(rng), np.ones(3), coefficients, degrees)
    peak = float(np.abs(lesion.outline(probe.astype(np.float32)) - 1).max())
    lesion.coefficients = coefficients * (rng.uniform(0.2, 0.35) if malignant else rng.uniform(0.03, 0.08)) / peak
    lesion.outline_max = 1.02 * float(lesion.outline(probe.astype(np.float32)).max())
    elongation = rng.uniform(1.0, 1.3) if malignant else rng.uniform(1.2, 1.6)  # benign: oval
    lesion.axes = np.array([1.0, 1 / elongation, 1 / rng.uniform(1.0, elongation)])
    if malignant:
        for _ in range(int(rng.integers(5, 21))):
            direction = rng.normal(size=3)
            length = min(rng.uniform(2, 10), max(radius, 2.0))  # recipe 2-10 mm, but no longer than the mass radius
            lesion.spicules.append((direction / np.linalg.norm(direction), length, rng.uniform(0.5, 1.2)))
        lesion.pattern = str(rng.choice(["rim", "necrotic core", "homogeneous"], p=[0.45, 0.3, 0.25]))
        lesion.core = float(rng.uniform(0.3, 0.55))
    lesion.t1_ms = float(rng.uniform(*TUMOUR_T1_RANGE_MS))
    return lesion


def sample_kinetics(rng: np.random.Generator, lesion: Lesion, times_s: np.ndarray, early: int, late: int) -> str:
    """Draw Tofts parameters in the recipe ranges until the curve has its kind's shape; return the curve type.

    Malignant lesions must wash out (late < early by > 10 %), benign ones be persistent (late > early by
    > 10 %), judged on the signal of the lesion's own T1 and PD. Without a late phase any draw is accepted.

    Returns:
        ``"washout"``, ``"plateau"``, ``"persistent"`` or ``"n/a"`` (no late phase).
    """
    ranges = KINETIC_RANGES[lesion.kind]
    draws = 256
    ktrans = rng.uniform(*ranges["ktrans"], draws)
    ve = rng.uniform(*ranges["ve"], draws)
    vp = rng.uniform(*ranges["vp"], draws) if ranges["vp"][1] > 0 else np.zeros(draws)
    concentration = _tofts(times_s, ktrans, ve, vp)
    signal = spgr_signal(TUMOUR_PD, 1000.0 / lesion.t1_ms + RELAXIVITY_PER_S_PER_MM * concentration)
    if late <= early:
        lesion.ktrans, lesion.ve, lesion.vp = float(ktrans[0]), float(ve[0]), float(vp[0])
        return "n/a"
    change = (signal[:, late] - signal[:, early]) / signal[:, early]
    wanted = -change if lesion.kind == "malignant" else change
    choice = int(np.flatnonzero(wanted > 0.1)[0]) if (wanted > 0.1).any() else int(np.argmax(wanted))
    lesion.ktrans, lesion.ve, lesion.vp = float(ktrans[choice]), float(ve[choice]), float(vp[choice])
    return "washout" if change[choice] < -0.1 else "persistent" if change[choice] > 0.1 else "plateau"


def shrink(lesion: Lesion, factor: float) -> None:
    """Scale a lesion's size (mass radius and spicule lengths) in place; the result can go below 2.5 mm."""
    lesion.radius *= factor
    lesion.spicules = [(d, length * factor, width) for d, length, width in lesion.spicules]


def rasterise(lesion: Lesion, axes: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[tuple[slice, ...], np.ndarray]:
    """The lesion's voxels on a grid given by its 1-D axes (mm), within its bounding box.

    Returns:
        ``(box, mask)``: index slices of the bounding box and the bool mask inside it.
    """
    box, offsets = _box_offsets(lesion, axes)
    return box, lesion.inside(offsets)


def _box_offsets(
    lesion: Lesion, axes: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> tuple[tuple[slice, ...], np.ndarray]:
    reach = lesion.extent + 1.0
    box = []
    for axis, centre in zip(axes, lesion.centre, strict=True):
        start = int(np.searchsorted(axis, centre - reach))
        stop = int(np.searchsorted(axis, centre + reach, side="right"))
        box.append(slice(start, max(stop, start)))
    z, y, x = (a[b] - np.float32(c) for a, b, c in zip(axes, box, lesion.centre, strict=True))
    offsets = np.empty((z.size, y.size, x.size, 3), np.float32)
    offsets[..., 0] = z[:, None, None]
    offsets[..., 1] = y[None, :, None]
    offsets[..., 2] = x[None, None, :]
    return tuple(box), offsets


def sample_lesions(
    rng: np.random.Generator, count: int, kind: str, times: np.ndarray, early: int, late: int
) -> list[tuple[Lesion, str]]:
    """Draw ``count`` lesions (shape and kinetics, not yet placed) of a kind (``"random"``: each 50/50)."""
    lesions = []
    for _ in range(count):
        lesion_kind = kind if kind != "random" else str(rng.choice(["malignant", "benign"]))
        lesion = sample_lesion_shape(rng, lesion_kind, radius=rng.uniform(5, 40) / 2)
        curve = sample_kinetics(rng, lesion, times, early, late)
        lesions.append((lesion, curve))
    return lesions


def place_lesions(
    rng: np.random.Generator,
    lesions: list[tuple[Lesion, str]],
    body: anat.BodyModel,
    grid: Grid,
    tissue: np.ndarray,
    boxes: list[anat.BreastBox],
    scores: list[np.ndarray],
    candidates: list[np.ndarray],
) -> list[tuple[tuple[Lesion, str], float]]:
    """Put each lesion where FGT will grow, clear of skin, pectoralis and other lesions; carve it in ``tissue``.

    Returns:
        ``((lesion, curve), volume_ml)`` per lesion.
    """
    z_axis, y_axis, x_axis = grid.fine_axes()
    # a lesion voxel's 26 neighbours must be breast: keep one voxel diagonal plus a voxel in-plane clear
    margin = float(np.linalg.norm(grid.spacing)) + max(grid.spacing[1:]) + 0.5
    clearance = [_breast_clearance(tissue[box.slices], grid) for box in boxes]
    all_scores = np.concatenate([s[c] for s, c in zip(scores, candidates, strict=True)])
    likely_fgt = np.quantile(all_scores, 1 - min(body.fgt_target * 1.2, 0.95)) if all_scores.size else 0.0
    placed: list[tuple[tuple[Lesion, str], float]] = []
    room = max((float(c.max()) for c in clearance if c.size), default=0.0)
    for code_offset, (lesion, curve) in enumerate(lesions):
        if lesion.extent + margin > 0.9 * room:  # too big for these breasts: shrink to fit at once
            shrink(lesion, max(0.9 * room - margin, 0.0) / lesion.extent)
        centre = None
        while centre is None and lesion.radius >= MIN_LESION_RADIUS_MM:
            centre = _pick_centre(
                rng, boxes, clearance, scores, likely_fgt, lesion.extent + margin, placed, lesion, grid
            )
            if centre is None:
                shrink(lesion, 0.85)
        if centre is None:
            warnings.warn(
                f"only {len(placed)} of {len(lesions)} lesions fit in these breasts; use a larger field of view "
                "(shape × spacing) or fewer lesions",
                stacklevel=3,
            )
            break
        lesion.centre = centre
        box, mask = rasterise(lesion, (z_axis, y_axis, x_axis))
        view = tissue[box]
        mask &= view == anat.BREAST_FAT
        view[mask] = anat.LESION + code_offset
        placed.append(((lesion, curve), float(mask.sum()) * grid.fine_voxel_ml))
    return placed


def _breast_clearance(tissue_box: np.ndarray, grid: Grid) -> np.ndarray:
    """Distance (mm) from each fine voxel of a breast box to the nearest voxel that is not breast fat.

    Computed on every ``factor``-th in-plane voxel (the acquisition resolution) and repeated back: exact to
    within one acquisition voxel, which the caller's margin covers.
    """
    f = grid.factor
    inside = tissue_box[:, ::f, ::f] == anat.BREAST_FAT
    distance = ndi.distance_transform_edt(inside, sampling=grid.spacing).astype(np.float32)
    distance = distance.repeat(f, axis=1).repeat(f, axis=2)
    return distance[:, : tissue_box.shape[1], : tissue_box.shape[2]]


def _pick_centre(
    rng: np.random.Generator,
    boxes: list[anat.BreastBox],
    clearance: list[np.ndarray],
    scores: list[np.ndarray],
    likely_fgt: float,
    need: float,
    placed: list,
    lesion: Lesion,
    grid: Grid,
) -> np.ndarray | None:
    """A random fine-voxel centre (mm) with enough clearance, inside likely FGT when possible; None if none."""
    z_axis, y_axis, x_axis = grid.fine_axes()
    for prefer_fgt in (True, False):
        options = []
        for k, (room, score) in enumerate(zip(clearance, scores, strict=True)):
            ok = room >= need
            if prefer_fgt:
                ok &= score >= likely_fgt
            found = np.flatnonzero(ok)
            if found.size == 0:
                continue
            options.extend((k, i) for i in rng.choice(found, size=min(found.size, 64), replace=False))
        order = rng.permutation(len(options))
        for j in order:
            k, flat = options[j]
            box = boxes[k]
            iz, iy, ix = np.unravel_index(flat, box.sd.shape)
            centre = np.array(
                [
                    z_axis[box.slices[0]][iz],
                    y_axis[box.slices[1]][iy],
                    x_axis[box.slices[2]][ix],
                ],
                dtype=np.float64,
            )
            if all(
                np.linalg.norm(centre - other.centre) > other.extent + lesion.extent + 2 for (other, _), _ in placed
            ):
                return centre
    return None


def lesion_record(entry: tuple[Lesion, str], volume_ml: float, grid: Grid) -> dict:
    """The public description of a placed lesion (see :attr:`napari_mamba_seg.data.Phantom.lesion_info`)."""
    lesion, curve = entry
    centre_voxel = lesion.centre / np.asarray(grid.spacing) + (np.asarray(grid.shape) - 1) / 2
    return {
        "kind": lesion.kind,
        "centre": tuple(float(v) for v in centre_voxel),
        "radius_mm": float(np.cbrt(3 * volume_ml * 1000 / (4 * np.pi))),
        "extent_mm": lesion.extent,
        "volume_ml": volume_ml,
        "side": "left" if lesion.centre[2] > 0 else "right",
        "pattern": lesion.pattern,
        "spicules": len(lesion.spicules),
        "ktrans": lesion.ktrans,
        "ve": lesion.ve,
        "vp": lesion.vp,
        "curve": curve,
    }
