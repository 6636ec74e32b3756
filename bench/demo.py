"""`medsynbench demo`: the whole benchmark on the built-in phantom, through the same commands a user runs.

Every stage calls the public command line, so the demo exercises exactly what the README documents and each stage
leaves its files behind for inspection.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.console import Console

from bench.errors import BadInput
from bench.generators import get_generator, list_generators
from bench.leaderboard.config import CONFIG_FILE, Bootstrap, LeaderboardConfig, ProtocolPin, TaskPin
from bench.runfolder import RunDir
from bench.tasks import load_task
from bench.threads import available_cores, threads_per_process, wait_policy

TASK = "mediastinal-neoplasm"
GENERATORS = ("copycat", "pca-gmm", "ddpm")
# Controls with a known answer (see bench/evaluation/controls.py); the protocol runs them on `synthetic` only.
CONTROLS = ("label-shuffle", "real-holdout")


@dataclass(frozen=True)
class DemoPreset:
    name: str
    patients: int
    slices: int
    phantom_size: int
    train_preset: str  # a name in configs/presets
    image_size: int | None  # None: the task's size for the preset
    protocol: str  # a name in configs/protocols
    ddpm_config: str
    n_boot: int
    workers: int = 1
    ddpm_args: tuple[str, ...] = ()
    extra_run_args: tuple[str, ...] = field(default_factory=tuple)


# smoke shows the mechanics in about two minutes; cpu is large enough for the known answers to show reliably.
PRESETS = {
    "smoke": DemoPreset(
        "smoke",
        200,
        2,
        64,
        "smoke",
        None,
        "demo",
        "tiny",
        200,
        workers=2,
        ddpm_args=("--set", "train_steps=300"),
    ),
    # 700 patients: the task reserves 35% of the training-site patients for the positive control, and with fewer
    # than about 150 training patients real-only is too weak for pca-gmm's shortfall to show (measured at 400).
    # 128 px: the task's 280 mm crop then still covers 70-110 pixels, so shrinking it to 32 averages the noise down
    # as it does for a real 512 px series (from a 64 px export the external hospitals' noise passes almost as is).
    "cpu": DemoPreset("cpu", 700, 2, 128, "demo", 32, "demo", "tiny", 500, workers=2),
    # 384 px: the 280 mm crop covers 215-326 pixels, so it reaches the 224 px training size without stretching.
    "gpu": DemoPreset("gpu", 1000, 5, 384, "gpu", None, "default", "full", 1000),
}


# The segmentation demo: the same phantom written with its DICOM SEG masks, segmenters trained on image-mask pairs.
SEG_TASK = "mediastinal-neoplasm-seg"
SEG_GENERATORS = ("copycat", "pca-gmm")
# mask-shuffle: each image with another patient's mask (Dice at chance); real-holdout: unseen real pairs (ratio ~1).
SEG_CONTROLS = ("mask-shuffle", "real-holdout")
# Without any pair generator the matrix still runs what needs no synthetic data.
SEG_REAL_ONLY_REGIMES = "real,scarce:0.25"
# Sized from unet-small's measured 10.6 optimizer steps/s at 32 px (one thread, batch 32; CHANGELOG 0.2.0).
SEG_PRESETS = {
    "smoke": DemoPreset("smoke", 120, 2, 64, "demo-seg", 32, "demo-seg", "tiny", 200, workers=2),
    "cpu": DemoPreset("cpu", 700, 2, 128, "demo-seg", 32, "demo-seg", "tiny", 500, workers=2),
    "gpu": DemoPreset("gpu", 1000, 5, 384, "gpu", None, "default", "full", 1000),
}


def default_preset() -> str:
    try:
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001 - no torch means no GPU
        return "cpu"


def _configs_dir() -> Path:
    here = Path(__file__).resolve().parent
    for d in (here.parent / "configs", here / "_configs"):
        if d.is_dir():
            return d
    raise FileNotFoundError("configs/ folder not found next to the package")


def generate_args(
    p: DemoPreset, generator: str, real: Path, out: Path, seed: int = 0, task: str = TASK
) -> list[str]:
    """The `generate` command line the demo runs for one generator or control."""
    size_args = ["--size", str(p.image_size)] if p.image_size else ["--preset", p.train_preset]
    args = ["generate", "--task", task, "--generator", generator, "--real", str(real), "--out", str(out)]
    args += ["--seed", str(seed)]
    if generator != "ddpm":
        return args + size_args
    # The tiny diffusion model works at its own small size (16 px) and training resizes its images; the full one at
    # the preset's size.
    args += ["--config", p.ddpm_config, *p.ddpm_args]
    return args + (size_args if p.ddpm_config != "tiny" else [])


def _fresh_out(out: Path) -> Path:
    out = Path(out).resolve()
    marker = out / ".medsynbench-demo"
    if out.exists() and any(out.iterdir()):
        # Only ever delete a folder an earlier demo made: the marker says so.
        if not marker.exists():
            raise BadInput(f"{out}: exists and is not a demo output folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("written by medsynbench demo; the next demo run replaces this folder\n")
    return out


def run_demo(
    out: Path,
    cli: Callable[[list[str]], int],
    preset: str | None = None,
    fresh: bool = False,
    console: Console | None = None,
    task: str | None = None,
) -> dict:
    """Every stage on the phantom through `cli` (the command line's `main`, passed in by `medsynbench demo`: the
    demo runs what a user runs, and the command line is the layer above it). `task`: the phantom task to run
    (default the classification task; `mediastinal-neoplasm-seg` runs the segmentation demo)."""
    console = console or Console()
    if task is not None and load_task(task).is_segmentation:
        return run_seg_demo(out, cli, preset, console, task)
    if task is not None and load_task(task).name != TASK:
        raise BadInput(f"--task {task}: the demo runs on the built-in phantom tasks ({TASK}, {SEG_TASK})")
    p = PRESETS[preset or default_preset()]
    out = _fresh_out(out)
    data = out / "data"
    real = data / "manifest.parquet"
    run = out / "run"
    board = out / "leaderboard"
    stages: list[tuple[str, Callable[[], list[str]]]] = []

    def step(title: str, args: list[str] | Callable[[], list[str]]) -> None:
        stages.append((title, args if callable(args) else (lambda a=args: a)))

    step(
        "Phantom chest CT export (DICOM + labels.csv)",
        [
            "data",
            "phantom",
            "--out",
            str(data / "phantom"),
            "--patients",
            str(p.patients),
            "--slices",
            str(p.slices),
            "--size",
            str(p.phantom_size),
            "--seed",
            "0",
        ],
    )
    step(
        "Real manifest",
        ["data", "manifest", "--task", TASK, "--root", str(data / "phantom"), "--out", str(real)],
    )
    step("Validate the manifest", ["data", "validate", str(real), "--task", TASK])
    # The leaderboard scores against its own answer key, never against the labels a submission carries.
    step("Answer key of the demo leaderboard", ["leaderboard", "key", str(board), "--real", str(real)])
    for g in (*GENERATORS, *CONTROLS):
        args = generate_args(p, g, real, out / "synthetic" / g, seed=0)
        step(f"{'Control' if g in CONTROLS else 'Reference generator'} {g}", args)
    run_args = [
        "run",
        "--task",
        TASK,
        "--real",
        str(real),
        "--out",
        str(run),
        "--preset",
        str(_configs_dir() / "presets" / f"{p.train_preset}.yaml"),
        "--protocol",
        str(_configs_dir() / "protocols" / f"{p.protocol}.yaml"),
        "--wandb",
        "offline",
        "--workers",
        str(p.workers),
    ]
    for g in (*GENERATORS, *CONTROLS):
        run_args += ["--synthetic", f"{g}={out / 'synthetic' / g / 'manifest.parquet'}"]
    step("Protocol matrix (regimes x generators x seeds)", run_args + list(p.extra_run_args))
    # Before the evaluation, so the report shows fidelity beside utility; features of the run's real-only model.
    step(
        "Fidelity, diversity and label fidelity",
        [
            "fidelity",
            "--run",
            str(run),
            "--n-boot",
            str(min(p.n_boot, 200)),
            "--kid-subsets",
            "20",
            "--fd-boot",
            "20",
        ],
    )

    def privacy_args(g: str) -> list[str]:
        # Classifier features come from the real-only model the matrix just trained (no downloaded weights).
        ckpt = [r.checkpoint for r in RunDir(run).baseline_runs(seed=0) if r.checkpoint.is_file()]
        args = [
            "privacy",
            "--task",
            TASK,
            "--synthetic",
            str(out / "synthetic" / g / "manifest.parquet"),
            "--train",
            str(out / "synthetic" / g / "train_manifest.parquet"),
            "--holdout",
            str(real),
            "--test",
            str(real),
            "--out",
            str(run / "privacy" / g),
        ]
        return args + (["--checkpoint", str(ckpt[0])] if ckpt else [])

    for g in GENERATORS:
        step(f"Privacy audit of {g}", lambda g=g: privacy_args(g))
    # Membership inference against the models the matrix trained (their references too): no model is trained here.
    step("Privacy of the trained models", ["privacy-model", str(run), "--n-boot", str(p.n_boot)])
    # After the audits: the Controls section checks that copycat is flagged.
    step(
        "Evaluation with patient-clustered intervals and controls",
        ["evaluate", str(run), "--out", str(run / "evaluation"), "--n-boot", str(p.n_boot)],
    )
    step(
        "Submit to the demo leaderboard",
        ["submit", str(run), "--leaderboard", str(board), "--submitter", "demo"],
    )
    step("Build the leaderboard", ["leaderboard", "build", str(board)])

    _init_leaderboard(board, p)
    t0 = time.perf_counter()
    timings = run_stages(stages, cli, console)
    total = time.perf_counter() - t0
    summary = {
        "preset": p.name,
        "seconds": round(total, 1),
        "stages": timings,
        "threads": _threads_used(p),
        "report": str(run / "evaluation" / "report.html"),
        "leaderboard": str(board / "index.html"),
    }
    _finish(out, board, summary, console, f"preset {p.name}")
    return summary


def _finish(out: Path, board: Path, summary: dict, console: Console, what: str) -> None:
    """Write demo.json, then show the leaderboard's table and where the report and the page are."""
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.rule("[bold green]Leaderboard")
    readme = board / "README.md"
    if readme.exists():
        console.print(readme.read_text())
    console.print(f"report:      {summary['report']}")
    console.print(f"leaderboard: {summary['leaderboard']}")
    console.print(f"wall time:   {summary['seconds']:.0f} s ({what})")


