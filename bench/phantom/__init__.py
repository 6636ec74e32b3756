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

from bench.phantom.draw import render_patient
from bench.phantom.plan import (
    CLASSES,
    DEFAULTS,
    EXTERNAL_SITES,
    LABEL_COLUMNS,
    PHANTOM_VERSION,
    SITE_BY_NAME,
    SITES,
    TRAIN_SITES,
    PatientPlan,
    SiteSpec,
    plan_patient,
)
from bench.phantom.write import (
    _write_series,
    check_params,
    params_key,
    phantom_phi_values,
    seg_path,
    series_dir,
    write_phantom,
)

__all__ = [
    "CLASSES",
    "DEFAULTS",
    "EXTERNAL_SITES",
    "LABEL_COLUMNS",
    "PHANTOM_VERSION",
    "SITES",
    "SITE_BY_NAME",
    "TRAIN_SITES",
    "PatientPlan",
    "SiteSpec",
    "_write_series",
    "check_params",
    "params_key",
    "phantom_phi_values",
    "plan_patient",
    "render_patient",
    "seg_path",
    "series_dir",
    "write_phantom",
]
