"""Evaluation orchestration: reads predictions from a RUN folder or a file, calls the metric library
(`bench.metrics`) and writes tables, summary.json and the reports.

Public interface: `evaluate_run(RUN, out)`, `load_run_predictions(RUN)`, `audit_predictions(path, out, by=...)`,
`build_report(...)`. The metric math lives in `bench.metrics`, which imports nothing from here.
"""

from bench.evaluation.audit import audit_predictions, audit_summary
from bench.evaluation.report import Report, Settings, build_report
from bench.evaluation.run import evaluate_run, load_run_predictions, write_tables

__all__ = [
    "Report",
    "Settings",
    "audit_predictions",
    "audit_summary",
    "build_report",
    "evaluate_run",
    "load_run_predictions",
    "write_tables",
]