def run_stages(
    stages: list[tuple[str, Callable[[], list[str]]]], cli: Callable[[list[str]], int], console: Console
) -> dict[str, float]:
    """Run each stage's command line in order; returns seconds per stage. Exit 2 stops the demo as bad input."""
    timings = {}
    for i, (title, make_args) in enumerate(stages, 1):
        args = make_args()
        console.rule(f"[bold]{i}/{len(stages)} {title}")
        console.print(f"[dim]$ medsynbench {' '.join(args)}[/dim]")
        ts = time.perf_counter()
        rc = cli(args)
        timings[title] = round(time.perf_counter() - ts, 1)
        if rc == 2:
            # The stage refused its input and said why above (e.g. a control failed, so nothing is published).
            raise BadInput(
                f"demo stage {i}/{len(stages)} {title!r} stopped with exit code 2; its reason is above"
            )
        if rc != 0:
            raise RuntimeError(f"demo stage {title!r} failed with exit code {rc}")
    return timings


def _threads_used(p: DemoPreset) -> dict:
    """CPU threads the stages ran with (the stage timings depend on them)."""
    return {
        "cores": available_cores(),
        "generate": threads_per_process(1),
        "run_workers": p.workers,
        "run_threads_per_worker": threads_per_process(p.workers),
        "openmp_wait": wait_policy(),
    }


