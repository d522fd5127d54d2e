"""Prone torso and breast anatomy as a tissue map on the fine grid.

The body is built from analytic shapes in millimetres (see :mod:`napari_mamba_seg.data._grid` for the axes):

* the torso, an elliptic cylinder (recipe: about 32 × 22 cm) with, from outside in, skin (1.5-2 mm),
  subcutaneous fat (5-20 mm), the pectoralis muscle (10-15 mm), a chest wall of ribs and intercostal muscle
  (sternum in the middle), then the thorax: lungs (signal void), mediastinum and the heart;
* two pendant breasts, each a shape between a half-ellipsoid and a cone (300-1500 ml before scaling) that hangs
  anteriorly, with a nipple, merged smoothly into the torso;
* fibroglandular tissue (FGT): thresholded Gaussian-filtered noise weighted towards the nipple-chest-wall axis.

When the field of view is too narrow for two real breasts side by side (the default 256 × 0.7 mm = 179 mm is),
the breasts are scaled down uniformly so that both fit (``BodyModel.scale``; about 0.3-0.5 at the default
size, i.e. 3-12 % of the drawn volume); the torso keeps its real size and is cropped by the field of view,
and skin, fat and muscle thickness, texture and lesion sizes keep their physical size. The breast height is
capped to the slab.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from napari_mamba_seg.data._grid import (
    COARSE_PER_ACQUISITION,
    Grid,
    distance_to_zero_level,
    gaussian_random_field,
    upsample_inplane,
)

# tissue codes of the fine tissue map (uint8); lesion i has code LESION + i
AIR, LUNG, BODY_FAT, BODY_SKIN, BREAST_FAT, BREAST_SKIN, FGT, MUSCLE, BONE, BLOOD, MYOCARDIUM, MEDIASTINUM = range(12)
LESION = 16
MAX_LESIONS = 8
N_TISSUE_CODES = LESION + MAX_LESIONS

# phantom label of each tissue code: 0 background, 1 breast (adipose), 2 FGT, 3 lesion, 4 muscle
TISSUE_TO_LABEL = np.zeros(N_TISSUE_CODES, np.uint8)
TISSUE_TO_LABEL[BREAST_FAT] = 1  # breast skin and nipple stay 0: label 1 is the tissue inside the skin
TISSUE_TO_LABEL[FGT] = 2
TISSUE_TO_LABEL[LESION:] = 3
TISSUE_TO_LABEL[MUSCLE] = 4

# ACR BI-RADS breast density classes -> FGT fraction drawn for the phantom (the class bounds are a < 25 %,
# b 25-50 %, c 51-75 %, d > 75 %; the drawn targets keep a margin from the bounds)
DENSITY_TARGET_RANGE = {"a": (0.06, 0.21), "b": (0.29, 0.46), "c": (0.55, 0.71), "d": (0.79, 0.86)}


@dataclass
class Breast:
    """One pendant breast, in mm. The axis starts at the base centre and points anteriorly, tilted outwards."""

    side: int  # +1 patient left (x > 0), -1 patient right
    centre_x: float
    base_y: float
    centre_z: float
    a: float  # half width (x)
    b: float  # projection along the axis (anterior)
    c: float  # half height (z)
    b_back: float  # how far the base bulges into the torso
    profile_q: float  # 2 = half-ellipsoid, 1 = cone
    tilt: float  # outward tilt of the axis (radians)
    lobes: tuple[float, float, float, float]  # cos(2φ), cos(3φ) amplitudes and phases of the outline
    nipple_radius: float
    nipple_height: float
    footprint_a: float  # breast region on the chest wall: ellipse in (x, z)
    footprint_c: float

    @property
    def axis(self) -> np.ndarray:
        """Unit axis direction ``(x, -y)`` components: outwards-lateral and anterior."""
        return np.array([self.side * np.sin(self.tilt), np.cos(self.tilt)])


@dataclass
class BodyModel:
    """Sampled anatomy: every size in mm, already scaled to the field of view."""

    scale: float
    torso_a: float
    torso_b: float
    torso_centre_y: float
    skin: float
    fat: float
    muscle: float
    muscle_z_gain: float
    chest_wall: float
    sternum_half_width: float
    rib_period: float
    rib_angle: float
    rib_phase: float
    rib_half_length: float
    heart_centre: tuple[float, float, float]  # (z, y, x)
    heart_axes: tuple[float, float, float]
    myocardium: float
    mediastinum_half_width: float
    fold_radius: float
    breasts: list[Breast] = field(default_factory=list)
    fgt_target: float = 0.3
    fgt_correlation: float = 6.0
    fgt_axis_weight: float = 1.0
    fgt_axis_width: float = 0.55
    premammary: float = 2.0
    retromammary: float = 2.0

    def torso_surface_y(self, x: np.ndarray | float) -> np.ndarray:
        """y (mm) of the torso's anterior surface at lateral position ``x``."""
        inside = np.clip(1 - (np.asarray(x) / self.torso_a) ** 2, 0, 1)
        return self.torso_centre_y - self.torso_b * np.sqrt(inside)


