"""MR signal and contrast kinetics: spoiled gradient echo, Parker AIF, extended Tofts model.

Numbers follow /work/shared/phantom-recipe.md (see the module constants for each source). Values the recipe
does not give are marked "assumed" where they are defined.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from napari_mamba_seg.data import _anatomy as anat
from napari_mamba_seg.data._grid import Grid, smooth_modulation

FGT_PRE_CONTRAST_SIGNAL = 50.0
"""Mean pre-contrast FGT intensity (before bias and noise), as in the real UCSF-BR-06 case (about 47-52)."""

# --- sequence: fat-saturated 3D spoiled GRE (recipe: TR 4-5 ms, TE ~2 ms, flip 10-15 degrees) -----------------
TR_MS = 4.5
FLIP_ANGLE_DEG = 12.0
# TE ~ 2 ms is much shorter than tissue T2* (tens of ms), so the exp(-TE/T2*) factor is taken as 1.

# --- contrast agent (recipe: r1 ~ 4-5 /s/mM, 0.1 mmol/kg, Parker population AIF) ---------------------------------
RELAXIVITY_PER_S_PER_MM = 4.5
HAEMATOCRIT = 0.42  # Parker et al. 2006 convert blood to plasma concentration with Hct = 0.42
PARKER_AIF = {  # Parker et al., MRM 56:993 (2006), population average for 0.1 mmol/kg; times in minutes
    "A1": 0.809,
    "A2": 0.330,
    "T1": 0.17046,
    "T2": 0.365,
    "sigma1": 0.0563,
    "sigma2": 0.132,
    "alpha": 1.050,
    "beta": 0.1685,
    "s": 38.078,
    "tau": 0.483,
}


@dataclass(frozen=True)
class Tissue:
    """Relaxation and kinetic parameters of one tissue class.

    Attributes:
        t1_ms: Pre-contrast T1 in ms at ``{1.5: ..., 3.0: ...}`` tesla.
        pd: Relative proton density.
        ktrans: Transfer constant in 1/min (0 = does not enhance).
        ve: Extravascular extracellular volume fraction.
        vp: Plasma volume fraction.
        is_fat: Fat-saturation pulses suppress it.
        blood_pool: Follows the arterial (whole-blood) concentration instead of the Tofts model.
    """

    t1_ms: dict[float, float]
    pd: float
    ktrans: float = 0.0
    ve: float = 0.3
    vp: float = 0.0
    is_fat: bool = False
    blood_pool: bool = False


# Recipe table (Rakow-Penner, JMRI 2006 for T1; recipe PD list). "assumed": not in the recipe.
FAT = Tissue({1.5: 296.0, 3.0: 367.0}, pd=0.9, ktrans=0.003, ve=0.15, is_fat=True)  # kinetics assumed (~none)
FGT_T1 = {1.5: 1266.0, 3.0: 1445.0}
FGT_PD = 0.75
FGT_VE = 0.3  # assumed: the recipe gives only Ktrans 0.005-0.05 /min for background enhancement
MUSCLE = Tissue({1.5: 1000.0, 3.0: 1400.0}, pd=0.7, ktrans=0.03, ve=0.12)  # kinetics assumed
BLOOD = Tissue({1.5: 1450.0, 3.0: 1930.0}, pd=0.8, blood_pool=True)  # PD assumed
TUMOUR_PD = 0.8
TUMOUR_T1_RANGE_MS = (1000.0, 1300.0)
LUNG = Tissue({1.5: 1200.0, 3.0: 1300.0}, pd=0.05)  # T1 assumed; PD 0.05 makes it a signal void
SKIN = Tissue({1.5: 1100.0, 3.0: 1300.0}, pd=0.8, ktrans=0.05, ve=0.3)  # all assumed
BONE = Tissue({1.5: 296.0, 3.0: 367.0}, pd=0.3, is_fat=True)  # fatty marrow in a cortical shell; assumed
MYOCARDIUM = Tissue({1.5: 1000.0, 3.0: 1400.0}, pd=0.7, ktrans=0.3, ve=0.25, vp=0.1)  # kinetics assumed


def parker_blood_concentration(t_min: np.ndarray) -> np.ndarray:
    """Whole-blood gadolinium concentration (mM) of the Parker population AIF; 0 before injection (t < 0)."""
    t = np.asarray(t_min, dtype=np.float64)
    p = PARKER_AIF
    gauss = sum(
        p[f"A{i}"] / (p[f"sigma{i}"] * np.sqrt(2 * np.pi)) * np.exp(-0.5 * ((t - p[f"T{i}"]) / p[f"sigma{i}"]) ** 2)
        for i in (1, 2)
    )
    tail = p["alpha"] * np.exp(-p["beta"] * t) / (1 + np.exp(-p["s"] * (t - p["tau"])))
    return np.where(t >= 0, gauss + tail, 0.0)


def tofts_concentration(
    times_s: np.ndarray, ktrans: np.ndarray | float, ve: np.ndarray | float, vp: np.ndarray | float = 0.0
) -> np.ndarray:
    """Tissue concentration (mM) from the extended Tofts model driven by the Parker AIF.

    ``C(t) = vp Cp(t) + Ktrans ∫ Cp(τ) exp(-kep (t - τ)) dτ``, ``kep = Ktrans / ve``, ``Cp = Cb / (1 - Hct)``.

    Args:
        times_s: ``(T,)`` times after injection in seconds (values <= 0 give 0).
        ktrans: Transfer constant(s) in 1/min, scalar or ``(M,)``.
        ve: Extravascular extracellular fraction(s), scalar or ``(M,)``.
        vp: Plasma fraction(s), scalar or ``(M,)``.

    Returns:
        ``(M, T)`` float64 concentrations (``M = 1`` for scalar parameters).
    """
    times_min = np.asarray(times_s, dtype=np.float64) / 60.0
    ktrans, ve, vp = (np.atleast_1d(np.asarray(v, dtype=np.float64))[:, None] for v in (ktrans, ve, vp))
    t_end = max(float(times_min.max()), 0.0)
    dt = 0.5 / 60.0
    grid = np.arange(0.0, t_end + dt, dt)
    plasma = parker_blood_concentration(grid)[None, :] / (1 - HAEMATOCRIT)
    kep = ktrans / np.maximum(ve, 1e-6)
    # ∫0^t Cp(τ) e^{-kep (t-τ)} dτ = e^{-kep t} ∫0^t Cp(τ) e^{kep τ} dτ  (kep t <= ~40: no overflow in float64)
    weighted = plasma * np.exp(kep * grid[None, :])
    integral = np.concatenate([np.zeros_like(kep), np.cumsum((weighted[:, 1:] + weighted[:, :-1]) * dt / 2, axis=1)], 1)
    tissue = vp * plasma + ktrans * np.exp(-kep * grid[None, :]) * integral
    out = np.stack([np.interp(times_min, grid, row) for row in tissue])
    return np.where(times_min[None, :] > 0, out, 0.0)


def blood_concentration(times_s: np.ndarray) -> np.ndarray:
    """``(T,)`` whole-blood concentration (mM) at the given times after injection (seconds)."""
    return parker_blood_concentration(np.asarray(times_s, dtype=np.float64) / 60.0)


def spgr_signal(
    pd: np.ndarray | float, r1_per_s: np.ndarray | float, tr_ms: float = TR_MS, flip_deg: float = FLIP_ANGLE_DEG
) -> np.ndarray:
    """Spoiled gradient-echo steady state: ``PD sin α (1 - E1) / (1 - cos α E1)``, ``E1 = exp(-TR R1)``.

    Args:
        pd: Proton density (relative).
        r1_per_s: Longitudinal relaxation rate in 1/s.
        tr_ms: Repetition time in ms.
        flip_deg: Flip angle in degrees.

    Returns:
        Signal, broadcast shape of the inputs, float32 when the inputs are float32 arrays.
    """
    alpha = np.deg2rad(flip_deg)
    e1 = np.exp(-np.asarray(r1_per_s) * np.float32(tr_ms / 1000.0))
    return pd * np.float32(np.sin(alpha)) * (1 - e1) / (1 - np.float32(np.cos(alpha)) * e1)


def tissue_signal(tissue: Tissue, field_t: float, times_s: np.ndarray) -> np.ndarray:
    """``(T,)`` signal of a homogeneous tissue at each phase time (before fat saturation and gain)."""
    r10 = 1000.0 / tissue.t1_ms[field_t]
    if tissue.blood_pool:
        concentration = blood_concentration(times_s)
    elif tissue.ktrans > 0:
        concentration = tofts_concentration(times_s, tissue.ktrans, tissue.ve, tissue.vp)[0]
    else:
        concentration = np.zeros(len(times_s))
    return spgr_signal(tissue.pd, r10 + RELAXIVITY_PER_S_PER_MM * concentration)


def curve_type(signal: np.ndarray, early: int, late: int) -> str:
    """Kuhl curve type from the signal at an early and a late phase: persistent, plateau or washout (±10 %)."""
    change = (signal[..., late] - signal[..., early]) / signal[..., early]
    return np.where(change > 0.1, "persistent", np.where(change < -0.1, "washout", "plateau"))


@dataclass
class SignalInputs:
    """What the renderer needs, all on the acquisition grid ``(z, y, x)``.

    Attributes:
        counts: Sub-voxel count of each tissue code (uint8), from the fine tissue map.
        n_sub: Sub-voxels per voxel.
        field_t: Field strength in tesla (1.5 or 3.0).
        fat_sat: Fat suppression factor (0.05-0.3), or None for a non-fat-saturated image.
        fgt_ktrans: Mean background-enhancement Ktrans of FGT (1/min).
        fgt_modulation: Relative Ktrans of FGT voxel by voxel (around 1).
        ligament: Fraction of breast fat that is Cooper's ligament (fibrous).
        vessel: Fraction of breast fat and FGT that is blood vessel.
        lesions: ``(code, t1_ms, ktrans, ve, vp, box, weight)`` per lesion; ``weight`` is its relative enhancement
            inside ``box``.
    """

    counts: dict[int, np.ndarray]
    n_sub: int
    field_t: float
    fat_sat: np.ndarray | None
    fgt_ktrans: float
    fgt_modulation: np.ndarray
    ligament: np.ndarray
    vessel: np.ndarray
    lesions: list[tuple] = field(default_factory=list)


def render_phases(inputs: SignalInputs, times_s: np.ndarray, codes: dict[str, int]) -> np.ndarray:
    """Noiseless signal of every phase, in units of the pre-contrast FGT signal.

    Each voxel mixes its tissues by their sub-voxel fractions (partial volume).

    Args:
        inputs: Tissue fractions and spatial parameter fields.
        times_s: ``(T,)`` phase times after injection (<= 0: pre-contrast).
        codes: Tissue code of each name used here (from the anatomy module).

    Returns:
        ``(T, z, y, x)`` float32.
    """
    counts, field_t = inputs.counts, inputs.field_t
    shape = next(iter(counts.values())).shape
    empty = np.zeros(shape, np.uint8)
    fraction_scale = np.float32(1.0 / inputs.n_sub)

    def fraction(name: str) -> np.ndarray:
        return counts.get(codes[name], empty) * fraction_scale

    fgt_r10 = 1000.0 / FGT_T1[field_t]
    reference = float(spgr_signal(FGT_PD, fgt_r10))
    scalar = {
        "lung": LUNG,
        "body_skin": SKIN,
        "breast_skin": SKIN,
        "muscle": MUSCLE,
        "blood": BLOOD,
        "myocardium": MYOCARDIUM,
    }
    scalar_signal = {name: tissue_signal(t, field_t, times_s) / reference for name, t in scalar.items()}
    fat = tissue_signal(FAT, field_t, times_s) / reference
    bone = tissue_signal(BONE, field_t, times_s) / reference
    blood = scalar_signal["blood"]
    fgt_concentration = tofts_concentration(times_s, inputs.fgt_ktrans, FGT_VE)[0]
    fibrous = spgr_signal(FGT_PD, fgt_r10 + RELAXIVITY_PER_S_PER_MM * 0.5 * fgt_concentration) / reference
    fat_sat = np.float32(1.0) if inputs.fat_sat is None else inputs.fat_sat

    body_fat = fraction("body_fat") + fraction("mediastinum")
    bone_fraction = fraction("bone")
    breast_fat = fraction("breast_fat")
    fgt = fraction("fgt")
    fgt_where = np.nonzero(counts.get(codes["fgt"], empty))
    fgt_mod = inputs.fgt_modulation[fgt_where]
    fgt_vessel = inputs.vessel[fgt_where]
    fat_part = 1 - inputs.ligament - inputs.vessel
    lesion_curves = [tofts_concentration(times_s, *lesion[2:5])[0] for lesion in inputs.lesions]
    out = np.empty((len(times_s), *shape), np.float32)
    for p in range(len(times_s)):
        phase = np.zeros(shape, np.float32)
        for name, values in scalar_signal.items():
            if codes[name] in counts:
                phase += fraction(name) * np.float32(values[p])
        phase += fat_sat * (body_fat * np.float32(fat[p]) + bone_fraction * np.float32(bone[p]))
        phase += breast_fat * (
            fat_part * fat_sat * np.float32(fat[p])
            + inputs.ligament * np.float32(fibrous[p])
            + inputs.vessel * np.float32(blood[p])
        )
        r1 = np.float32(fgt_r10) + np.float32(RELAXIVITY_PER_S_PER_MM * fgt_concentration[p]) * fgt_mod
        fgt_signal = spgr_signal(np.float32(FGT_PD), r1) / np.float32(reference)
        phase[fgt_where] += fgt[fgt_where] * ((1 - fgt_vessel) * fgt_signal + fgt_vessel * np.float32(blood[p]))
        for (code, t1_ms, _, _, _, box, weight), concentration in zip(inputs.lesions, lesion_curves, strict=True):
            r1 = np.float32(1000.0 / t1_ms) + np.float32(RELAXIVITY_PER_S_PER_MM * concentration[p]) * weight
            signal = spgr_signal(np.float32(TUMOUR_PD), r1) / np.float32(reference)
            phase[box] += counts.get(code, empty)[box] * fraction_scale * signal
        out[p] = phase
    return out


def render(
    rng: np.random.Generator,
    fat_suppression: bool,
    field_strength: float,
    grid: Grid,
    counts: dict[int, np.ndarray],
    placed: list,
    times: np.ndarray,
    boxes: list[anat.BreastBox],
) -> np.ndarray:
    """Noiseless ``(T, z, y, x)`` float32 signal in image intensity units (pre-contrast FGT ≈ 50).

    Args:
        rng: Random generator.
        fat_suppression: Fat-saturated (fat × 0.05-0.3) or plain T1-weighted.
        field_strength: 1.5 or 3.0 tesla.
        grid: The grid.
        counts: Sub-voxel count of each tissue code on the acquisition grid.
        placed: ``((lesion, curve), volume_ml)`` per placed lesion; lesion ``i`` has code ``LESION + i``.
        times: ``(T,)`` phase times in s after injection.
        boxes: The breast boxes.

    Returns:
        ``(T, z, y, x)`` float32 noiseless signal.
    """
    axes = grid.acquisition_axes()
    shape = grid.shape
    fov_x = grid.fov[2]
    # the fat-saturation field is drawn even when unused, so both variants of a seed share every other draw
    centre, lateral = rng.uniform(0.05, 0.1), rng.uniform(0.15, 0.3)
    lateral_profile = np.clip(np.abs(axes[2]) / (fov_x / 2), 0, 1) ** 4  # fails towards the lateral edges
    modulation = smooth_modulation(rng, axes, wavelength_mm=120.0)
    fat_sat = None
    if fat_suppression:
        fat_sat = (centre + (lateral - centre) * lateral_profile)[None, None, :] * (1 + 0.15 * modulation)
        fat_sat = np.clip(fat_sat, 0.05, 0.3).astype(np.float32)
    fgt_modulation = 1 + 0.35 * smooth_modulation(rng, axes, wavelength_mm=60.0)
    window = anat.breast_window(grid, boxes)
    ligament, vessel = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    ligament[window], vessel[window] = anat.breast_texture(rng, grid, window)
    lesion_ktrans = [lesion.ktrans for (lesion, _), _ in placed]
    # background parenchymal enhancement: recipe Ktrans 0.005-0.05 /min, kept well below every lesion's
    fgt_ktrans = float(np.exp(rng.uniform(np.log(0.005), np.log(0.05))))
    if lesion_ktrans:
        fgt_ktrans = min(fgt_ktrans, 0.4 * min(lesion_ktrans))
    lesion_inputs = []
    for code_offset, ((lesion, _), _) in enumerate(placed):
        box, weight = lesion.enhancement_map(axes)
        lesion_inputs.append(
            (anat.LESION + code_offset, lesion.t1_ms, lesion.ktrans, lesion.ve, lesion.vp, box, weight)
        )
    inputs = SignalInputs(
        counts=counts,
        n_sub=grid.factor**2,
        field_t=field_strength,
        fat_sat=fat_sat,
        fgt_ktrans=fgt_ktrans,
        fgt_modulation=fgt_modulation.astype(np.float32),
        ligament=ligament,
        vessel=vessel,
        lesions=lesion_inputs,
    )
    codes = {
        "lung": anat.LUNG,
        "body_skin": anat.BODY_SKIN,
        "breast_skin": anat.BREAST_SKIN,
        "muscle": anat.MUSCLE,
        "blood": anat.BLOOD,
        "myocardium": anat.MYOCARDIUM,
        "body_fat": anat.BODY_FAT,
        "mediastinum": anat.MEDIASTINUM,
        "bone": anat.BONE,
        "breast_fat": anat.BREAST_FAT,
        "fgt": anat.FGT,
    }
    signal = render_phases(inputs, times, codes)
    signal *= np.float32(FGT_PRE_CONTRAST_SIGNAL)
    return signal
