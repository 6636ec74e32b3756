"""Planning: every input and setting resolved into typed run and study specs; nothing is trained or written."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from bench.errors import BadInput
from bench.io import sha256_file
from bench.manifest import Manifest
from bench.protocol.config import Protocol, RunSettings, default_preset_name, load_preset, load_protocol
from bench.protocol.inputs import load_real, load_synthetic
from bench.regimes import expand_regimes, parse_regime, training_budget
from bench.runfolder import BASELINE, SCHEMA_VERSION, ManifestRef, RunDir, run_name, study_key
from bench.tasks import Task, load_task
from bench.threads import threads_per_process
from bench.tracking import check_mode
from bench.tune import TuneSpec, default_storage


@dataclass(frozen=True)
class MatrixOptions:
    """What `medsynbench run` was asked for; None means "the protocol's, else the task's"."""

    task: str | Path | Task
    real: str | Path
    out: str | Path
    synthetic: Mapping[str, str | Path] = field(default_factory=dict)
    protocol: str | Path | None = None
    regimes: list[str] | None = None
    seeds: list[int] | None = None
    backbone: str | None = None
    preset: str | Path | None = None
    epochs: int | None = None
    tune: int | None = None
    storage: str | None = None
    executor: str = "local"
    workers: int = 1
    ray_address: str | None = None
    wandb: str = "offline"
    resume: bool = False
    cache_dir: str | Path | None = None
    skip_corrupt: bool = False
    threads: int | None = None
    device: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class TaskRef:
    name: str
    version: str
    sha256: str


@dataclass(frozen=True)
class ConfigRef:
    """A preset or protocol: its name and the file it came from (None: the task's own protocol)."""

    name: str
    path: str | None


@dataclass(frozen=True)
class MatrixContext:
    """What every run and study of a matrix shares; plain data, so executors can ship it to other processes."""

    out: str
    task_path: str
    task: TaskRef
    real: ManifestRef
    synthetic: Mapping[str, ManifestRef]
    preset: ConfigRef
    protocol: ConfigRef
    balance: str
    cache_dir: str | None
    skip_corrupt: bool
    wandb: str
    threads: int
    storage: str
    tune: TuneSpec | None

    @property
    def run_dir(self) -> RunDir:
        return RunDir(self.out)

    def manifest(self, generator: str) -> ManifestRef | None:
        """The synthetic manifest a generator's runs draw from (None for the real-only baseline)."""
        return None if generator == BASELINE else self.synthetic[generator]


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    generator: str
    regime: str
    seed: int
    backbone: str
    settings: RunSettings
    identity: str
    tuning_key: str | None = None
    tuning: dict[str, Any] | None = None


@dataclass(frozen=True)
class StudySpec:
    """One optuna study: a (generator, regime, backbone) tuned once for all its seeds."""

    key: str
    generator: str
    regime: str
    backbone: str
    settings: RunSettings


@dataclass
class MatrixPlan:
    task: Task
    out: Path
    ctx: MatrixContext
    runs: list[RunSpec]
    studies: dict[str, StudySpec] = field(default_factory=dict)
    matrix: dict[str, Any] = field(default_factory=dict)
    cards: dict[str, tuple[dict | None, Path | None]] = field(default_factory=dict)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def git_hash() -> str | None:
    """The source tree's commit, read from .git without running git."""
    git = Path(__file__).resolve().parents[2] / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(" ", 1)[1]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        packed = git / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split(" ", 1)[0]
    except OSError:
        return None
    return None


ENV_PACKAGES = (
    "medsynbench",
    "torch",
    "torchvision",
    "timm",
    "monai",
    "numpy",
    "pandas",
    "scikit-learn",
    "optuna",
    "wandb",
    "pydicom",
)


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages whose versions decide the numbers (None: not installed)."""
    pkgs: dict[str, str | None] = {}
    for p in ENV_PACKAGES:
        try:
            pkgs[p] = version(p)
        except PackageNotFoundError:
            pkgs[p] = None
    return pkgs


def environment(device: str | None = None) -> dict[str, Any]:
    """Package versions, device, threads and git commit: what a run's numbers may depend on."""
    import torch

    pkgs = package_versions()
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": pkgs,
        "device": dev,
        "torch_threads": torch.get_num_threads(),
        "git": git_hash(),
    }
    if str(dev).startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