def _profile_volume_integral(q: float) -> float:
    """∫0^1 (1 - u^q)^(2/q) du: volume of a breast of unit a, b, c divided by π."""
    u = np.linspace(0, 1, 401)
    return float(np.trapezoid((1 - u**q) ** (2 / q), u))


def sample_body(rng: np.random.Generator, grid: Grid, density: str) -> BodyModel:
    """Draw an anatomy that fits the grid's field of view.

    Args:
        rng: Random generator.
        grid: The acquisition grid.
        density: ACR class ``"a"``-``"d"``.

    Returns:
        The body model in mm (centred coordinates).
    """
    fov_z, fov_y, fov_x = grid.fov
    torso_a, torso_b = rng.uniform(150, 170), rng.uniform(100, 120)
    volume_ml = rng.uniform(300, 1500)
    skin, fat, muscle, chest_wall = rng.uniform(1.5, 2.0), rng.uniform(5, 20), rng.uniform(10, 15), rng.uniform(8, 12)
    shapes = []
    for side in (-1, 1):
        q, k_b, k_c = rng.uniform(1.4, 2.2), rng.uniform(0.9, 1.4), rng.uniform(0.85, 1.05)  # prone: pendant
        volume = volume_ml * 1000 * rng.uniform(0.92, 1.08)
        a = (volume / (np.pi * k_b * k_c * _profile_volume_integral(q))) ** (1 / 3)
        tilt = np.deg2rad(rng.uniform(0, 12))
        shapes.append({"side": side, "q": q, "a": a, "b": k_b * a, "c": k_c * a, "tilt": tilt})
    gap = rng.uniform(15, 35)
    nipple = (rng.uniform(4, 6), rng.uniform(4, 8))

    # half width of the two footprints at scale 1, without the fixed millimetre margins (13 mm)
    half_width = max(gap / 2 + 2 * sh["a"] + 2 * sh["b"] * np.sin(sh["tilt"]) for sh in shapes)
    scale = min(1.0, (0.48 * fov_x - 13) / half_width)
    # anterior-posterior room: margin + breast + fat + muscle + chest wall + some thorax
    depth_needed = max(sh["b"] + nipple[1] for sh in shapes)
    room = 0.8 * fov_y - 10 - fat - muscle - chest_wall
    scale = float(max(min(scale, room / depth_needed), 0.1))

    body = BodyModel(
        scale=scale,
        torso_a=torso_a,
        torso_b=torso_b,
        torso_centre_y=0.0,
        skin=skin,
        fat=fat,
        muscle=muscle,
        muscle_z_gain=rng.uniform(0.0, 0.4),
        chest_wall=chest_wall,
        sternum_half_width=15.0,
        rib_period=rng.uniform(24, 30),
        rib_angle=np.deg2rad(rng.uniform(55, 70)),
        rib_phase=rng.uniform(0, 1),
        rib_half_length=rng.uniform(7, 10),
        heart_centre=(0.0, 0.0, 0.0),
        heart_axes=(50.0, 40.0, 55.0),
        myocardium=8.0,
        mediastinum_half_width=25.0,
        fold_radius=6 * scale + 2,
    )
    breasts = []
    half_gap = gap * scale / 2
    for sh in shapes:
        a, b = sh["a"] * scale, sh["b"] * scale
        c = min(sh["c"] * scale, 0.42 * fov_z)
        reach = b * np.sin(sh["tilt"]) + 3
        footprint_a = a + reach
        centre_x = sh["side"] * (half_gap + reach + 3 + a)
        breasts.append(
            Breast(
                side=sh["side"],
                centre_x=float(centre_x),
                base_y=0.0,
                centre_z=float(rng.uniform(-0.05, 0.05) * fov_z),
                a=float(a),
                b=float(b),
                c=float(c),
                b_back=float(0.25 * b),
                profile_q=float(sh["q"]),
                tilt=float(sh["tilt"]),
                lobes=(rng.uniform(0, 0.05), rng.uniform(0, 0.04), rng.uniform(0, np.pi), rng.uniform(0, np.pi)),
                nipple_radius=float(nipple[0] * max(scale, 0.6)),
                nipple_height=float(nipple[1] * max(scale, 0.6)),
                footprint_a=float(footprint_a),
                footprint_c=float(c + 3),
            )
        )
    # place the torso so that the most anterior nipple sits a margin below the top of the field of view
    top = -fov_y / 2 + rng.uniform(6, 12)
    body.torso_centre_y = 0.0
    offsets = []
    for br in breasts:
        surface = float(body.torso_surface_y(br.centre_x))  # with centre_y = 0
        base = surface + 0.1 * br.b
        offsets.append(base - br.b * np.cos(br.tilt) - br.nipple_height)
    body.torso_centre_y = float(top - min(offsets))
    for br in breasts:
        br.base_y = float(body.torso_surface_y(br.centre_x) + 0.1 * br.b)
    heart_y = body.torso_centre_y - body.torso_b + fat + muscle + chest_wall + body.heart_axes[1] + 4
    body.heart_centre = (-0.3 * fov_z, float(heart_y), 0.3 * body.torso_a)
    body.breasts = breasts
    lo, hi = DENSITY_TARGET_RANGE[density]
    body.fgt_target = float(rng.uniform(lo, hi))
    body.fgt_correlation = float(rng.uniform(3, 10))
    body.fgt_axis_weight = float(rng.uniform(0.8, 1.5))
    body.fgt_axis_width = float(rng.uniform(0.45, 0.7))
    # fat layers under the skin and in front of the pectoralis that stay free of FGT: thin in dense breasts
    layer = {"a": (1.5, 4.0), "b": (1.5, 4.0), "c": (0.5, 1.5), "d": (0.0, 0.5)}[density]
    body.premammary = float(rng.uniform(*layer))
    body.retromammary = float(rng.uniform(*layer))
    return body


