"""The main job, end to end through the installed console script, as the README runs it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench.phantom import phantom_phi_values


def _console_script() -> str:
    exe = Path(sys.executable).with_name("medsynbench")
    found = str(exe) if exe.exists() else shutil.which("medsynbench")
    if not found:
        pytest.fail("the medsynbench console script is not installed next to this Python")
    return found


def _run_demo(out: Path, preset: str, task: str | None = None) -> dict:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    proc = subprocess.run(
        [
            _console_script(),
            "demo",
            "--preset",
            preset,
            "--out",
            str(out),
            *(["--task", task] if task else []),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # It ends by printing the leaderboard table and the paths of the report and the leaderboard page.
    assert "| Rank" in proc.stdout
    assert "report:" in proc.stdout and "leaderboard:" in proc.stdout
    return json.loads((out / "demo.json").read_text())


def _metrics(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "run" / "evaluation" / "metrics.parquet")


def _external_vs_test(table: pd.DataFrame, generator: str, regime: str) -> tuple[float, float]:
    t = table[(table.generator == generator) & (table.regime == regime) & (table.metric == "auroc_macro")]
    t = t[t.scope == "overall"]
    ext = t[(t.split == "external")].value.iloc[0]
    test = t[(t.split == "test")].value.iloc[0]
    return float(ext), float(test)


def _check_common(out: Path, summary: dict) -> None:
    assert Path(summary["report"]).is_file() and Path(summary["leaderboard"]).is_file()
    records = sorted((out / "leaderboard" / "records").glob("*.json"))
    assert len(records) == 4  # copycat, pca-gmm, ddpm and the real-only reference
    html = Path(summary["leaderboard"]).read_text()
    assert all(g in html for g in ("copycat", "pca-gmm", "ddpm"))
    # The model audit reuses the matrix's models; its stage is timed with the others and the report shows it.
    assert "Privacy of the trained models" in summary["stages"]
    assert "## Privacy of the trained model" in (out / "run" / "evaluation" / "report.md").read_text()

    # Known answer: the memorization control is caught, the others are not.
    priv = {
        g: json.loads((out / "run" / "privacy" / g / "privacy.json").read_text())
        for g in ("copycat", "pca-gmm")
    }
    assert priv["copycat"]["flagged"] is True
    assert priv["pca-gmm"]["flagged"] is False

    # Every number in the table has an interval and a count.
    table = _metrics(out)
    ok = table[table.status == "ok"]
    assert len(ok) > 100
    assert ok[["value", "ci_low", "ci_high"]].notna().all().all()
    assert (ok.ci_low <= ok.ci_high + 1e-12).all()
    assert (ok.n_cases > 0).all() and (ok.n_patients > 0).all()
    assert {"site", "subgroup", "intersection", "overall"} <= set(table.scope)

    # No patient name, id or birth date from the DICOM export reaches anything written downstream. Values are
    # matched as whole tokens: a birth date's eight digits do turn up inside the digits of some probability.
    phi = phantom_phi_values(out / "data" / "phantom")
    assert phi
    token = re.compile(r"[0-9A-Za-z]+")
    wanted = {v: token.findall(v) for v in phi}
    leaks = []
    for root in (out, Path(os.environ["MEDSYNBENCH_CACHE"])):
        for f in root.rglob("*"):
            if not f.is_file() or (out / "data" / "phantom") in f.parents:
                continue
            if f.suffix == ".parquet":
                df = pd.read_parquet(f)
                text = df.select_dtypes(exclude="number").astype(str).to_csv()
            elif f.suffix == ".npy":  # pixels after the header: only the header can hold text
                text = f.read_bytes()[:4096].decode("latin-1")
            else:
                text = f.read_bytes().decode("latin-1")
            tokens = set(token.findall(text))
            leaks += [
                (str(f), v)
                for v, parts in wanted.items()
                if parts and all(t in tokens for t in parts) and v in text
            ]
    assert not leaks, leaks[:10]


# What the demo writes to share: pages and records, reports, fidelity and privacy results, generator cards. Run
# internals (matrix.json, each run's config.json, W&B offline logs, demo.json) stay on the machine that ran them.
SHARED = ("leaderboard", "run/evaluation", "run/fidelity", "run/privacy", "synthetic/*/card.*")


def _local_path_leaks(out: Path) -> list[tuple[str, str]]:
    """Shared files that name the demo's own absolute folder (or the folder it resolves to)."""
    needles = {str(out), str(out.resolve())}
    found = []
    for pattern in SHARED:
        for root in out.glob(pattern):
            for f in [root] if root.is_file() else root.rglob("*"):
                if not f.is_file():
                    continue
                if f.suffix == ".parquet":
                    text = pd.read_parquet(f).astype(str).to_csv()
                else:
                    text = f.read_bytes().decode("latin-1")
                found += [(str(f.relative_to(out)), n) for n in needles if n in text]
    return found