def default_threads(workers: int) -> int:
    """CPU threads per run: the cores this process may use divided among the worker processes, at least 1.

    One worker uses every core. Threads that spin at OpenMP barriers collapse when another process takes a core
    (the command line makes them sleep when it starts on a loaded machine, `bench.threads.choose_wait_policy`);
    CPU predictions are reproducible for a given thread count, which `config.json` records.
    """
    return threads_per_process(workers)


def _settings(
    options: MatrixOptions, task: Task, proto: Protocol, preset_ref: str | Path
) -> tuple[Any, RunSettings]:
    # torch (bench.models): only once a matrix is planned, not when bench.protocol is imported
    from bench.models import check_kind, model_info

    pre, preset_path = load_preset(preset_ref)
    base = pre.model_dump(exclude={"name", "description"})
    base.update({k: v for k, v in proto.train.model_dump().items() if v is not None})
    if options.epochs is not None:
        if options.epochs < 1:
            raise BadInput(f"--epochs {options.epochs}: must be at least 1")
        base["epochs"] = int(options.epochs)
    if options.device is not None:
        base["device"] = options.device
    # A preset (cpu, gpu, smoke ...) is training settings shared by both task kinds: its backbone applies only to
    # tasks of its kind, so a segmentation task run with the cpu preset keeps the task's own segmenter.
    pre_bb = pre.backbone if pre.backbone and model_info(pre.backbone).kind == task.kind else None
    bb = options.backbone or proto.backbone or proto.train.backbone or pre_bb or task.protocol.backbone
    # A classifier for a segmentation task (or the reverse) fails here, before anything is decoded or written.
    check_kind(bb, task.kind)
    base["backbone"] = bb
    # An explicit size in the protocol wins; otherwise the task's own size for this preset, then the preset's.
    if proto.train.image_size is not None:
        size = proto.train.image_size
    elif pre.name in task.image.presets:
        size = task.image.presets[pre.name]
    else:
        size = pre.image_size or task.image.size
    base["image_size"] = int(size)
    base["budget_unit"] = proto.budget.unit
    return (pre, preset_path), RunSettings.model_validate(base)


def _manifest_ref(path: str | Path, m: Manifest) -> ManifestRef:
    return ManifestRef(path=str(Path(path).resolve()), sha256=m.sha256, file_sha256=sha256_file(path))


