"""The built-in chest CT phantom: a multi-hospital mediastinal-mass export written as real DICOM + `labels.csv`.

Each patient is one contrast-enhanced (CE) or plain (PL) axial CT series of a few adjacent slices through the
mediastinum at the level of the pulmonary trunk, drawn in Hounsfield units:

- body contour with subcutaneous fat (about -100 HU), chest-wall muscle (about 40 HU), mediastinal fat (-90 HU);
- lungs (-850 HU) with vessels running through the slices; trachea and main bronchi (air), oesophagus;
- heart and great vessels (ascending and descending aorta, pulmonary trunk, superior vena cava): blood is
  about 40 HU on PL and 200-300 HU on CE series;
- spine (cortical shell 600-700 HU, cancellous bone about 250 HU, spinal canal), sternum and ribs;
- a thymus that involutes with age: soft tissue in the young, fat-replaced after about 40.

Lesions follow the radiological picture of the six classes (normal has none): thymoma (anterior mediastinum,
round to lobulated, 40-60 HU, mild enhancement), benign cyst (anterior or middle mediastinum, water 0-20 HU, thin
sharp wall, no enhancement), germ cell tumour (anterior, large, heterogeneous with fat and calcified foci; mostly
young men), neurogenic tumour (posterior paravertebral, round, 30-40 HU, variable enhancement) and thymic carcinoma
(anterior, large, irregular infiltrative margin, necrotic low-attenuation centre). A lesion is an ellipsoid-like
body whose cross-section changes from slice to slice and is present in every slice of its patient, so slice
labels equal patient labels.

Hospitals differ the way scanners and protocols do: noise, reconstruction sharpness and noise grain, HU calibration
offset, field of view (pixel spacing), slice thickness, CE/PL mix, manufacturer, rescale intercept, and class
prevalence. Sex and age change body size, thymus and class prevalence (germ cell tumours in young men, thymic
epithelial tumours in older patients).

Every draw comes from `numpy.random.default_rng([seed, patient_index, stream])`, so a patient's series does not
depend on how many patients are written or on how the work is split between processes.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import datetime as dt
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from bench.errors import BadInput
from bench.io import atomic_dir

log = logging.getLogger(__name__)

# Bump whenever a change could alter a written pixel or header (the default-root cache is keyed on it).
PHANTOM_VERSION = "3"

CLASSES = ("normal", "thymoma", "benign_cyst", "germ_cell_tumor", "neurogenic_tumor", "thymic_carcinoma")
LABEL_COLUMNS = ("patient_id", "label", "site", "sex", "age", "contrast")
DEFAULTS = {"patients": 400, "slices": 3, "size": 128, "seed": 0}

HU_MIN, HU_MAX = -1024, 3071
AIR, FAT, MUSCLE, LUNG, WATER = -1000.0, -100.0, 40.0, -850.0, 10.0


@dataclass(frozen=True)
class SiteSpec:
    """How one hospital's scanner and patient mix differ from the others."""

    name: str
    external: bool
    weight: float  # share of patients
    manufacturer: str
    model: str
    kernel: str
    noise_sd: float  # HU, for an average-sized adult
    sharp_mm: float  # Gaussian blur of the reconstruction (larger = softer kernel)
    grain_mm: float  # correlation length of the noise texture
    hu_offset: float  # calibration error added to every pixel
    fov_mm: float  # reconstruction field of view (pixel spacing = fov / size)
    thickness_mm: float
    ce_fraction: float
    intercept: int
    prevalence: tuple[float, ...]  # over CLASSES, before the sex/age multipliers
    age_mean: float
    age_sd: float
    male_fraction: float
    mrn_prefix: str


