"""Equal training budgets and the controls: generators with known answers, their checks, and the refusal to publish."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import TINY_TASK, make_tiny_dataset
from scipy.stats import norm
from test_leaderboard_support import make_board, make_run

from bench.cli import main
from bench.evaluation.controls import FAIL, NOT_RUN, PASS, check_controls, failures, level_note
from bench.generators import control_of, list_controls
from bench.generators.card import hash_id, read_card
from bench.generators.controls import shuffled_labels
from bench.manifest import read_manifest
from bench.regimes import training_budget
from bench.splits import assign_splits
from bench.tasks import Task, load_task

# ---------------------------------------------------------------------------------------------------- budget


def test_budget_is_epochs_times_real_batches_for_every_regime():
    b = training_budget(100, 6, 32)
    assert b["steps"] == 6 * 4 and b["steps_per_real_epoch"] == 4 and b["samples_seen"] == 24 * 32
    # pretrain: half of the budget by default, the preset's pretrain_epochs otherwise; the total is the budget.
    assert b["pretrain_split"] == {"pretrain": 12, "finetune": 12}
    assert training_budget(100, 6, 32, pretrain_epochs=2)["pretrain_split"] == {"pretrain": 8, "finetune": 16}
    legacy = training_budget(100, 6, 32, unit="epochs")
    assert legacy["steps"] is None and legacy["unit"] == "epochs"


def test_budget_rejects_unknown_units():
    from bench.errors import BadInput

    with pytest.raises(BadInput, match="budget unit"):
        training_budget(10, 1, 4, unit="minutes")


# ---------------------------------------------------------------------------------------------------- registry


def test_controls_are_registered_with_expected_outcomes():
    assert {"copycat", "label-shuffle", "real-holdout"} <= set(list_controls())
    assert control_of("pca-gmm") is None and control_of("no-such-generator") is None
    kinds = {n: [c.kind for c in control_of(n).checks] for n in ("copycat", "label-shuffle", "real-holdout")}
    assert kinds == {
        "copycat": ["gain_contains_zero", "privacy_flagged"],
        "label-shuffle": ["chance"],
        "real-holdout": ["ratio_near_one"],
    }
    assert control_of("label-shuffle").regimes == ["synthetic"]
    assert control_of("real-holdout").role == "positive"


def test_shuffled_labels_keep_class_counts_and_are_seeded():
    y = np.repeat(np.arange(3), [10, 20, 30])
    a, b = shuffled_labels(y, 0), shuffled_labels(y, 0)
    assert np.array_equal(a, b) and not np.array_equal(a, shuffled_labels(y, 1))
    assert np.array_equal(np.bincount(a), np.bincount(y))
    assert (a != y).mean() > 0.3  # most labels move: with these counts about 60% are expected to


@pytest.mark.parametrize("n", [30, 100, 342, 1000])
def test_shuffled_labels_are_independent_of_the_true_ones_in_every_draw(n):
    """Each cell of the true x shuffled table is within 2 images of n_true * n_shuffled / N (a plain permutation
    of 342 images is typically off by 4-5), so the control's labels carry no information in this very draw."""
    for seed in range(5):
        rng = np.random.default_rng([n, seed])
        y = rng.choice(6, size=n, p=[0.28, 0.16, 0.15, 0.14, 0.14, 0.13])
        f = shuffled_labels(y, seed)
        assert np.array_equal(np.bincount(f, minlength=6), np.bincount(y, minlength=6))
        table = np.zeros((6, 6))
        np.add.at(table, (y, f), 1)
        independent = np.outer(np.bincount(y, minlength=6), np.bincount(f, minlength=6)) / n
        assert np.abs(table - independent).max() <= 2, (n, seed, table, independent)
    # String labels come back as the same strings.
    names = np.array(["cyst", "normal", "normal", "thymoma", "cyst", "normal"])
    assert sorted(shuffled_labels(names, 0)) == sorted(names)


# ---------------------------------------------------------------------------------------------------- generators


def _task(**splits) -> Task:
    return Task.model_validate({**TINY_TASK, "splits": {**TINY_TASK["splits"], **splits}})