def _init_leaderboard(board: Path, p: DemoPreset, task_name: str = TASK) -> None:
    """A leaderboard of the demo's own: pinned to the task and protocol, not to the shipped manifests (the demo's
    phantom is smaller than the seeded leaderboard's). A segmentation board scores at the size the demo trains at."""
    task = load_task(task_name)
    protocol = yaml.safe_load((_configs_dir() / "protocols" / f"{p.protocol}.yaml").read_text())
    size: int | str | None = None
    if task.kind == "segmentation":
        size = p.image_size or (p.train_preset if p.train_preset in task.image.presets else None)
    cfg = LeaderboardConfig(
        title=f"{task.name} demo ({p.name} preset)",
        task=TaskPin(name=task.name, version=task.version),
        protocol=ProtocolPin(regimes=protocol.get("regimes"), seeds=protocol.get("seeds")),
        primary_metric=task.metrics.primary,
        id_salt=f"{task.name}-demo-leaderboard",
        bootstrap=Bootstrap(n=p.n_boot, seed=0),
        image_size=size,
    )
    board.mkdir(parents=True, exist_ok=True)
    (board / CONFIG_FILE).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def pair_generators(names: tuple[str, ...]) -> list[str]:
    """The generators among `names` that produce image-mask pairs in this installation (`supports`)."""
    known = set(list_generators())
    out = []
    for g in names:
        supports = getattr(get_generator(g), "supports", None) if g in known else None
        if callable(supports) and supports("segmentation"):
            out.append(g)
    return out


