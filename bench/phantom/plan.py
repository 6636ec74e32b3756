"""Who the phantom's patients are: sites, class mix, each patient's plan (seeded)."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

import numpy as np

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
