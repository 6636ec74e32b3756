"""Writing the phantom: DICOM series and labels.csv, in parallel, atomically."""

from __future__ import annotations

import concurrent.futures as cf
import csv
import hashlib
import io
import json
import logging
import os
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import BadInput
from bench.io import atomic_dir
from bench.phantom.draw import render_patient
from bench.phantom.plan import (
    DEFAULTS,
    HU_MAX,
    HU_MIN,
    LABEL_COLUMNS,
    PHANTOM_VERSION,
    SITE_BY_NAME,
    PatientPlan,
    plan_patient,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# DICOM writing


def _uid(seed: int, *parts: Any) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["medsynbench-phantom", PHANTOM_VERSION, str(seed), *map(str, parts)])


def series_dir(plan: PatientPlan) -> str:
    """Export-style folder names that carry no identifier (hospital exports name them by index too)."""
    return f"PA{plan.index:06d}/ST000000/SE000000"


def seg_path(plan: PatientPlan) -> str:
    """The patient's lesion mask: a second series of the study, named like an image file (readers find a SEG by
    its SOP Class, not by its name)."""
    return f"PA{plan.index:06d}/ST000000/SE000001/IM000001.dcm"


def _write_series(
    out: Path, plan: PatientPlan, slices: int, size: int, seed: int, fast: bool = True, masks: bool = False
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
    sources: list[Any] = []
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
        if masks:
            sources.append(_source_header(ds))
    if masks and geo["mask"].any():
        files.append(_write_seg(out, plan, sources, geo["mask"], seed, time_s))
    return files


# What a SEG copies or checks of its source images (patient, study, series, geometry); the slice's other elements
# would only cost copying time.
_SOURCE_KEYWORDS = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "Modality",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "StudyID",
    "SeriesNumber",
    "InstanceNumber",
    "FrameOfReferenceUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceThickness",
    "Rows",
    "Columns",
    "PixelSpacing",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "BodyPartExamined",
    "PatientPosition",
    "ImageType",
)


def _source_header(ds: Any) -> Any:
    """The part of one written slice's header a SEG needs of its source image."""
    from pydicom.dataset import Dataset

    src = Dataset()
    for kw in _SOURCE_KEYWORDS:
        if kw in ds:
            setattr(src, kw, ds.data_element(kw).value)
    return src


def _write_seg(
    out: Path, plan: PatientPlan, sources: list[Any], mask: np.ndarray, seed: int, time_s: str
) -> str:
    """One BINARY DICOM SEG for the series, one segment (the patient's lesion class), one frame per slice that shows
    lesion, each frame referencing its slice by SOP Instance UID and carrying its plane position."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it narrates every attribute it copies
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=plan.label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Mass,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=_uid(seed, plan.index, "seg-series"),
        series_number=100,
        sop_instance_uid=_uid(seed, plan.index, "seg"),
        instance_number=1,
        manufacturer="medsynbench",
        manufacturer_model_name="phantom",
        software_versions=f"phantom {PHANTOM_VERSION}",
        device_serial_number="0",
        content_label="LESION",
        content_description="mediastinal lesion",
    )
    # highdicom stamps the creation time and draws a dimension-organization UID; the phantom's files depend on the
    # seed alone.
    seg.ContentDate = seg.SeriesDate = seg.InstanceCreationDate = plan.study_date
    seg.ContentTime = seg.SeriesTime = seg.InstanceCreationTime = time_s
    dim_uid = _uid(seed, plan.index, "seg-dimensions")
    for item in seg.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = dim_uid
    for item in seg.get("DimensionIndexSequence", []):
        item.DimensionOrganizationUID = dim_uid
    for item in seg.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = plan.study_date + time_s
    path = out / seg_path(plan)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path, enforce_file_format=True)
    return str(path.relative_to(out))


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
        meta = self._join(self.meta, ds.file_meta)
        group_len = b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<I", len(meta))
        return b"\x00" * 128 + b"DICM" + group_len + meta + self._join(self.body, ds)


def _write_chunk(
    out: str, indices: list[int], slices: int, size: int, seed: int, masks: bool = False
) -> list[dict[str, Any]]:
    rows = []
    for i in indices:
        plan = plan_patient(seed, i)
        _write_series(Path(out), plan, slices, size, seed, masks=masks)
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
    masks: bool = False,
) -> dict[str, Any]:
    """Write the phantom export to `out` (atomically: a temporary folder renamed at the end).

    Layout: `PA<index>/ST000000/SE000000/IM<k>.dcm` per patient, `labels.csv` (LABEL_COLUMNS, one row per patient)
    and `phantom.json` (parameters and version). With `masks`, each patient with a lesion also gets one DICOM SEG
    (`seg_path`) of its lesion, aligned pixel for pixel with its slices; the images are the same bytes either way.
    Returns a summary with counts and the wall time.
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
                rows += _write_chunk(str(tmp), ch, slices, size, seed, masks)
        else:
            with cf.ProcessPoolExecutor(max_workers=workers) as ex:
                for part in ex.map(
                    _write_chunk,
                    [str(tmp)] * len(chunks),
                    chunks,
                    [slices] * len(chunks),
                    [size] * len(chunks),
                    [seed] * len(chunks),
                    [masks] * len(chunks),
                ):
                    rows += part
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(LABEL_COLUMNS), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        (tmp / "labels.csv").write_text(buf.getvalue(), encoding="utf-8")
        params: dict[str, Any] = {"patients": patients, "slices": slices, "size": size, "seed": seed}
        if masks:  # absent otherwise, so an export without masks is the bytes it always was
            params["masks"] = True
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
        "masks": sum(r["label"] != "normal" for r in rows) if masks else 0,
        "seconds": seconds,
        "workers": workers,
        **counts,
    }


def params_key(params: dict[str, Any]) -> str:
    """Short hash of the phantom parameters and version (names the default-root cache folder)."""
    p: dict[str, Any] = {k: int(params.get(k, DEFAULTS[k])) for k in DEFAULTS}
    if params.get("masks"):  # only then, so an export without masks keeps its folder
        p["masks"] = True
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
