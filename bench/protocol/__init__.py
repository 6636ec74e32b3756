"""The protocol matrix: task x generators x regimes x seeds x backbone, one folder per run, resumable.

One module per step: `config` (presets, protocols), `inputs` (manifests and cards, checked), `plan` (typed run and
study specs), `execute` (one run, one tuning study), `matrix` (the driver), `progress` (the display). The run
folder's layout belongs to `bench.runfolder`.
"""

from bench.protocol.config import (
    Preset,
    Protocol,
    RunSettings,
    TrainOverrides,
    TrainSettings,
    default_preset_name,
    load_preset,
    load_protocol,
)
from bench.protocol.execute import (
    DataStore,
    execute_run,
    execute_study,
    predictions_frame,
    run_metrics,
    train_regime,
)
from bench.protocol.inputs import find_card_file, load_real, load_synthetic, parse_synthetic_args
from bench.protocol.matrix import MatrixResult, run_matrix
from bench.protocol.plan import (
    MatrixContext,
    MatrixOptions,
    MatrixPlan,
    RunSpec,
    StudySpec,
    default_threads,
    environment,
    plan_matrix,
)

__all__ = [
    "DataStore",
    "MatrixContext",
    "MatrixOptions",
    "MatrixPlan",
    "MatrixResult",
    "Preset",
    "Protocol",
    "RunSpec",
    "StudySpec",
    "TrainOverrides",
    "RunSettings",
    "TrainSettings",
    "default_preset_name",
    "default_threads",
    "environment",
    "execute_run",
    "execute_study",
    "find_card_file",
    "load_preset",
    "load_protocol",
    "load_real",
    "load_synthetic",
    "parse_synthetic_args",
    "plan_matrix",
    "predictions_frame",
    "run_metrics",
    "run_matrix",
    "train_regime",
]