def run_seg_demo(
    out: Path, cli: Callable[[list[str]], int], preset: str | None, console: Console, task: str = SEG_TASK
) -> dict:
    """The segmentation demo: phantom with masks, manifest, its answer key (truth masks included), pair generators
    and controls, the run matrix of segmenters, copycat's privacy audit (pixel features), membership inference
    against the trained segmenters, the evaluation (Dice, lesion detection, controls) and the demo leaderboard,
    which recounts every submitted label map against its own masks."""
    p = SEG_PRESETS[preset or default_preset()]
    out = _fresh_out(out)
    data = out / "data"
    real = data / "manifest.parquet"
    run = out / "run"
    board = out / "leaderboard"
    phantom = ["data", "phantom", "--out", str(data / "phantom"), "--patients", str(p.patients)]
    phantom += ["--slices", str(p.slices), "--size", str(p.phantom_size), "--seed", "0", "--masks"]
    stages: list[tuple[str, Callable[[], list[str]]]] = [
        ("Phantom chest CT export (DICOM + DICOM SEG masks + labels.csv)", lambda: phantom),
        (
            "Real manifest",
            lambda: ["data", "manifest", "--task", task, "--root", str(data / "phantom"), "--out", str(real)],
        ),
        ("Validate the manifest and its masks", lambda: ["data", "validate", str(real), "--task", task]),
        # The board scores against its own truth masks, never against the counts a submission carries.
        (
            "Answer key of the demo leaderboard (labels and truth masks)",
            lambda: ["leaderboard", "key", str(board), "--real", str(real)],
        ),
    ]
    gens, controls = pair_generators(SEG_GENERATORS), pair_generators(SEG_CONTROLS)
    for g in (*gens, *controls):
        args = generate_args(p, g, real, out / "synthetic" / g, seed=0, task=task)
        stages.append(
            (
                f"{'Control' if g in controls else 'Reference generator'} {g} (image-mask pairs)",
                lambda a=args: a,
            )
        )
    run_args = ["run", "--task", task, "--real", str(real), "--out", str(run)]
    run_args += ["--preset", str(_configs_dir() / "presets" / f"{p.train_preset}.yaml")]
    run_args += ["--protocol", str(_configs_dir() / "protocols" / f"{p.protocol}.yaml")]
    run_args += ["--wandb", "offline", "--workers", str(p.workers)]
    for g in (*gens, *controls):
        run_args += ["--synthetic", f"{g}={out / 'synthetic' / g / 'manifest.parquet'}"]
    if not gens and not controls:
        run_args += ["--regimes", SEG_REAL_ONLY_REGIMES]
    stages.append(("Protocol matrix of segmenters (regimes x generators x seeds)", lambda: run_args))
    # Every generator's pairs are audited (the board requires it; copycat's control check reads it), on pixel
    # features: a segmenter is no feature extractor.
    for g in gens:
        syn = out / "synthetic" / g
        audit = ["privacy", "--task", task, "--synthetic", str(syn / "manifest.parquet")]
        audit += ["--train", str(syn / "train_manifest.parquet"), "--holdout", str(real), "--test", str(real)]
        audit += ["--out", str(run / "privacy" / g)]
        stages.append((f"Privacy audit of {g} (pixel features)", lambda a=audit: a))
    # Membership inference against the trained segmenters (no model is trained here): copycat's model-leak check.
    model_audit = ["privacy-model", str(run), "--n-boot", str(p.n_boot)]
    stages.append(("Privacy of the trained segmenters", lambda: model_audit))
    evaluate = ["evaluate", str(run), "--out", str(run / "evaluation"), "--n-boot", str(p.n_boot)]
    stages.append(
        ("Evaluation: Dice and lesion detection with patient-clustered intervals, controls", lambda: evaluate)
    )
    stages.append(
        (
            "Submit to the demo leaderboard",
            lambda: ["submit", str(run), "--leaderboard", str(board), "--submitter", "demo"],
        )
    )
    stages.append(("Build the leaderboard", lambda: ["leaderboard", "build", str(board)]))
    _init_leaderboard(board, p, task)
    t0 = time.perf_counter()
    timings = run_stages(stages, cli, console)
    total = time.perf_counter() - t0
    summary = {
        "task": task,
        "preset": p.name,
        "seconds": round(total, 1),
        "stages": timings,
        "generators": [*gens, *controls],
        "threads": _threads_used(p),
        "report": str(run / "evaluation" / "report.html"),
        "leaderboard": str(board / "index.html"),
    }
    _finish(out, board, summary, console, f"preset {p.name}, task {task}")
    return summary