@pytest.mark.slow
def test_segmentation_demo_shows_the_known_answers(tmp_path):
    out = tmp_path / "demo-seg"
    summary = _run_demo(out, "cpu", task="mediastinal-neoplasm-seg")
    assert _local_path_leaks(out) == []
    # The board recounted every label map against its own truth masks: real-only, pca-gmm and copycat.
    records = sorted((out / "leaderboard" / "records").glob("*.json"))
    assert len(records) == 3 and len(list((out / "leaderboard" / "predictions").glob("*.labelmaps.npz"))) == 3
    ev = out / "run" / "evaluation"
    controls = json.loads((ev / "summary.json").read_text())["controls"]
    status = {(c["control"], c["check"]): c for c in controls}
    for key in [
        ("copycat", "gain_contains_zero"),
        ("copycat", "privacy_flagged"),
        ("mask-shuffle", "dice_at_chance"),
        ("real-holdout", "ratio_near_one"),
        ("copycat", "synthetic-only model leaks about as much as real-only (model privacy)"),
    ]:
        assert status[key]["status"] == "PASS", status[key]
    table = pd.read_parquet(ev / "metrics.parquet")
    dice = table[(table.metric == "dice_macro") & (table.scope == "overall")]
    real = dice[(dice.generator == "none") & (dice.regime == "real")].set_index("split")
    # Real-only segmenters find the lesions well above the best image-blind map (macro Dice about 0.10).
    assert real.loc["test", "ci_low"] > 0.2 and real.loc["external", "ci_low"] > 0.15, real.to_dict()
    cmp = pd.read_parquet(ev / "comparisons.parquet")
    pca = cmp[
        (cmp.generator == "pca-gmm")
        & (cmp.regime == "synthetic")
        & (cmp.metric == "dice_macro")
        & (cmp.scope == "overall")
    ].set_index("split")
    # Asserted is what held in at least 9 of 10 independent draws of the demo's protocol (scripts/measure_verdicts.py
    # --task mediastinal-neoplasm-seg; the task card's table): every control, and pca-gmm below real-only on the
    # internal test split (-0.22 to -0.32 over the draws, every interval below 0). On the external hospitals its
    # interval reached 0 in some draws (seeds disagree more there): not asserted. Real-only's lowest interval
    # ends over the draws: 0.41 (test) and 0.26 (external).
    assert pca.loc["test", "ci_high"] < 0, pca.loc["test"].to_dict()
    assert summary["seconds"] >= sum(summary["stages"].values()) - 1


def test_the_local_path_scan_finds_a_path(tmp_path):
    out = tmp_path / "demo"
    (out / "run" / "fidelity" / "g").mkdir(parents=True)
    (out / "run" / "fidelity" / "g" / "fidelity.json").write_text(
        f'{{"weights": "{out}/run/x/checkpoint.pt"}}'
    )
    (out / "run" / "matrix.json").write_text(f'{{"path": "{out}/data/manifest.parquet"}}')
    assert _local_path_leaks(out) == [("run/fidelity/g/fidelity.json", str(out))]