# The training hospitals share one class mix, so a site's look (noise, field of view) is no shortcut to the class; the
# external hospitals' mixes differ, a prevalence shift the external evaluation has to absorb.
_TRAIN_PREVALENCE = (0.28, 0.16, 0.15, 0.14, 0.14, 0.13)
# fmt: off
SITES: tuple[SiteSpec, ...] = (
    SiteSpec("hospital_a", False, 0.25, "SIEMENS", "SOMATOM Definition AS", "I30f", 12.0, 0.8, 1.0, 0.0,
             380.0, 5.0, 0.70, -1024, _TRAIN_PREVALENCE, 50, 16, 0.52, "HA"),
    SiteSpec("hospital_b", False, 0.22, "GE MEDICAL SYSTEMS", "Revolution CT", "STANDARD", 16.0, 1.1, 1.3, 4.0,
             420.0, 5.0, 0.40, 0, _TRAIN_PREVALENCE, 54, 17, 0.48, "HB"),
    SiteSpec("hospital_c", False, 0.20, "Philips", "iCT 256", "B", 10.0, 0.6, 0.9, -3.0,
             360.0, 3.0, 0.85, -1024, _TRAIN_PREVALENCE, 52, 15, 0.55, "HC"),
    SiteSpec("hospital_d", True, 0.17, "TOSHIBA", "Aquilion ONE", "FC08", 55.0, 2.6, 2.0, 45.0,
             500.0, 5.0, 0.50, -1024, (0.31, 0.18, 0.17, 0.12, 0.13, 0.09), 57, 16, 0.50, "HD"),
    SiteSpec("hospital_e", True, 0.16, "SIEMENS", "SOMATOM go.Up", "Br40", 60.0, 0.4, 0.6, -45.0,
             330.0, 2.0, 0.30, 0, (0.28, 0.15, 0.20, 0.12, 0.15, 0.10), 46, 18, 0.50, "HE"),
)
# fmt: on
SITE_BY_NAME = {s.name: s for s in SITES}
TRAIN_SITES = tuple(s.name for s in SITES if not s.external)
EXTERNAL_SITES = tuple(s.name for s in SITES if s.external)

# fmt: off
_FAMILY = ("MILLER", "NGUYEN", "KOWALSKI", "OKAFOR", "HALVORSEN", "TANAKA", "FERREIRA", "LINDQVIST", "OSEI",
           "MORENO", "BRANDT", "CHOUDHURY", "VASQUEZ", "PETROVA", "OKONKWO", "BERGSTROM", "DUBOIS", "MARTELLI",
           "SORENSEN", "HAYASHI", "ABERNATHY", "QUINTERO", "WOJCIK", "DELACROIX")
_GIVEN_M = ("JONAS", "RAFAEL", "TOMASZ", "KWAME", "ERIK", "HIROSHI", "MATEO", "ANDERS", "LUCIEN", "DMITRI",
            "OMAR", "FINNEGAN")
_GIVEN_F = ("ASTRID", "MARISOL", "AGNIESZKA", "ADAEZE", "INGRID", "YUKI", "BEATRIZ", "SOLVEIG", "CLEMENCE",
            "NADIA", "PRIYA", "ROSALIND")
# fmt: on


@dataclass(frozen=True)
class PatientPlan:
    """Who a phantom patient is; the identifiers are the PHI a real export would carry."""

    index: int
    patient_id: str
    name: str
    birth_date: str
    study_date: str
    accession: str
    sex: str
    age: int
    site: str
    label: str
    contrast: str


def _class_multipliers(sex: str, age: int) -> np.ndarray:
    """Relative class risk for a patient, so that subgroups differ in prevalence as they do clinically."""
    young, old = age < 40, age >= 55
    m = np.ones(len(CLASSES))
    m[1] = 0.6 if age < 30 else 0.9 if age < 40 else 1.2  # thymoma: 40-60 years
    m[5] = (0.5 if age < 35 else 0.9 if age < 50 else 1.2) * (1.1 if sex == "M" else 0.9)  # thymic carcinoma
    if sex == "M":  # germ cell tumours: young men
        m[3] = 2.5 if young else 1.2 if age < 50 else 0.5
    else:
        m[3] = 0.6 if young else 0.3
    m[4] = 1.2 if young else 0.9 if old else 1.0  # neurogenic tumours: younger adults
    return m