def _reserve_task(root) -> tuple[Task, object]:
    spec = json.loads(json.dumps(TINY_TASK))
    spec["splits"] = {
        "unit": "patient_id",
        "train": 0.4,
        "reserve": 0.3,
        "val": 0.15,
        "test": 0.15,
        "seed": 0,
    }
    d = root / "tasks" / "tiny"
    d.mkdir(parents=True)
    (d / "task.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return load_task(d / "task.yaml"), d / "task.yaml"


@pytest.fixture(scope="module")
def reserve_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("controls")
    old = os.environ.get("MEDSYNBENCH_CACHE")
    os.environ["MEDSYNBENCH_CACHE"] = str(root / "cache")
    task, path = _reserve_task(root)
    real = make_tiny_dataset(root / "data", task, patients_per_site=20)
    yield {"root": root, "task": task, "task_path": path, "real": real}
    if old is None:
        os.environ.pop("MEDSYNBENCH_CACHE", None)
    else:
        os.environ["MEDSYNBENCH_CACHE"] = old


def test_reserve_split_takes_its_share_of_training_site_patients(reserve_env):
    task = reserve_env["task"]
    df = read_manifest(reserve_env["real"]).df
    inner = df[df["site"].isin(task.sites.train)]
    per = inner.groupby("split")["patient_id"].nunique()
    n = inner["patient_id"].nunique()
    assert set(per.index) == {"train", "val", "test", "reserve"}
    assert abs(per["reserve"] / n - 0.3) < 0.08 and abs(per["train"] / n - 0.4) < 0.08
    # Patients never cross splits, and the fraction 0 reproduces the old assignment exactly.
    assert (inner.groupby("patient_id")["split"].nunique() == 1).all()
    plain = _task(reserve=0.0)
    base = Task.model_validate(TINY_TASK)
    assert assign_splits(inner, plain)["split"].tolist() == assign_splits(inner, base)["split"].tolist()


def _generate(env, name: str) -> object:
    out = env["root"] / name
    args = ["generate", "--task", str(env["task_path"]), "--generator", name, "--real", str(env["real"])]
    assert main([*args, "--out", str(out), "--seed", "2"]) == 0
    return out


def test_label_shuffle_hands_back_training_images_with_permuted_labels(reserve_env):
    env, task = reserve_env, reserve_env["task"]
    out = _generate(env, "label-shuffle")
    syn = read_manifest(out / "manifest.parquet")
    train = read_manifest(out / "train_manifest.parquet").df
    assert len(syn.df) == len(train)
    assert syn.df["label"].value_counts().to_dict() == train["label"].value_counts().to_dict()
    from bench.generators.pipeline import load_pixels

    x_syn = load_pixels(syn, task, 32)
    x_train = load_pixels(read_manifest(out / "train_manifest.parquet"), task, 32)
    # Every synthetic image is a training image (unchanged) ...
    flat = {x.tobytes(): lab for x, lab in zip(x_train, train["label"], strict=True)}
    assert all(x.tobytes() in flat for x in x_syn)
    # ... and a good share of them carry another class than their own.
    moved = np.mean([flat[x.tobytes()] != lab for x, lab in zip(x_syn, syn.df["label"], strict=True)])
    assert moved > 0.3
    card = read_card(out / "card.yaml")
    assert card.control["role"] == "negative" and card.control["checks"][0]["kind"] == "chance"


def test_real_holdout_draws_reserve_patients_sized_like_the_training_set(reserve_env):
    env = reserve_env
    out = _generate(env, "real-holdout")
    real = read_manifest(env["real"]).df
    inner = real[real["site"].isin(env["task"].sites.train)]
    n_train = int((inner["split"] == "train").sum())
    reserve = inner[inner["split"] == "reserve"]
    syn = read_manifest(out / "manifest.parquet").df
    assert len(syn) == n_train
    used = read_manifest(out / "train_manifest.parquet").df
    assert set(used["split"]) == {"reserve"} and set(used["case_id"]) == set(reserve["case_id"])
    card = read_card(out / "card.yaml")
    assert card.training.splits == ["reserve"]
    assert set(card.training.patients) == {hash_id(p) for p in reserve["patient_id"]}
    assert card.control["role"] == "positive"


def test_real_holdout_without_reserve_is_bad_input(tmp_path, capsys):
    d = tmp_path / "tasks" / "tiny"
    d.mkdir(parents=True)
    (d / "task.yaml").write_text(yaml.safe_dump(TINY_TASK, sort_keys=False))
    real = make_tiny_dataset(tmp_path / "data", load_task(d / "task.yaml"))
    rc = main(
        ["generate", "--task", str(d / "task.yaml"), "--generator", "real-holdout", "--real", str(real)]
        + ["--out", str(tmp_path / "rh")]
    )
    assert rc == 2 and "splits.reserve" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- checks


def _row(gen, regime, metric, value, lo, hi, split="external", **extra):
    return dict(
        generator=gen, regime=regime, backbone="b", metric=metric, scope="overall", split=split, value=value,
        ci_low=lo, ci_high=hi, status="ok", **extra,
    )  # fmt: skip


def _inputs(shuffle_ci=(0.45, 0.56), gain_ci=(-0.02, 0.03), ratio_ci=(0.93, 1.04), flagged=True):
    table = pd.DataFrame(
        [
            _row("none", "real", "auroc_macro", 0.8, 0.75, 0.85),
            _row("label-shuffle", "synthetic", "auroc_macro", sum(shuffle_ci) / 2, *shuffle_ci),
        ]
    )
    comps = pd.DataFrame(
        [
            _row("copycat", "augment:1", "auroc_macro", 0.8, 0, 0, diff=0.005, ratio=1.0, ratio_ci_low=0.9,
                 ratio_ci_high=1.1) | {"ci_low": gain_ci[0], "ci_high": gain_ci[1]},
            _row("rh", "synthetic", "auroc_macro", 0.79, 0, 0, diff=-0.01, ratio=0.99, ratio_ci_low=ratio_ci[0],
                 ratio_ci_high=ratio_ci[1]),
        ]
    )  # fmt: skip
    privacy = {"copycat": {"memorization_rate": 0.9, "ci_low": 0.85, "ci_high": 0.95, "flagged": flagged}}
    gens = {"copycat": "copycat", "label-shuffle": "label-shuffle", "rh": "real-holdout"}
    return table, comps, privacy, gens


def _status(results) -> dict[tuple[str, str], str]:
    return {(r.control, r.check): r.status for r in results}


def test_controls_pass_on_the_expected_numbers():
    task = _task(reserve=0.2, train=0.4)
    res = check_controls(*_inputs()[:3], task, _inputs()[3])
    assert set(_status(res).values()) == {PASS}, [r.to_dict() for r in res]
    assert failures(res) == []
    gain = next(r for r in res if r.check == "gain_contains_zero")
    # three interval checks ran: each at 1 - 0.05 / 3, the 95% interval widened about its midpoint accordingly
    f = norm.ppf(1 - 0.05 / 6) / norm.ppf(0.975)
    assert gain.level == pytest.approx(1 - 0.05 / 3)
    assert (gain.value, gain.generator) == (0.005, "copycat")
    assert (gain.ci_low, gain.ci_high) == pytest.approx((0.005 - 0.025 * f, 0.005 + 0.025 * f))
    assert "98.3% each (Bonferroni over 3)" in level_note(res)


@pytest.mark.parametrize(
    "over, control, check",
    [
        ({"gain_ci": (0.04, 0.09)}, "copycat", "gain_contains_zero"),  # copies "gain": the budget is unequal
        ({"flagged": False}, "copycat", "privacy_flagged"),
        ({"shuffle_ci": (0.56, 0.66)}, "label-shuffle", "chance"),
        ({"ratio_ci": (0.7, 0.9)}, "real-holdout", "ratio_near_one"),
    ],
)
def test_each_control_fails_on_its_own_wrong_number(over, control, check):
    task = _task(reserve=0.2, train=0.4)
    table, comps, privacy, gens = _inputs(**over)
    st = _status(check_controls(table, comps, privacy, task, gens))
    assert st.pop((control, check)) == FAIL
    assert set(st.values()) == {PASS}
    (line,) = failures(check_controls(table, comps, privacy, task, gens))
    assert line.startswith(f"control {control} ")


@pytest.mark.parametrize(
    ("ratio_ci", "status"),
    [
        # checked at 98.3% (Bonferroni over 3 interval checks): each 95% half-width x 1.2216 about the ratio (here
        # the midpoint), then the draw of training patients added in quadrature: z 2.3940 x sd 0.04 = 0.0958
        ((0.93, 1.04), PASS),  # contains 1 as it stands
        ((0.86, 0.94), PASS),  # half 0.0489 -> hypot 0.1075: upper end 1.0075 reaches 1 only with the draw
        ((0.84, 0.90), FAIL),  # half 0.0366 -> hypot 0.1026: upper end 0.9726
        ((1.08, 1.15), FAIL),  # half 0.0428 -> hypot 0.1049: lower end 1.0101, the control beats real data
        ((0.60, 0.80), FAIL),  # a broken synthetic path: upper end 0.7 + hypot(0.1222, 0.0958) = 0.8553
    ],
)
def test_positive_control_allows_the_draw_of_training_patients_and_no_more(ratio_ci, status):
    from bench.generators.controls import HOLDOUT_DRAW_SD

    assert HOLDOUT_DRAW_SD == 0.04  # the hand-worked cases below assume it
    task = _task(reserve=0.2, train=0.4)
    table, comps, privacy, gens = _inputs(ratio_ci=ratio_ci)
    comps.loc[comps["generator"] == "rh", "ratio"] = sum(ratio_ci) / 2
    (r,) = [r for r in check_controls(table, comps, privacy, task, gens) if r.control == "real-holdout"]
    assert r.status == status, r.to_dict()
    mid, half = sum(ratio_ci) / 2, (ratio_ci[1] - ratio_ci[0]) / 2
    reach = math.hypot(half * norm.ppf(1 - 0.05 / 6) / norm.ppf(0.975), norm.ppf(1 - 0.05 / 6) * 0.04)
    assert (r.ci_low, r.ci_high) == pytest.approx((mid - reach, mid + reach))
    if status == FAIL:
        assert "does not reach 1 even with the draw of training patients (sd 0.04)" in r.reason


@pytest.mark.parametrize(
    ("seed_sd", "status"),
    [
        # 0.44 [0.40, 0.48] at 95%, three seeds, checked at 98.3%. Seed part sd^2 / 3; patients' part
        # (0.04 / 1.96)^2 minus it. seed_sd 0.05: the seeds' part is all of it, half = t_2 7.6488 x 0.02887 =
        # 0.2208 -> [0.219, 0.661] holds 0.5 (z alone: 0.44 + 0.0489 would not).
        (0.05, PASS),
        # seed_sd 0.005: patients' part 0.0004082, half sqrt(2.3940^2 x 0.0004082 + 7.6488^2 x 8.33e-6) = 0.0532
        # -> upper end 0.4932: a consistent shortfall from chance is still a failure
        (0.005, FAIL),
    ],
)
def test_chance_check_takes_the_seed_stage_on_t_quantiles_of_its_seeds(seed_sd, status):
    task = _task(reserve=0.2, train=0.4)
    table, comps, privacy, gens = _inputs(shuffle_ci=(0.40, 0.48))
    table["seed_sd"] = seed_sd
    ls = _row("label-shuffle", "synthetic", "auroc_macro", 0.44, 0, 0, diff=-0.36, n_seeds=3)
    comps = pd.concat([comps, pd.DataFrame([ls])], ignore_index=True)
    (r,) = [r for r in check_controls(table, comps, privacy, task, gens) if r.check == "chance"]
    assert r.status == status, r.to_dict()
    half = {0.05: 0.2208, 0.005: 0.0532}[seed_sd]
    assert (r.ci_low, r.ci_high) == pytest.approx((0.44 - half, 0.44 + half), abs=2e-4)
    # without a seed count (no comparison row for the arm) the check keeps normal quantiles: 0.44 +/- 0.0489
    (plain,) = [r for r in check_controls(table, _inputs()[1], privacy, task, gens) if r.check == "chance"]
    assert (plain.status, plain.ci_high) == (FAIL, pytest.approx(0.44 + 0.04 * 2.3940 / 1.9600, abs=1e-4))


def test_missing_controls_and_audits_are_not_run_with_a_reason():
    task = Task.model_validate(TINY_TASK)
    table, comps, _, _ = _inputs()
    res = check_controls(table, comps, {}, task, {"copycat": "copycat"})
    by = {(r.control, r.check): r for r in res}
    assert by[("copycat", "privacy_flagged")].status == NOT_RUN
    assert "privacy" in by[("copycat", "privacy_flagged")].reason
    assert by[("label-shuffle", "chance")].status == NOT_RUN
    assert "reserve" in by[("real-holdout", "ratio_near_one")].reason  # the tiny task sets no reserve
    assert failures(res) == []


# ---------------------------------------------------------------------------------------------------- leaderboard


def test_submit_refuses_a_run_whose_negative_control_learns(tmp_path, capsys):
    # label-shuffle predictions as good as a real generator's: the chance check fails, nothing is published.
    run = make_run(tmp_path / "run", {"good": 2.0, "label-shuffle": 2.0})
    board = make_board(tmp_path / "board")
    assert main(["submit", str(run), "--leaderboard", str(board)]) == 2
    err = capsys.readouterr().err
    assert "control label-shuffle" in err and "FAIL" in err
    assert not list((board / "records").glob("*.json")) if (board / "records").exists() else True


def test_build_refuses_a_board_whose_reference_fails_its_controls(tmp_path, capsys):
    run = make_run(tmp_path / "run", {"good": 2.0, "label-shuffle": 0.0})
    board = make_board(tmp_path / "board")
    assert main(["submit", str(run), "--leaderboard", str(board)]) == 0
    assert main(["leaderboard", "build", str(board)]) == 0
    text = (board / "README.md").read_text()
    assert "Controls of the reference run" in text and "label-shuffle" in text and "PASS" in text
    assert "Controls of the reference run" in (board / "index.html").read_text()
    ref = next(
        p for p in (board / "records").glob("*.json") if json.loads(p.read_text())["kind"] == "reference"
    )
    rec = json.loads(ref.read_text())
    chance = next(c for c in rec["controls"] if c["check"] == "chance")
    assert chance["status"] == PASS and chance["ci_low"] <= 0.5 <= chance["ci_high"]
    chance["status"] = FAIL
    ref.write_text(json.dumps(rec))
    capsys.readouterr()
    assert main(["leaderboard", "build", str(board)]) == 2
    assert "control label-shuffle" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "run")