@pytest.mark.slow
def test_demo_cpu_shows_the_known_answers(tmp_path):
    out = tmp_path / "demo"
    summary = _run_demo(out, "cpu")
    _check_common(out, summary)
    # Nothing meant to leave the machine holds an absolute local path.
    assert _local_path_leaks(out) == []
    table = _metrics(out)
    real_ext, real_test = _external_vs_test(table, "none", "real")
    # The external hospitals are harder than the internal test split for real-only.
    assert real_ext < real_test
    # The controls come out as declared (equal budgets make copycat's mixing gain vanish).
    controls = json.loads((out / "run" / "evaluation" / "summary.json").read_text())["controls"]
    status = {(c["control"], c["check"]): c for c in controls}
    for key in [
        ("copycat", "gain_contains_zero"),
        ("copycat", "privacy_flagged"),
        ("label-shuffle", "chance"),
        ("real-holdout", "ratio_near_one"),
    ]:
        assert status[key]["status"] == "PASS", status[key]
    gain = status[("copycat", "gain_contains_zero")]
    assert gain["ci_low"] <= 0 <= gain["ci_high"]
    assert "Controls" in (out / "run" / "evaluation" / "report.md").read_text().split("## Settings")[0]
    # Real-only is well above chance, and the crude generator is measurably worse than real data: the phantom's
    # classes differ in structure a PCA + Gaussian mixture of pixels cannot reproduce.
    assert real_test > 0.75 and real_ext > 0.65
    cmp = pd.read_parquet(out / "run" / "evaluation" / "comparisons.parquet")
    syn = cmp[(cmp.regime == "synthetic") & (cmp.metric == "auroc_macro") & (cmp.scope == "overall")]
    pca = syn[syn.generator == "pca-gmm"].set_index("split")
    ddpm = syn[syn.generator == "ddpm"].set_index("split")
    # Task 3.1.0 (final weights, three paired seeds, t intervals on the seed stage), measured on the phantom's
    # seed-0 draw: pca-gmm -0.145 [-0.238, -0.053] internal, -0.029 [-0.073, 0.015] external (a tie the report
    # gives its detectable difference); ddpm -0.290 [-0.347, -0.232] internal, -0.187 [-0.226, -0.147] external.
    # Asserted are the verdicts that held in at least 9 of 10 independent draws of the demo's protocol
    # (scripts/measure_verdicts.py, the task card's table): both generators below real-only on the internal test
    # split (ddpm 10/10, pca-gmm 9/10). On the external hospitals pca-gmm ties in 8 of 10 draws and ddpm's
    # interval reached 0 in one (-0.059 [-0.214, 0.096]): neither is asserted.
    for gen in (pca, ddpm):
        assert gen.loc["test", "ci_high"] < 0, gen.loc["test"].to_dict()
    # Stage timings and the threads they ran with are kept.
    assert summary["seconds"] >= sum(summary["stages"].values()) - 1
    assert summary["threads"]["cores"] >= 1 and summary["threads"]["run_threads_per_worker"] >= 1


def test_demo_refuses_to_replace_a_folder_it_did_not_make(tmp_path, capsys):
    from bench.cli import main

    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    assert main(["demo", "--preset", "smoke", "--out", str(out)]) == 2
    assert "not a demo output folder" in capsys.readouterr().err
    assert (out / "thesis.tex").read_text() == "do not delete"


