"""Fidelity, diversity and label fidelity of synthetic images, beside utility.

The step: `compute_fidelity(task, synthetic, real, out, ...)` for one synthetic set and `fidelity_run(RUN)` for
every generator of a run (RUN/fidelity/<generator>/). Feature spaces and their cache: `features`. The statistics
themselves (features in, numbers out) are the metric library's `bench.metrics.fidelity`.
"""

from bench.fidelity.features import Embedder, Features, FeatureSpace, embed_manifest, open_embedder
from bench.fidelity.run import (
    METRICS,
    TABLE_COLUMNS,
    compute_fidelity,
    fidelity_run,
    fidelity_stats,
    run_checkpoint,
)

__all__ = [
    "METRICS",
    "TABLE_COLUMNS",
    "Embedder",
    "FeatureSpace",
    "Features",
    "compute_fidelity",
    "embed_manifest",
    "fidelity_run",
    "fidelity_stats",
    "open_embedder",
    "run_checkpoint",
]