def plan_patient(seed: int, index: int) -> PatientPlan:
    """Demographics, site, class and identifiers of patient `index` (independent of every other patient)."""
    rng = np.random.default_rng([seed, index, 0])
    w = np.array([s.weight for s in SITES])
    site = SITES[int(rng.choice(len(SITES), p=w / w.sum()))]
    sex = "M" if rng.random() < site.male_fraction else "F"
    age = int(np.clip(round(rng.normal(site.age_mean, site.age_sd)), 18, 89))
    p = np.asarray(site.prevalence) * _class_multipliers(sex, age)
    label = CLASSES[int(rng.choice(len(CLASSES), p=p / p.sum()))]
    contrast = "CE" if rng.random() < site.ce_fraction else "PL"
    study = dt.date(2015, 1, 1) + dt.timedelta(days=int(rng.integers(0, 9 * 365)))
    study = study.replace(day=min(study.day, 28))
    birth = study.replace(year=study.year - age) - dt.timedelta(days=int(rng.integers(0, 365)))
    given = _GIVEN_M if sex == "M" else _GIVEN_F
    name = f"{_FAMILY[int(rng.integers(len(_FAMILY)))]}^{given[int(rng.integers(len(given)))]}"
    pid = f"{site.mrn_prefix}{int(rng.integers(100, 1000))}{index:06d}"  # unique: the index is part of it
    accession = f"A{int(rng.integers(10**8, 10**9))}"
    return PatientPlan(
        index,
        pid,
        name,
        birth.strftime("%Y%m%d"),
        study.strftime("%Y%m%d"),
        accession,
        sex,
        age,
        site.name,
        label,
        contrast,
    )


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
    geometry (pixel spacing, slice positions, the lesion mask). Written pixels are `round(hu)` clipped to the CT
    range, minus the site's rescale intercept."""
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

    # Spine, sternum, ribs.
    vb_y, vb_r = cav_y + 0.74 * cy_, 15 * s
    vb = _ell(X, Y, 0, vb_y, vb_r, vb_r * 0.9)
    hu[np.broadcast_to(vb, shape)] = rng.uniform(620, 720)
    hu[np.broadcast_to(_ell(X, Y, 0, vb_y, vb_r - 2.2, vb_r * 0.9 - 2.2), shape)] = rng.uniform(180, 280)
    canal_y = vb_y + vb_r * 0.9 + 7 * s
    hu[np.broadcast_to(_ell(X, Y, 0, canal_y, 7 * s, 6 * s), shape)] = 20.0
    lam = _ell(X, Y, 0, canal_y + 9 * s, 16 * s, 3.5 * s) & ~_ell(X, Y, 0, canal_y, 8 * s, 7 * s)
    hu[np.broadcast_to(lam, shape)] = 550.0
    hu[np.broadcast_to(_ell(X, Y, 0, canal_y + 14 * s, 3.5 * s, 7 * s), shape)] = 520.0  # spinous process
    st_y = cav_y - cy_ - 2
    hu[np.broadcast_to(_ell(X, Y, 0, st_y, 14 * s, 6 * s), shape)] = 520.0
    hu[np.broadcast_to(_ell(X, Y, 0, st_y, 11 * s, 3.5 * s), shape)] = 190.0
    for ang in np.deg2rad([-150, -115, -65, -30, 30, 65, 115, 150]):
        rx, ry = (cx_ + 4) * np.cos(ang), cav_y + (cy_ + 4) * np.sin(ang)
        hu[np.broadcast_to(_ell(X, Y, rx, ry, 5 * s, 4 * s), shape)] = 600.0

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


# ----------------------------------------------------------------------------------------------------------------
# DICOM writing


def _uid(seed: int, *parts: Any) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["medsynbench-phantom", PHANTOM_VERSION, str(seed), *map(str, parts)])


def series_dir(plan: PatientPlan) -> str:
    """Export-style folder names that carry no identifier (hospital exports name them by index too)."""
    return f"PA{plan.index:06d}/ST000000/SE000000"