def torso_signed_distance(body: BodyModel, grid: Grid) -> np.ndarray:
    """``(Y, X)`` signed distance (mm, negative inside) to the torso outline on the fine in-plane grid."""
    _, y, x = grid.fine_axes()
    inside = (x[None, :] / body.torso_a) ** 2 + ((y[:, None] - body.torso_centre_y) / body.torso_b) ** 2 <= 1
    sampling = grid.fine_spacing[1:]
    outside_distance = ndi.distance_transform_edt(~inside, sampling=sampling)
    inside_distance = ndi.distance_transform_edt(inside, sampling=sampling)
    return (outside_distance - inside_distance).astype(np.float32)


def torso_tissue(body: BodyModel, grid: Grid, torso_sd: np.ndarray) -> np.ndarray:
    """The fine tissue map of the torso alone (no breasts), built slice by slice.

    Args:
        body: The anatomy.
        grid: The grid.
        torso_sd: ``(Y, X)`` torso signed distance from :func:`torso_signed_distance`.

    Returns:
        ``(Z, Y, X)`` uint8 tissue codes.
    """
    z_axis, y, x = grid.fine_axes()
    depth = -torso_sd
    tissue = np.empty(grid.fine_shape, np.uint8)
    fov_z = grid.fov[0]
    medial = np.abs(x)[None, :] < body.sternum_half_width
    mediastinum = np.abs(x)[None, :] < body.mediastinum_half_width
    hz, hy, hx = body.heart_centre
    ha, hb, hc = body.heart_axes
    heart_plane = ((x[None, :] - hx) / ha) ** 2 + ((y[:, None] - hy) / hb) ** 2
    outer = np.select([depth < 0, depth < body.skin, depth < body.fat], [AIR, BODY_SKIN, BODY_FAT], default=255).astype(
        np.uint8
    )
    abs_x = np.abs(x)[None, :]
    for k, z in enumerate(z_axis):
        muscle_end = body.fat + body.muscle * (1 + body.muscle_z_gain * (z / fov_z))
        wall_end = muscle_end + body.chest_wall
        # ribs: oblique bars cut by the slice → ovals along the chest wall, one every rib_period / sin(angle) mm
        turns = (z * np.cos(body.rib_angle) + abs_x * np.sin(body.rib_angle)) / body.rib_period + body.rib_phase
        along = (turns - np.round(turns)) * body.rib_period / np.sin(body.rib_angle)
        across = depth - (muscle_end + body.chest_wall / 2)
        rib = (along / body.rib_half_length) ** 2 + (across / (0.4 * body.chest_wall)) ** 2 <= 1
        heart = heart_plane + ((z - hz) / hc) ** 2
        blood = heart <= (1 - body.myocardium / min(ha, hb)) ** 2
        slice_ = outer.copy()
        deep = slice_ == 255
        thorax = np.select(
            [blood, heart <= 1, mediastinum & (depth < wall_end + 20)], [BLOOD, MYOCARDIUM, MEDIASTINUM], default=LUNG
        ).astype(np.uint8)
        wall = np.where(medial | rib, BONE, MUSCLE).astype(np.uint8)
        pectoralis = np.where(medial, BONE, MUSCLE).astype(np.uint8)
        layered = np.where(depth < muscle_end, pectoralis, np.where(depth < wall_end, wall, thorax))
        slice_[deep] = layered[deep]
        tissue[k] = slice_
    return tissue


