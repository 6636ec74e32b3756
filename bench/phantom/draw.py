"""Drawing one patient's slices in Hounsfield units from its plan."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from scipy import ndimage

from bench.phantom.plan import AIR, FAT, LUNG, MUSCLE, SITE_BY_NAME, PatientPlan

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Drawing (all in millimetres; x towards the patient's left, y towards the back, as DICOM LPS rows/columns)


def _ell(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_px: float) -> np.ndarray:
    """Zero-mean, unit-sd Gaussian random field (per slice) with correlation length `sigma_px`."""
    n = rng.standard_normal(shape).astype(np.float32)
    if sigma_px > 0.3:
        sig = (0,) * (len(shape) - 2) + (sigma_px, sigma_px)
        n = ndimage.gaussian_filter(n, sig, mode="wrap")
        n /= _gauss_gain(sigma_px)
    return n


def _gauss_gain(sigma: float) -> float:
    """sd of white noise after a 2-D Gaussian filter (exact for scipy's truncated discrete kernel)."""
    r = int(4.0 * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    return float((k**2).sum())


def render_patient(plan: PatientPlan, slices: int, size: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The series of `plan` in Hounsfield units, float32 [slices, size, size], before quantization, and its
    geometry (pixel spacing, slice positions, the lesion body and its visible part `mask`, bool
    [slices, size, size]). Written pixels are `round(hu)` clipped to the CT range, minus the site's rescale
    intercept."""
    site = SITE_BY_NAME[plan.site]
    rng = np.random.default_rng([seed, plan.index, 1])
    ce = plan.contrast == "CE"
    spacing = site.fov_mm / size
    c = (np.arange(size, dtype=np.float32) - (size - 1) / 2) * spacing
    x = c[None, None, :]
    y = c[None, :, None]
    k_idx = np.arange(slices, dtype=np.float32) - (slices - 1) / 2
    z = (k_idx * site.thickness_mm)[:, None, None]  # relative slice positions (mm)
    shape = (slices, size, size)

    # Body habitus: men larger; weight varies independently (fat layer).
    scale = (1.0 if plan.sex == "M" else 0.9) * rng.uniform(0.9, 1.08)
    fat_mm = rng.uniform(8, 30) * (1.0 if plan.sex == "M" else 1.15)
    bx, by = 150 * scale + fat_mm, 105 * scale + fat_mm
    oy = rng.uniform(-8, 8)  # patient not exactly centred on the table
    ox = rng.uniform(-6, 6)
    X, Y = x - ox, y - oy
    blood = rng.uniform(200, 300) if ce else rng.uniform(35, 48)
    muscle = MUSCLE + (rng.uniform(5, 15) if ce else 0)

    hu = np.full(shape, AIR, dtype=np.float32)
    hu[np.broadcast_to(_ell(X, Y, 0, 0, bx, by), shape)] = FAT
    mx, my = bx - fat_mm, by - fat_mm
    hu[np.broadcast_to(_ell(X, Y, 0, 0, mx, my), shape)] = muscle
    cx_, cy_ = mx - 12 * scale, my - 14 * scale  # thoracic cavity, with a thicker back wall
    cav_y = -6 * scale
    cavity = _ell(X, Y, 0, cav_y, cx_, cy_)
    hu[np.broadcast_to(cavity, shape)] = -90.0  # mediastinal fat fills whatever is not drawn below

    # Lungs with vessels that run through adjacent slices.
    lung_ax, lung_ay, lung_y = 0.40 * cx_, 0.88 * cy_, cav_y + 6
    lungs = _ell(X, Y, -0.57 * cx_, lung_y, lung_ax, lung_ay) | _ell(
        X, Y, 0.57 * cx_, lung_y, lung_ax, lung_ay
    )
    lungs &= cavity
    lung_val = LUNG + rng.uniform(-30, 30)
    hu[np.broadcast_to(lungs, shape)] = lung_val
    nv = 36
    side = np.where(rng.random(nv) < 0.5, -1.0, 1.0)
    vx = side * 0.57 * cx_ + rng.uniform(-0.8, 0.8, nv) * lung_ax
    vy = lung_y + rng.uniform(-0.85, 0.85, nv) * lung_ay
    vr = rng.uniform(1.0, 3.2, nv) * scale
    dxz, dyz = rng.normal(0, 0.25, nv), rng.normal(0, 0.25, nv)  # drift per mm along z
    vessel_val = blood * 0.9 if ce else 35.0
    for i in range(nv):
        m = ((X - (vx[i] + dxz[i] * z)) ** 2 + (Y - (vy[i] + dyz[i] * z)) ** 2) <= vr[i] ** 2
        m &= np.broadcast_to(lungs, shape)
        hu[m] = vessel_val

    # Mediastinal structures (pulmonary trunk level).
    s = scale
    zz = z / 40.0  # structures drift a little from slice to slice
    heart = _ell(X, Y, 22 * s, (28 - 20 * zz) * s, 48 * s, 36 * s)  # heart top, larger towards the feet
    heart &= np.broadcast_to(_ell(X, Y, 22 * s, 28 * s, 60 * s, 60 * s) & (-5 * s < Y), shape)
    hu[heart] = blood * 0.97 if ce else 38.0
    vessels = [
        (-8 * s, -12 * s, 15 * s, blood),  # ascending aorta
        (-34 * s, -10 * s, 9 * s, blood * 1.1 if ce else blood),  # superior vena cava
        (20 * s, -18 * s, 14 * s, blood * 0.95),  # pulmonary trunk
        (24 * s, 50 * s, 12 * s, blood),  # descending aorta
    ]
    for vx0, vy0, r, v in vessels:
        hu[np.broadcast_to(_ell(X, Y, vx0, vy0, r, r), shape)] = v
    hu[np.broadcast_to(_ell(X, Y, 0, 18 * s, 8 * s, 7 * s), shape)] = AIR + 40  # trachea / carina
    hu[np.broadcast_to(_ell(X, Y, 7 * s, 38 * s, 6 * s, 5 * s), shape)] = 45.0  # oesophagus

    # Thymus: anterior mediastinum, soft tissue in the young, replaced by fat with age.
    fat_frac = float(np.clip((plan.age - 22) / 28, 0.0, 0.95))
    t_scale = 1.0 - 0.45 * np.clip((plan.age - 20) / 50, 0, 1)
    thy_y = cav_y - 0.62 * cy_ + 3
    thymus = _ell(X, Y, -3 * s, thy_y, 20 * s * t_scale, 10 * s * t_scale)
    thy_val = (1 - fat_frac) * (38 + (8 if ce else 0)) + fat_frac * -85
    mottle = _smooth_noise(rng, shape, 1.5 / spacing) * (12 + 20 * fat_frac * (1 - fat_frac) * 4)
    tm = np.broadcast_to(thymus, shape)
    hu[tm] = (thy_val + mottle)[tm]

    # Lesion (painted before bone so the spine keeps its contour).
    lesion = _draw_lesion(hu, plan.label, rng, X, Y, z, s, cav_y, cy_, ce, spacing, shape, slices, site)

    # Spine, sternum, ribs. What they cover of the lesion is no longer lesion: the mask is what an annotator sees.
    bone = np.zeros(hu.shape[1:], dtype=bool)

    def paint(m: np.ndarray, v: float) -> None:
        nonlocal bone
        hu[np.broadcast_to(m, shape)] = v
        bone = bone | m[0]

    vb_y, vb_r = cav_y + 0.74 * cy_, 15 * s
    vb = _ell(X, Y, 0, vb_y, vb_r, vb_r * 0.9)
    paint(vb, rng.uniform(620, 720))
    paint(_ell(X, Y, 0, vb_y, vb_r - 2.2, vb_r * 0.9 - 2.2), rng.uniform(180, 280))
    canal_y = vb_y + vb_r * 0.9 + 7 * s
    paint(_ell(X, Y, 0, canal_y, 7 * s, 6 * s), 20.0)
    lam = _ell(X, Y, 0, canal_y + 9 * s, 16 * s, 3.5 * s) & ~_ell(X, Y, 0, canal_y, 8 * s, 7 * s)
    paint(lam, 550.0)
    paint(_ell(X, Y, 0, canal_y + 14 * s, 3.5 * s, 7 * s), 520.0)  # spinous process
    st_y = cav_y - cy_ - 2
    paint(_ell(X, Y, 0, st_y, 14 * s, 6 * s), 520.0)
    paint(_ell(X, Y, 0, st_y, 11 * s, 3.5 * s), 190.0)
    for ang in np.deg2rad([-150, -115, -65, -30, 30, 65, 115, 150]):
        rx, ry = (cx_ + 4) * np.cos(ang), cav_y + (cy_ + 4) * np.sin(ang)
        paint(_ell(X, Y, rx, ry, 5 * s, 4 * s), 600.0)

    # The scanner: reconstruction blur, noise (grows with body size), calibration offset.
    blur = site.sharp_mm / spacing
    if blur > 0.3:
        hu = ndimage.gaussian_filter(hu, (0, blur, blur), mode="nearest")
    noise_sd = site.noise_sd * (bx / 165.0) ** 1.5
    hu = hu + noise_sd * _smooth_noise(rng, shape, site.grain_mm / spacing) + site.hu_offset
    geometry = {
        "spacing": spacing,
        "z": [float(v) for v in (k_idx * -site.thickness_mm)],
        "lesion_area_mm2": [float(a) * spacing * spacing for a in lesion.sum(axis=(1, 2))],
        "lesion": lesion,
        # The lesion as drawn in the written image (bone painted over it removed): the segmentation mask.
        "mask": lesion & ~bone[None],
        "hu_offset": site.hu_offset,
    }
    return hu.astype(np.float32), geometry


# Every lesion class shares one distribution of position, size, elongation and mean attenuation (`_LESION_SIZE_MM`,
# `_lesion_place`, `_LESION_MEAN_HU`): the class lives in the lesion's internal structure and margin, which a
# linear or mixture model of pixels cannot reproduce, not in how bright, large or where the lesion is.
_LESION_SIZE_MM = (36.0, 56.0)  # in-plane radius
_LESION_MEAN_HU = (26.0, 40.0)  # mean attenuation inside the lesion on a plain series (window-clipped)
_LESION_ENHANCE_HU = (4.0, 16.0)  # added on a contrast-enhanced series, the same for every class
_ZONES = (("anterior", 0.5), ("middle", 0.3), ("posterior", 0.2))


def _lesion_place(
    rng: np.random.Generator, r0: float, s: float, cav_y: float, cy_: float
) -> tuple[float, float]:
    """Lesion centre (mm): prevascular, paratracheal/subcarinal or paravertebral, whatever the class."""
    zone = _ZONES[int(rng.choice(len(_ZONES), p=[w for _, w in _ZONES]))][0]
    if zone == "anterior":
        return rng.uniform(-22, 18), cav_y - 0.62 * cy_ + 0.45 * r0 + rng.uniform(-4, 8)
    if zone == "middle":
        return rng.choice([-1, 1]) * rng.uniform(12, 26) * s, cav_y + rng.uniform(10, 32) * s
    side = -1.0 if rng.random() < 0.5 else 1.0  # paravertebral gutter, either side of the spine
    return side * (15 * s + r0 * 0.8 + 2), cav_y + 0.74 * cy_ + rng.uniform(-6, 6)


def _blobs(
    rng: np.random.Generator,
    X: np.ndarray,
    Y: np.ndarray,
    lx: float,
    ly: float,
    r0: float,
    n: int,
    radius: tuple[float, float],
    reach: float,
) -> np.ndarray:
    """Union of `n` round foci at random positions within `reach * r0` of the lesion centre."""
    m = np.zeros(np.broadcast_shapes(X.shape, Y.shape), dtype=bool)
    for _ in range(n):
        ang, dist = rng.uniform(0, 2 * np.pi), reach * r0 * np.sqrt(rng.random())
        fr = rng.uniform(*radius)
        m |= _ell(X, Y, lx + dist * np.cos(ang), ly + dist * np.sin(ang), fr, fr)
    return m


def _draw_lesion(hu, label, rng, X, Y, z, s, cav_y, cy_, ce, spacing, shape, slices, site) -> np.ndarray:
    if label == "normal":
        return np.zeros(shape, dtype=bool)
    r0 = rng.uniform(*_LESION_SIZE_MM) * (0.9 + 0.1 * s)
    lx, ly = _lesion_place(rng, r0, s, cav_y, cy_)
    # An ellipsoid along z, long enough to show in every slice, centred off the middle slice.
    span = (slices - 1) / 2 * site.thickness_mm
    rz = max(r0 * rng.uniform(0.8, 1.3), (span + 3) / 0.8)
    zc = rng.uniform(-0.25, 0.25) * rz
    sec = np.sqrt(np.clip(1 - ((z - zc) / rz) ** 2, 0.1, 1.0))  # cross-section scale per slice
    ax_ratio = rng.uniform(0.8, 1.25)
    tilt = rng.uniform(0, np.pi)
    dx0, dy0 = X - lx, Y - ly
    dx, dy = dx0 * np.cos(tilt) + dy0 * np.sin(tilt), -dx0 * np.sin(tilt) + dy0 * np.cos(tilt)
    theta = np.arctan2(dy, dx)
    rho = np.sqrt((dx / ax_ratio) ** 2 + (dy * ax_ratio) ** 2)
    # Margin: thymic carcinoma spiculated (many short spikes), thymoma lobulated, the others smooth.
    if label == "thymic_carcinoma":
        ks, amp = np.arange(6, 14), rng.uniform(0.05, 0.12, 8)
    elif label == "thymoma":
        ks, amp = np.arange(3, 6), rng.uniform(0.06, 0.12, 3)
    else:
        ks, amp = np.arange(2, 4), rng.uniform(0.0, 0.03, 2)
    phase = rng.uniform(0, 2 * np.pi, len(ks))
    edge = 1 + sum(a * np.cos(k * theta + p) for k, a, p in zip(ks, amp, phase, strict=True))
    r = r0 * sec * edge
    u = rho / r  # < 1 inside
    inside = u <= 1.0
    tex = _smooth_noise(rng, shape, 2.0 / spacing)
    # Internal structure as an attenuation pattern around 0 HU; `fixed` parts (fat, calcium) keep their HU, the
    # rest is shifted so that the lesion's mean matches the shared target.
    fixed = np.zeros(shape, dtype=bool)
    if label == "benign_cyst":  # homogeneous proteinaceous fluid, thin enhancing wall
        val = np.where(u > 1 - 1.5 / np.maximum(r, 1), 25.0, 0.0) + 2.0 * tex
    elif label == "thymoma":  # soft-tissue lobules separated by low-attenuation fibrous septa
        lob = _smooth_noise(rng, shape, max(0.4 * r0, 10.0) / spacing)
        val = np.where(lob > 0.0, 55.0, -55.0) + 4.0 * tex
    elif label == "neurogenic_tumor":  # target sign: dense centre, low-attenuation (myxoid) periphery
        val = np.where(u < rng.uniform(0.5, 0.62), 60.0, -50.0) + 4.0 * tex
    elif label == "thymic_carcinoma":  # necrotic centre in a thick enhancing rim
        nec = u < rng.uniform(0.45, 0.6) * (1 + 0.15 * tex)
        val = np.where(nec, -60.0, 50.0) + 4.0 * tex
    else:  # germ cell tumour: soft tissue with fat and calcified foci at random positions
        val = 6.0 * tex
        fat = _blobs(rng, X, Y, lx, ly, r0, int(rng.integers(2, 4)), (0.22 * r0, 0.32 * r0), 0.6)
        calc = _blobs(rng, X, Y, lx, ly, r0, int(rng.integers(2, 4)), (4.0, 7.0), 0.7)
        val = np.where(fat, rng.uniform(-110, -80), val)
        val = np.where(calc, rng.uniform(450, 900), val)
        fixed = np.broadcast_to(fat | calc, shape) & inside
    val = np.broadcast_to(val, shape).astype(np.float32)
    target = rng.uniform(*_LESION_MEAN_HU) + (rng.uniform(*_LESION_ENHANCE_HU) if ce else 0.0)
    free = inside & ~fixed
    if free.any():
        # Shift the soft parts so the window-clipped mean inside the lesion equals the target (a soft-tissue window
        # is what every model sees; calcium clipped at its top keeps its share).
        clipped_fixed = np.clip(val[fixed & inside], -160, 240).sum()
        shift = (target * inside.sum() - clipped_fixed) / free.sum() - val[free].mean()
        val = np.where(free, val + shift, val)
    if label == "thymic_carcinoma":
        # Infiltrative margin: tissue streaks into the surrounding fat over a few millimetres.
        fringe = (u > 1.0) & (u < 1.0 + 8.0 / np.maximum(r, 1)) & (tex > 0.3) & (hu < 0) & (hu > -200)
        hu[fringe] = (0.5 * (target + 50.0) + 0.5 * hu)[fringe]
    hu[inside] = val[inside]
    return inside