def plan_matrix(options: MatrixOptions) -> MatrixPlan:
    """Resolve every input and setting into the list of runs (nothing is trained or written)."""
    check_mode(options.wandb)
    task = load_task(options.task)
    out = Path(options.out).resolve()
    run_dir = RunDir(out)
    proto, proto_path = load_protocol(options.protocol) if options.protocol else (Protocol(), None)
    preset_ref = options.preset or proto.preset or default_preset_name()
    (pre, preset_path), settings = _settings(options, task, proto, preset_ref)
    bb = settings.backbone

    regime_list = expand_regimes(
        list(options.regimes or proto.regimes or task.protocol.regimes), proto.ratios or task.protocol.ratios
    )
    seeds = options.seeds
    seed_list = [int(s) for s in (seeds if seeds is not None else proto.seeds or task.protocol.seeds)]
    if not regime_list:
        raise BadInput("no regimes to run (give --regimes or a protocol with `regimes`)")
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise BadInput(f"seeds {seed_list}: give at least one seed, each once")

    tune_spec = proto.tune
    if options.tune is not None:
        if options.tune < 0:
            raise BadInput(f"--tune {options.tune}: must be 0 or more trials")
        tune_spec = tune_spec.model_copy(update={"trials": int(options.tune)})
    tuning_on = tune_spec.trials > 0
    tune_dump = tune_spec.model_dump() if tuning_on else None

    real_m = load_real(options.real, task)
    syn_paths = {k: Path(v) for k, v in (options.synthetic or {}).items()}
    needs = [r.name for r in regime_list if r.uses_synthetic]
    if needs and not syn_paths:
        raise BadInput(f"regime(s) {needs} need synthetic data: give --synthetic NAME=MANIFEST")
    syn_m: dict[str, Manifest] = {}
    cards: dict[str, tuple[dict | None, Path | None]] = {}
    for name, p in syn_paths.items():
        m, card, cpath = load_synthetic(name, p, task, real_m)
        syn_m[name] = m
        cards[name] = (card, cpath)

    control_regimes = {
        name: expand_regimes(list(regs), proto.ratios or task.protocol.ratios)
        for name, regs in proto.controls.items()
    }
    rdf = real_m.df
    n_real_train = int(((rdf["split"] == "train") & rdf["site"].isin(task.sites.train)).sum())
    budget = training_budget(
        n_real_train,
        settings.epochs,
        settings.batch_size,
        unit=settings.budget_unit,
        pretrain_epochs=settings.pretrain_epochs,
    )

    workers = max(1, int(options.workers))
    if options.threads is not None and options.threads < 1:
        raise BadInput(f"--threads {options.threads}: must be at least 1")
    task_spec = task.spec()
    ctx = MatrixContext(
        out=str(out),
        task_path=str(run_dir.task_file),
        task=TaskRef(task.name, task.version, _hash(task_spec)),
        real=_manifest_ref(options.real, real_m),
        synthetic={n: _manifest_ref(p, syn_m[n]) for n, p in syn_paths.items()},
        preset=ConfigRef(pre.name, str(preset_path)),
        protocol=ConfigRef(proto.name, str(proto_path) if proto_path else None),
        balance=proto.balance,
        cache_dir=str(options.cache_dir) if options.cache_dir else None,
        skip_corrupt=bool(options.skip_corrupt),
        wandb=options.wandb,
        threads=int(options.threads) if options.threads else default_threads(workers),
        storage=options.storage or default_storage(out),
        tune=tune_spec if tuning_on else None,
    )

    runs: list[RunSpec] = []
    studies: dict[str, StudySpec] = {}

    def runs_regime(gen: str, reg: Any) -> bool:
        if gen == BASELINE or gen not in control_regimes:
            return True
        return reg.name in {r.name for r in control_regimes[gen]}

    # A control runs its own regimes, even those the protocol's list leaves out (e.g. `synthetic` in a mixing-only
    # protocol); every other generator runs the protocol's.
    extra = [
        r for regs in control_regimes.values() for r in regs if r.name not in {x.name for x in regime_list}
    ]
    all_regimes = regime_list + [r for i, r in enumerate(extra) if r.name not in {x.name for x in extra[:i]}]
    for seed in seed_list:
        for reg in all_regimes:
            gens = [g for g in syn_paths if runs_regime(g, reg)] if reg.uses_synthetic else [BASELINE]
            if reg not in regime_list:
                gens = [g for g in gens if g in control_regimes]
            for gen in gens:
                ident = _hash(
                    {
                        "schema": SCHEMA_VERSION,
                        "task": task_spec,
                        "real": real_m.sha256,
                        "synthetic": syn_m[gen].sha256 if gen != BASELINE else None,
                        "settings": settings.model_dump(),
                        "balance": proto.balance,
                        "regime": reg.name,
                        "seed": seed,
                        "generator": gen,
                        "tune": tune_dump,
                    }
                )
                # An arm that trains on no real label (synthetic-only, its controls) takes the real-only arm's
                # tuned parameters: a study of its own would let the real validation labels choose for it.
                s_gen, s_reg = (BASELINE, "real") if reg.kind == "synthetic" else (gen, reg.name)
                skey = study_key(s_gen, parse_regime(s_reg).slug, bb) if tuning_on else None
                if skey and skey not in studies:
                    studies[skey] = StudySpec(skey, s_gen, s_reg, bb, settings)
                rid = run_name(gen, reg.slug, bb, seed)
                runs.append(RunSpec(rid, gen, reg.name, seed, bb, settings, ident, skey))

    manifests = {
        "real": ctx.real.model_dump(),
        "synthetic": {n: ref.model_dump() for n, ref in ctx.synthetic.items()},
    }
    matrix = {
        "schema_version": SCHEMA_VERSION,
        "task": {"name": task.name, "version": task.version, "file": run_dir.task_file.name},
        "protocol": {
            "name": proto.name,
            "path": ctx.protocol.path,
            "regimes": [r.name for r in regime_list],
            "seeds": seed_list,
            "backbone": bb,
            "balance": proto.balance,
            "preset": pre.name,
            "settings": settings.model_dump(),
            "budget": budget,
            "controls": {n: [r.name for r in regs] for n, regs in control_regimes.items()},
            "tune": {"trials": tune_spec.trials, **(tune_dump or {})} if tuning_on else {"trials": 0},
        },
        "manifests": manifests,
        "generators": {
            n: {
                "manifest": manifests["synthetic"][n],
                "card_path": str(cards[n][1]) if cards[n][1] else None,
                "card": cards[n][0],
            }
            for n in syn_paths
        },
        "runs": [r.run_id for r in runs],
    }
    return MatrixPlan(task, out, ctx, runs, studies, matrix, cards)


def with_tuning(spec: RunSpec, tuning: dict[str, Any] | None) -> RunSpec:
    return dataclasses.replace(spec, tuning=tuning)