@dataclass
class BreastBox:
    """Fine-grid arrays of one breast's bounding box (all ``(z, y, x)`` float32 unless said)."""

    breast: Breast
    slices: tuple[slice, slice, slice]  # box in the fine grid
    sd: np.ndarray  # signed distance (mm) to the body surface (torso ∪ breast)
    depth: np.ndarray  # depth below the torso outline (mm), broadcastable (1, y, x)
    footprint_clearance: np.ndarray  # approximate distance (mm) to the footprint edge, (z, 1, x); > 0 inside
    radial: np.ndarray  # position across the breast's cross-section: 0 on the axis, 1 on the surface
    nipple: np.ndarray  # bool: inside the nipple


def _breast_implicit(br: Breast, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, ...]:
    """Implicit breast and nipple functions (< 0 inside) and the radial position, on broadcast coordinates."""
    dx, dy, dz = x - br.centre_x, br.base_y - y, z - br.centre_z
    sin_t, cos_t = np.float32(br.side * np.sin(br.tilt)), np.float32(np.cos(br.tilt))
    lateral = dx * cos_t - dy * sin_t
    along = dx * sin_t + dy * cos_t
    xi, zeta = lateral / br.a, dz / br.c
    rho = np.sqrt(xi**2 + zeta**2)
    phi = np.arctan2(zeta, xi)
    e2, e3, p2, p3 = br.lobes
    rho = rho * (1 + e2 * np.cos(2 * (phi - p2)) + e3 * np.cos(3 * (phi - p3)))
    u = along / br.b
    profile = (1 - np.clip(u, 0, 1) ** br.profile_q) ** (1 / br.profile_q)
    front = np.maximum(rho - profile, u - 1)
    back = np.sqrt(rho**2 + (u * br.b / br.b_back) ** 2) - 1
    implicit = np.where(u >= 0, front, back)
    radial = np.where(u >= 0, rho / np.maximum(profile, 0.05), rho)
    nipple = np.sqrt(
        (lateral / br.nipple_radius) ** 2 + (dz / br.nipple_radius) ** 2 + ((along - br.b) / br.nipple_height) ** 2
    ) - np.float32(1)
    return implicit.astype(np.float32), nipple.astype(np.float32), radial.astype(np.float32)


