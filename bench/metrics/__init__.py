"""Evaluation: metric functions, patient-clustered bootstrap, DeLong, fairness, tidy tables and comparisons.

Public interface: `evaluate_predictions` (tidy metric table), `compare_to_baseline` (paired comparisons with the
real-only baseline), their segmentation counterparts on per-case count tables (`evaluate_segmentation`,
`compare_segmentation`; counts from label maps: `count_table`), `MetricTable` (the reader of both tables: rows by arm, overall, by group, one estimate), the
metric registry (`METRICS`, `register_metric`, `get_metric`, `metric_specs`, `reported`) and the metric functions
themselves (`auroc`, `auroc_macro`, `balanced_accuracy`, `sensitivity`, `specificity`, `ece`, `brier`).

This package is the metric library: it imports only the contracts below it (`bench.tasks`, `bench.runfolder`,
`bench.registry`, `bench.errors`); orchestration and presentation (RUN folders, summary.json, reports, audits) live
in `bench.evaluation`.
"""

from bench.metrics.compare import COMPARISON_COLUMNS, compare_to_baseline
from bench.metrics.core import (
    METRICS,
    REGISTRY,
    Metric,
    auroc,
    auroc_class,
    auroc_macro,
    balanced_accuracy,
    brier,
    choose_threshold,
    ece,
    get_metric,
    metric_names,
    metric_specs,
    register_metric,
    reported,
    sensitivity,
    specificity,
)
from bench.metrics.delong import delong_test
from bench.metrics.evaluate import TABLE_COLUMNS, evaluate_predictions, positive_classes, prepare_predictions
from bench.metrics.segeval import compare_segmentation, evaluate_segmentation
from bench.metrics.segmentation import COUNTS_VERSION, count_columns, count_matrix, count_table
from bench.metrics.table import MetricTable
from bench.metrics.validate import validate_predictions, validate_probabilities

__all__ = [
    "COMPARISON_COLUMNS",
    "COUNTS_VERSION",
    "METRICS",
    "REGISTRY",
    "TABLE_COLUMNS",
    "Metric",
    "MetricTable",
    "auroc",
    "auroc_class",
    "auroc_macro",
    "balanced_accuracy",
    "brier",
    "choose_threshold",
    "compare_segmentation",
    "compare_to_baseline",
    "count_columns",
    "count_matrix",
    "count_table",
    "delong_test",
    "ece",
    "evaluate_predictions",
    "evaluate_segmentation",
    "get_metric",
    "metric_names",
    "metric_specs",
    "positive_classes",
    "prepare_predictions",
    "register_metric",
    "reported",
    "sensitivity",
    "specificity",
    "validate_predictions",
    "validate_probabilities",
]