def test_a_stage_that_refuses_its_input_stops_the_demo_with_exit_2(tmp_path, monkeypatch, capsys):
    # A stage that exits 2 (a failing control makes `submit` refuse to publish) is the run's verdict, not a fault of
    # ours: the demo stops with exit 2 naming the stage, and stages after it do not run.
    import bench.cli as cli_mod

    real_main = cli_mod.main
    calls = []

    def fake(argv=None):
        argv = list(argv or [])
        if argv and argv[0] == "demo":
            return real_main(argv)
        calls.append(argv[0])
        return 2 if argv[0] == "data" and argv[1] == "validate" else 0

    monkeypatch.setattr(cli_mod, "main", fake)
    assert real_main(["demo", "--preset", "smoke", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "Validate the manifest" in err and "exit code 2" in err
    assert "generate" not in calls and "run" not in calls


def _measure_verdicts():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "measure_verdicts.py"
    spec = importlib.util.spec_from_file_location("measure_verdicts", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_measure_verdicts_counts_draws_flips_and_misses(tmp_path, capsys):
    mv = _measure_verdicts()
    # Fabricated results of 10 draws at 1 and 2 threads per worker: a control that fails once, a comparison that
    # fails twice at 2 threads only (two flips), a check that was not run in one draw.
    results = []
    for draw in range(10):
        for t in (1, 2):
            verdicts = {
                "control label-shuffle: chance": draw != 3,
                "pca-gmm synthetic below real-only (external)": not (t == 2 and draw in (4, 7)),
                "control copycat: privacy_flagged": None if draw == 0 else True,
            }
            results.append({"draw": draw, "threads": t, "seeds": [3 * draw], "verdicts": verdicts})
    rows = {line.split(" | ")[0].strip("| "): line for line in mv.verdict_table(results).splitlines()}
    assert rows["verdict"].count("|") == 5  # verdict, two settings, flips
    assert rows["control label-shuffle: chance"].split(" | ")[1:] == ["9/10", "9/10", "0 |"]
    pca = rows["pca-gmm synthetic below real-only (external)"].split(" | ")[1:]
    assert pca == ["10/10", "8/10 **below**", "2 |"]
    assert rows["control copycat: privacy_flagged"].split(" | ")[1:] == ["9/9", "9/9", "0 |"]
    # The same table from what a working folder holds, printed by the script without running anything.
    for r in results:
        d = tmp_path / f"draw-{r['draw']}"
        d.mkdir(exist_ok=True)
        (d / f"verdicts-t{r['threads']}.json").write_text(json.dumps(r))
    assert mv.main(["--work", str(tmp_path), "--table-only"]) == 0
    out = capsys.readouterr().out
    assert "10 draw(s)" in out and "8/10 **below**" in out


def test_verdicts_are_read_from_an_evaluation_folder(tmp_path):
    mv = _measure_verdicts()
    ev = tmp_path / "evaluation"
    ev.mkdir()
    controls = [
        {"control": "label-shuffle", "check": "chance", "status": "PASS"},
        {"control": "real-holdout", "check": "ratio_near_one", "status": "FAIL"},
        {"control": "copycat", "check": "privacy_flagged", "status": "NOT RUN"},
    ]
    (ev / "summary.json").write_text(json.dumps({"controls": controls}))
    base = {"metric": "auroc_macro", "scope": "overall"}
    pd.DataFrame(
        [
            {**base, "generator": "pca-gmm", "regime": "synthetic", "split": "external", "ci_high": -0.01},
            {**base, "generator": "pca-gmm", "regime": "synthetic", "split": "test", "ci_high": 0.02},
            {**base, "generator": "ddpm", "regime": "synthetic", "split": "external", "ci_high": -0.2},
        ]
    ).to_parquet(ev / "comparisons.parquet")
    pd.DataFrame(
        [
            {**base, "generator": "none", "regime": "real", "split": "external", "value": 0.74},
            {**base, "generator": "none", "regime": "real", "split": "test", "value": 0.86},
        ]
    ).to_parquet(ev / "metrics.parquet")
    v = mv.verdicts_of(ev)
    assert v["control label-shuffle: chance"] is True
    assert v["control real-holdout: ratio_near_one"] is False
    assert v["control copycat: privacy_flagged"] is None
    assert v["pca-gmm synthetic below real-only (external)"] is True
    assert v["pca-gmm synthetic below real-only (test)"] is False
    assert v["ddpm synthetic below real-only (test)"] is None
    assert v["real-only external below internal test"] is True


def test_segmentation_verdicts_are_read_on_macro_dice(tmp_path):
    mv = _measure_verdicts()
    ev = tmp_path / "evaluation"
    ev.mkdir()
    controls = [{"control": "mask-shuffle", "check": "dice_at_chance", "status": "PASS"}]
    (ev / "summary.json").write_text(json.dumps({"controls": controls}))
    dice, auroc = {"metric": "dice_macro", "scope": "overall"}, {"metric": "auroc_macro", "scope": "overall"}
    pd.DataFrame(
        [
            {**dice, "generator": "pca-gmm", "regime": "synthetic", "split": "external", "ci_high": -0.04},
            {**dice, "generator": "pca-gmm", "regime": "synthetic", "split": "test", "ci_high": 0.01},
            # an AUROC row of the same arm must not be what decides a segmentation verdict
            {**auroc, "generator": "pca-gmm", "regime": "synthetic", "split": "test", "ci_high": -0.5},
        ]
    ).to_parquet(ev / "comparisons.parquet")
    pd.DataFrame(
        [
            {**dice, "generator": "none", "regime": "real", "split": "external", "value": 0.26},
            {**dice, "generator": "none", "regime": "real", "split": "test", "value": 0.41},
        ]
    ).to_parquet(ev / "metrics.parquet")
    v = mv.verdicts_of(ev)
    assert v["control mask-shuffle: dice_at_chance"] is True
    assert v["pca-gmm synthetic below real-only (external)"] is True
    assert v["pca-gmm synthetic below real-only (test)"] is False
    assert not any(k.startswith("ddpm") for k in v)  # the segmentation demo states nothing of ddpm
    assert v["real-only external below internal test"] is True


def test_rejudged_verdicts_come_from_the_stored_tables_not_the_summary(tmp_path):
    from test_leaderboard_support import make_run

    from bench.cli import main

    mv = _measure_verdicts()
    run = make_run(tmp_path / "run", {"good": 2.0, "label-shuffle": 0.0})
    ev = run / "evaluation"
    assert main(["evaluate", str(run), "--out", str(ev), "--n-boot", "60"]) == 0
    name = "control label-shuffle: chance"
    made = mv.verdicts_of(ev)[name]
    assert made is not None and mv.verdicts_of(ev, rejudge=True)[name] is made
    # A summary written under another check says the opposite; judged again from the tables by this code's check,
    # the verdict is what the tables give.
    summary = json.loads((ev / "summary.json").read_text())
    for c in summary["controls"]:
        if c["control"] == "label-shuffle":
            c["status"] = "FAIL" if made else "PASS"
    (ev / "summary.json").write_text(json.dumps(summary))
    assert mv.verdicts_of(ev)[name] is (not made)
    assert mv.verdicts_of(ev, rejudge=True)[name] is made