def _signed_distance(implicit: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """First-order signed distance ``f / |grad f|`` of an implicit function (mm)."""
    gradient = np.gradient(implicit, *spacing)
    norm = np.sqrt(gradient[0] ** 2 + gradient[1] ** 2 + gradient[2] ** 2) + np.float32(1e-6)
    return implicit / norm


def _smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum (round fillet of radius ~k where the two surfaces meet)."""
    h = np.maximum(k - np.abs(a - b), 0) / k
    return np.minimum(a, b) - h * h * k / 4


def _index_range(axis: np.ndarray, lo: float, hi: float) -> slice:
    """Indices of a sorted coordinate axis inside ``[lo, hi]`` (at least one)."""
    start = int(np.searchsorted(axis, lo))
    stop = int(np.searchsorted(axis, hi, side="right"))
    start = min(max(start, 0), axis.size - 1)
    return slice(start, max(stop, start + 1))


def breast_box(body: BodyModel, br: Breast, grid: Grid, torso_sd: np.ndarray) -> BreastBox:
    """Evaluate one breast on its bounding box of the fine grid."""
    z, y, x = grid.fine_axes()
    x_lo, x_hi = br.centre_x - br.footprint_a - 4, br.centre_x + br.footprint_a + 4
    lateral_x = np.array([x_lo, x_hi, br.centre_x])
    y_lo = br.base_y - br.b - br.nipple_height - 6
    y_hi = float(np.max(body.torso_surface_y(np.clip(lateral_x, -body.torso_a, body.torso_a)))) + body.fat + 2
    box = (
        _index_range(z, br.centre_z - br.footprint_c - 3, br.centre_z + br.footprint_c + 3),
        _index_range(y, y_lo, y_hi),
        _index_range(x, x_lo, x_hi),
    )
    zb, yb, xb = z[box[0]][:, None, None], y[box[1]][None, :, None], x[box[2]][None, None, :]
    implicit, nipple_implicit, radial = _breast_implicit(br, zb, yb, xb)
    spacing = grid.fine_spacing
    breast_sd = _smooth_min(_signed_distance(implicit, spacing), _signed_distance(nipple_implicit, spacing), 1.0)
    torso = torso_sd[box[1], box[2]][None]
    sd = _smooth_min(torso, breast_sd, body.fold_radius)
    footprint = np.sqrt(((xb - br.centre_x) / br.footprint_a) ** 2 + ((zb - br.centre_z) / br.footprint_c) ** 2)
    clearance = (1 - footprint) * min(br.footprint_a, br.footprint_c)
    return BreastBox(br, box, sd, -torso, clearance.astype(np.float32), radial, nipple_implicit < 0)


def breast_tissue(body: BodyModel, box: BreastBox) -> np.ndarray:
    """Tissue codes of a breast box where the torso alone would give skin or subcutaneous fat.

    Returns:
        ``(z, y, x)`` uint8 codes, 255 where the torso's own tissue (muscle and deeper) stays.
    """
    inside = box.sd < 0
    skin = inside & ((box.sd > -body.skin) | box.nipple)
    in_footprint = box.footprint_clearance > 0
    codes = np.where(
        inside,
        np.where(skin, np.where(in_footprint, BREAST_SKIN, BODY_SKIN), np.where(in_footprint, BREAST_FAT, BODY_FAT)),
        AIR,
    ).astype(np.uint8)
    codes[np.broadcast_to(box.depth >= body.fat, codes.shape)] = 255
    return codes


def fgt_score(
    rng: np.random.Generator, body: BodyModel, grid: Grid, boxes: list[BreastBox]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Where FGT grows: smooth noise plus a weight towards the nipple-chest-wall axis, per breast box.

    Returns:
        ``(scores, candidates)``: per box the float32 score and the bool mask of voxels that may become FGT
        (breast fat away from the skin and the pectoralis).
    """
    coarse = gaussian_random_field(rng, grid.coarse_shape, grid.coarse_spacing, body.fgt_correlation)
    fine_detail = gaussian_random_field(rng, grid.coarse_shape, grid.coarse_spacing, body.fgt_correlation / 2.5)
    noise = coarse + 0.5 * fine_detail
    ratio = grid.factor * 2
    scores, candidates = [], []
    for box in boxes:
        sz, sy, sx = box.slices
        window = upsample_inplane(noise[sz], ratio, (sy.start, sy.stop), (sx.start, sx.stop))
        axis_weight = np.exp(-0.5 * (box.radial / body.fgt_axis_width) ** 2)
        scores.append(window + np.float32(body.fgt_axis_weight) * axis_weight)
        candidates.append(
            (box.sd < -(body.skin + body.premammary))
            & (box.depth < body.fat - body.retromammary)
            & (box.footprint_clearance > 0)
        )
    return scores, candidates


def build_anatomy(body: BodyModel, grid: Grid) -> tuple[np.ndarray, list[BreastBox]]:
    """Fine tissue map of torso and breasts (FGT and lesions come later) and the breast boxes."""
    torso_sd = torso_signed_distance(body, grid)
    tissue = torso_tissue(body, grid, torso_sd)
    boxes = [breast_box(body, breast, grid, torso_sd) for breast in body.breasts]
    for box in boxes:
        codes = breast_tissue(body, box)
        view = tissue[box.slices]
        keep = codes != 255
        view[keep] = codes[keep]
    return tissue, boxes


def grow_fgt(
    body: BodyModel,
    tissue: np.ndarray,
    boxes: list[BreastBox],
    scores: list[np.ndarray],
    candidates: list[np.ndarray],
) -> float:
    """Turn the highest-scoring candidate breast fat into FGT to reach the target fraction; return the fraction."""
    views = [tissue[box.slices] for box in boxes]
    breast_total = 0
    for view in views:
        label = TISSUE_TO_LABEL[view]
        breast_total += int(((label >= 1) & (label <= 3)).sum())
    free = [c & (v == BREAST_FAT) for c, v in zip(candidates, views, strict=True)]
    values = np.concatenate([s[f] for s, f in zip(scores, free, strict=True)])
    wanted = round(body.fgt_target * breast_total)
    if values.size == 0 or wanted <= 0:
        return 0.0
    cut = values.size - wanted
    threshold = -np.inf if cut <= 0 else np.partition(values, cut)[cut]
    grown = 0
    for view, score, mask in zip(views, scores, free, strict=True):
        fgt = mask & (score >= threshold)
        view[fgt] = FGT
        grown += int(fgt.sum())
    return grown / max(breast_total, 1)


def breast_window(grid: Grid, boxes: list[BreastBox]) -> tuple[slice, slice, slice]:
    """Acquisition-grid window (z, y, x) that covers both breast boxes."""
    f = grid.factor
    z0 = min(b.slices[0].start for b in boxes)
    z1 = max(b.slices[0].stop for b in boxes)
    y0 = min(b.slices[1].start for b in boxes) // f
    y1 = -(-max(b.slices[1].stop for b in boxes) // f)
    x0 = min(b.slices[2].start for b in boxes) // f
    x1 = -(-max(b.slices[2].stop for b in boxes) // f)
    return slice(z0, z1), slice(y0, y1), slice(x0, x1)


def breast_texture(
    rng: np.random.Generator, grid: Grid, window: tuple[slice, slice, slice]
) -> tuple[np.ndarray, np.ndarray]:
    """Cooper's ligaments (0.3-1 mm sheets) and vessels (1-4 mm tubes) as voxel fractions in the breast window.

    Sheets are the zero level set of one smooth random field, tubes the crossing of the zero sets of two; the
    fraction of a voxel they fill follows from their thickness and the voxel's extent across them.
    """
    zs, ys, xs = window
    c = COARSE_PER_ACQUISITION
    cy = slice(ys.start // c, -(-ys.stop // c) + 1)
    cx = slice(xs.start // c, -(-xs.stop // c) + 1)
    coarse_shape = (zs.stop - zs.start, cy.stop - cy.start, cx.stop - cx.start)
    spacing = np.asarray(grid.spacing, np.float32)

    def field_window(correlation: float) -> tuple[np.ndarray, np.ndarray]:
        values = gaussian_random_field(rng, coarse_shape, grid.coarse_spacing, correlation)
        distance, normal = distance_to_zero_level(values, grid.coarse_spacing)
        extent = np.sqrt(((normal * spacing[:, None, None, None]) ** 2).sum(axis=0))
        rows = (ys.start - cy.start * c, ys.stop - cy.start * c)
        cols = (xs.start - cx.start * c, xs.stop - cx.start * c)
        return tuple(upsample_inplane(v, c, rows, cols) for v in (distance, extent))

    thickness = rng.uniform(0.3, 1.0)
    distance, extent = field_window(rng.uniform(6, 12))
    ligament = np.minimum(1, thickness / (0.886 * extent)) * np.exp(-((2 * distance / extent) ** 2))
    radius = rng.uniform(0.5, 2.0)
    vessel_correlation = rng.uniform(10, 16)
    d_a, _ = field_window(vessel_correlation)
    d_b, _ = field_window(vessel_correlation)
    keep, _ = field_window(25.0)
    voxel = float(np.cbrt(np.prod(grid.spacing)))
    core = np.sqrt(d_a**2 + d_b**2)
    vessel = np.clip((radius + voxel / 2 - core) / voxel, 0, 1) * min(1.0, (2 * radius / voxel) ** 2)
    vessel *= keep > 0  # only some stretches of the crossing curves are vessels
    ligament = np.minimum(ligament, 1 - vessel)
    return ligament.astype(np.float32), vessel.astype(np.float32)
