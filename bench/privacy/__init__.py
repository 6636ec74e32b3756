"""Privacy audits.

- `bench.privacy.memorization`, `contamination`, `audit`: the generator audit (`medsynbench privacy`), which asks
  whether a synthetic set copies its generator's training patients or overlaps what the task evaluates on;
- `bench.privacy.attack` and `bench.privacy.model`: the model audit (`medsynbench privacy-model RUN`), which asks
  how much each diagnostic model the matrix trained reveals about the patients whose data reached it (membership
  inference).
"""

from bench.privacy.audit import audit, closest_pairs_png
from bench.privacy.contamination import (
    AuditInputs,
    contamination_problems,
    find_duplicates,
    prepare,
)
from bench.privacy.memorization import (
    AUDIT_BACKBONE,
    FEATURES,
    MARGIN,
    MAX_SHIFT,
    MIN_HOLDOUT,
    NEAR_DUPLICATE,
    PIXEL_SIZE,
    QUANTILES,
    RULE,
    SCHEMA_VERSION,
    _ClusterSampler,
    classifier_features,
    memorization_stats,
    nearest_neighbors,
    pixel_features,
    quantile_ci,
    shift_tolerant_nearest,
    short_hash,
    train_audit_classifier,
)

__all__ = [
    "AUDIT_BACKBONE",
    "FEATURES",
    "MARGIN",
    "MAX_SHIFT",
    "MIN_HOLDOUT",
    "NEAR_DUPLICATE",
    "PIXEL_SIZE",
    "QUANTILES",
    "RULE",
    "SCHEMA_VERSION",
    "AuditInputs",
    "_ClusterSampler",
    "audit",
    "classifier_features",
    "closest_pairs_png",
    "contamination_problems",
    "find_duplicates",
    "memorization_stats",
    "nearest_neighbors",
    "pixel_features",
    "prepare",
    "quantile_ci",
    "shift_tolerant_nearest",
    "short_hash",
    "train_audit_classifier",
]