def _write_series(
    out: Path, plan: PatientPlan, slices: int, size: int, seed: int, fast: bool = True
) -> list[str]:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

    site = SITE_BY_NAME[plan.site]
    hu, geo = render_patient(plan, slices, size, seed)
    stored = np.clip(np.rint(hu), HU_MIN, HU_MAX) - site.intercept
    stored = stored.astype(np.int16)
    spacing = geo["spacing"]
    study_uid = _uid(seed, plan.index, "study")
    series_uid = _uid(seed, plan.index, "series")
    frame_uid = _uid(seed, plan.index, "frame")
    ce = plan.contrast == "CE"
    rng = np.random.default_rng([seed, plan.index, 2])
    table_z = float(rng.uniform(-160, -110))
    time_s = f"{int(rng.integers(7, 18)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = plan.study_date
    ds.StudyTime = ds.SeriesTime = time_s
    ds.AccessionNumber = plan.accession
    ds.Modality = "CT"
    ds.Manufacturer = site.manufacturer
    ds.InstitutionName = site.name
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT THORAX"
    ds.SeriesDescription = "THORAX 5mm C+" if ce else "THORAX 5mm NATIVE"
    ds.ManufacturerModelName = site.model
    ds.PatientName = plan.name
    ds.PatientID = plan.patient_id
    ds.PatientBirthDate = plan.birth_date
    ds.PatientSex = plan.sex
    ds.PatientAge = f"{plan.age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    if ce:
        ds.ContrastBolusAgent = "IOPAMIDOL 370"
        ds.ContrastBolusRoute = "IV"
    ds.SliceThickness = f"{site.thickness_mm:g}"
    ds.KVP = "120"
    ds.ConvolutionKernel = site.kernel
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 2 if ce else 1
    ds.FrameOfReferenceUID = frame_uid
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.PixelSpacing = [f"{spacing:.6g}", f"{spacing:.6g}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    if site.name == "hospital_b":  # some scanners store a lung window as a second VOI
        ds.WindowCenter, ds.WindowWidth = ["40", "-600"], ["400", "1500"]
    else:
        ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.RescaleIntercept = str(site.intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MEDSYNBENCH"
    ds.file_meta = meta

    folder = out / series_dir(plan)
    folder.mkdir(parents=True, exist_ok=True)
    x0 = -(size - 1) / 2 * spacing
    files = []
    encoder = None
    for k in range(slices):
        sop = _uid(seed, plan.index, "image", k)
        meta.MediaStorageSOPInstanceUID = sop
        ds.SOPInstanceUID = sop
        ds.InstanceNumber = k + 1
        zk = table_z + geo["z"][k]
        ds.ImagePositionPatient = [f"{x0:.4f}", f"{x0:.4f}", f"{zk:.2f}"]
        ds.SliceLocation = f"{zk:.2f}"
        ds.PixelData = stored[k].tobytes()
        ds["PixelData"].VR = "OW"  # 16-bit pixels; resolved here so the element encodes on its own
        path = folder / f"IM{k + 1:06d}.dcm"
        if fast:
            encoder = encoder or _SliceEncoder(ds)
            path.write_bytes(encoder.encode(ds))
        else:
            ds.save_as(path, enforce_file_format=True)
        files.append(str(path.relative_to(out)))
    return files


# Elements that differ between the slices of one series; everything else is encoded once per series.
_VARYING = frozenset({0x00020003, 0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010})


class _SliceEncoder:
    """Encodes the slices of one series to the exact bytes `Dataset.save_as(enforce_file_format=True)` writes
    (explicit VR little endian), letting pydicom encode the constant elements once instead of once per slice;
    the phantom's write speed is dominated by header encoding otherwise."""

    def __init__(self, ds: Any) -> None:
        self.meta = self._segments(ds.file_meta)
        self.body = self._segments(ds)

    @staticmethod
    def _encode(part: Any) -> bytes:
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_dataset

        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_dataset(fp, part)
        return fp.getvalue()

    def _segments(self, ds: Any) -> list[bytes | int]:
        from pydicom.dataset import Dataset

        segs: list[bytes | int] = []
        run = Dataset()
        for tag in sorted(ds.keys()):
            if tag == 0x00020000:
                continue  # the group length is computed per slice
            if int(tag) in _VARYING:
                if len(run):
                    segs.append(self._encode(run))
                    run = Dataset()
                segs.append(int(tag))
            else:
                run.add(ds[tag])
        if len(run):
            segs.append(self._encode(run))
        return segs

    def _join(self, segs: list[bytes | int], ds: Any) -> bytes:
        from pydicom.dataset import Dataset

        out = []
        for s in segs:
            if isinstance(s, bytes):
                out.append(s)
            else:
                one = Dataset()
                one.add(ds[s])
                out.append(self._encode(one))
        return b"".join(out)

    def encode(self, ds: Any) -> bytes:
        import struct

        meta = self._join(self.meta, ds.file_meta)
        group_len = b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<I", len(meta))
        return b"\x00" * 128 + b"DICM" + group_len + meta + self._join(self.body, ds)


def _write_chunk(out: str, indices: list[int], slices: int, size: int, seed: int) -> list[dict[str, Any]]:
    rows = []
    for i in indices:
        plan = plan_patient(seed, i)
        _write_series(Path(out), plan, slices, size, seed)
        rows.append(
            {
                "patient_id": plan.patient_id,
                "label": plan.label,
                "site": plan.site,
                "sex": plan.sex,
                "age": plan.age,
                "contrast": plan.contrast,
            }
        )
    return rows


def check_params(patients: int, slices: int, size: int, seed: int) -> None:
    problems = []
    if patients < 1:
        problems.append(f"patients (--patients) must be at least 1 (got {patients})")
    if not 1 <= slices <= 64:
        problems.append(f"slices (--slices) must be between 1 and 64 (got {slices})")
    if not 32 <= size <= 1024:
        problems.append(f"size (--size) must be between 32 and 1024 pixels (got {size})")
    if seed < 0:
        problems.append(f"seed (--seed) must be non-negative (got {seed})")
    if problems:
        raise BadInput("phantom: invalid parameters", problems)


def write_phantom(
    out: str | Path,
    patients: int = DEFAULTS["patients"],
    slices: int = DEFAULTS["slices"],
    size: int = DEFAULTS["size"],
    seed: int = DEFAULTS["seed"],
    workers: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the phantom export to `out` (atomically: a temporary folder renamed at the end).

    Layout: `PA<index>/ST000000/SE000000/IM<k>.dcm` per patient, `labels.csv` (LABEL_COLUMNS, one row per patient)
    and `phantom.json` (parameters and version). Returns a summary with counts and the wall time.
    """
    check_params(patients, slices, size, seed)
    out = Path(out)
    if out.exists() and not overwrite:
        raise BadInput(f"{out}: already exists (choose another --out, or --overwrite to replace it)")
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    t0 = time.perf_counter()
    chunk = max(8, min(64, patients // (4 * max(workers, 1)) or 1))
    chunks = [list(range(i, min(i + chunk, patients))) for i in range(0, patients, chunk)]
    with atomic_dir(out, overwrite=overwrite) as tmp:
        rows: list[dict[str, Any]] = []
        if workers <= 1 or len(chunks) == 1:
            for ch in chunks:
                rows += _write_chunk(str(tmp), ch, slices, size, seed)
        else:
            with cf.ProcessPoolExecutor(max_workers=workers) as ex:
                for part in ex.map(
                    _write_chunk,
                    [str(tmp)] * len(chunks),
                    chunks,
                    [slices] * len(chunks),
                    [size] * len(chunks),
                    [seed] * len(chunks),
                ):
                    rows += part
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(LABEL_COLUMNS), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        (tmp / "labels.csv").write_text(buf.getvalue(), encoding="utf-8")
        params = {"patients": patients, "slices": slices, "size": size, "seed": seed}
        (tmp / "phantom.json").write_text(
            json.dumps({"phantom_version": PHANTOM_VERSION, **params}, indent=2, sort_keys=True) + "\n",
            encoding="utf-8",
        )
    seconds = time.perf_counter() - t0
    counts: dict[str, dict[str, int]] = {"label": {}, "site": {}}
    for r in rows:
        counts["label"][r["label"]] = counts["label"].get(r["label"], 0) + 1
        counts["site"][r["site"]] = counts["site"].get(r["site"], 0) + 1
    return {
        "out": str(out),
        "patients": patients,
        "images": patients * slices,
        "seconds": seconds,
        "workers": workers,
        **counts,
    }


def params_key(params: dict[str, Any]) -> str:
    """Short hash of the phantom parameters and version (names the default-root cache folder)."""
    p = {k: int(params.get(k, DEFAULTS[k])) for k in DEFAULTS}
    blob = json.dumps({"v": PHANTOM_VERSION, **p}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def phantom_phi_values(out_dir: str | Path) -> set[str]:
    """Every identifying header value in a written phantom (names, ids, birth dates, accession numbers), read back
    from `labels.csv` and the DICOM headers, for tests that scan downstream outputs for leaks."""
    import pydicom

    out_dir = Path(out_dir)
    values: set[str] = set()
    with open(out_dir / "labels.csv", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            values.add(row["patient_id"])
    for p in sorted(out_dir.rglob("*.dcm")):
        ds = pydicom.dcmread(
            p,
            stop_before_pixels=True,
            specific_tags=["PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"],
        )
        for key in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"):
            v = str(ds.get(key, "") or "")
            if v:
                values.add(v)
        name = str(ds.get("PatientName", ""))
        if "^" in name:  # the name also as it would be printed
            fam, giv = name.split("^", 1)
            values.add(f"{giv} {fam}")
            values.add(f"{fam}, {giv}")
    return values
