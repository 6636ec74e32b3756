"""Regime parsing and the composition each regime promises, counted by hand."""

from __future__ import annotations

import pandas as pd
import pytest

from bench.errors import BadInput
from bench.regimes import compose, expand_regimes, parse_regime

CLASSES = ["blank", "disc", "bar"]
# Real training data: 5 blank, 3 disc, 2 bar patients, 2 images each -> 10 / 6 / 4 images.
PATIENTS = {"blank": 5, "disc": 3, "bar": 2}


def real_train() -> pd.DataFrame:
    rows = []
    for label, n in PATIENTS.items():
        for p in range(n):
            site = f"s{p % 3 + 1}"
            for k in range(2):
                pid = f"{label}-{p}"
                rows.append(
                    dict(
                        case_id=f"{pid}_{k}",
                        patient_id=pid,
                        label=label,
                        site=site,
                        origin="real",
                        split="train",
                    )
                )
    return pd.DataFrame(rows)


def synthetic(per_class: dict[str, int] | None = None) -> pd.DataFrame:
    per_class = per_class or {"blank": 30, "disc": 30, "bar": 2}
    rows = [
        dict(
            case_id=f"syn-{label}-{i}",
            patient_id=f"syn-{label}-{i}",
            label=label,
            site="synthetic",
            origin="synthetic",
            generator="g",
            split="train",
        )
        for label, n in per_class.items()
        for i in range(n)
    ]
    return pd.DataFrame(rows)


def counts(rows: pd.DataFrame, origin: str) -> dict[str, int]:
    sub = rows[rows["origin"] == origin]
    return {c: int((sub["label"] == c).sum()) for c in CLASSES}


# -- parsing -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,name,slug",
    [
        ("real", "real", "real"),
        ("synthetic", "synthetic", "synthetic"),
        ("pretrain", "pretrain", "pretrain"),
        ("augment:1.0", "augment:1", "augment-1"),
        ("augment:0.5", "augment:0.5", "augment-0.5"),
        ("replace:0.5", "replace:0.5", "replace-0.5"),
        ("scarce:0.25", "scarce:0.25", "scarce-0.25"),
        ("scarce:0.25+synthetic", "scarce:0.25+synthetic", "scarce-0.25+syn"),
        ("Scarce:0.25+syn", "scarce:0.25+synthetic", "scarce-0.25+syn"),
    ],
)
def test_parse_canonical_names_and_slugs(text, name, slug):
    r = parse_regime(text)
    assert r.name == name
    assert r.slug == slug
    assert ":" not in r.slug
    assert parse_regime(r.name) == r


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("mixup", "unknown regime"),
        ("augment", "unknown regime"),
        ("augment:x", "not a number"),
        ("augment:0", "out of range"),
        ("augment:50", "out of range"),
        ("replace:1.5", "out of range"),
        ("scarce:0", "out of range"),
        ("scarce:-0.1+synthetic", "out of range"),
        ("augment:nan", "finite"),
    ],
)
def test_parse_rejects_bad_regimes_naming_them(text, fragment):
    with pytest.raises(BadInput) as e:
        parse_regime(text)
    assert repr(text) in str(e.value)
    assert fragment in str(e.value)


def test_bare_augment_expands_over_ratios_and_duplicates_collapse():
    regs = expand_regimes(["real", "augment", "augment:1"], ratios=[0.5, 1, 2])
    assert [r.name for r in regs] == ["real", "augment:0.5", "augment:1", "augment:2"]
    with pytest.raises(BadInput, match="ratios"):
        expand_regimes(["augment"], ratios=[])


# -- composition -------------------------------------------------------------------------------------------------


def test_real_is_the_training_split_unchanged():
    rows, comp = compose("real", real_train(), None, seed=0, classes=CLASSES)
    assert counts(rows, "real") == {"blank": 10, "disc": 6, "bar": 4}
    assert comp["n_total"] == 20 and comp["n_synthetic"] == 0
    assert sorted(rows["case_id"]) == sorted(real_train()["case_id"])
    # Counts per class x origin x site add up to the rows.
    assert sum(c["n"] for c in comp["counts"]) == 20
    site_s1_blank = [c["n"] for c in comp["counts"] if c["label"] == "blank" and c["site"] == "s1"]
    assert site_s1_blank == [int(((rows["label"] == "blank") & (rows["site"] == "s1")).sum())]


def test_synthetic_follows_real_class_balance_and_says_when_it_resamples():
    rows, comp = compose("synthetic", real_train(), synthetic(), seed=0, classes=CLASSES)
    assert counts(rows, "synthetic") == {"blank": 10, "disc": 6, "bar": 4}
    assert counts(rows, "real") == {"blank": 0, "disc": 0, "bar": 0}
    # Only two synthetic bars exist: each is used once, the shortfall of two is drawn with replacement.
    bars = rows[rows["label"] == "bar"]["case_id"]
    assert set(bars) == {"syn-bar-0", "syn-bar-1"}
    assert comp["sampling"]["with_replacement"] is True
    assert comp["sampling"]["replacement_by_class"] == {"bar": {"needed": 4, "available": 2}}
    # Classes with enough images are drawn without replacement.
    assert rows[rows["label"] == "blank"]["case_id"].is_unique


def test_synthetic_without_replacement_when_enough():
    _, comp = compose(
        "synthetic", real_train(), synthetic({"blank": 10, "disc": 6, "bar": 4}), 0, classes=CLASSES
    )
    assert comp["sampling"]["with_replacement"] is False
    assert comp["n_unique_cases"] == 20


@pytest.mark.parametrize(
    "ratio,syn",
    [
        (0.5, {"blank": 5, "disc": 3, "bar": 2}),
        (1, {"blank": 10, "disc": 6, "bar": 4}),
        (2, {"blank": 20, "disc": 12, "bar": 8}),
    ],
)
def test_augment_adds_r_times_real(ratio, syn):
    rows, comp = compose(f"augment:{ratio}", real_train(), synthetic(), seed=0, classes=CLASSES)
    assert counts(rows, "real") == {"blank": 10, "disc": 6, "bar": 4}
    assert counts(rows, "synthetic") == syn
    assert comp["n_total"] == 20 + int(20 * ratio)


def test_replace_keeps_total_and_class_balance():
    rows, comp = compose("replace:0.5", real_train(), synthetic(), seed=0, classes=CLASSES)
    assert counts(rows, "real") == {"blank": 5, "disc": 3, "bar": 2}
    assert counts(rows, "synthetic") == {"blank": 5, "disc": 3, "bar": 2}
    assert comp["n_total"] == 20
    rows1, _ = compose("replace:1", real_train(), synthetic(), seed=0, classes=CLASSES)
    assert counts(rows1, "real") == {"blank": 0, "disc": 0, "bar": 0}
    assert len(rows1) == 20


def test_scarce_samples_patients_stratified_by_label():
    rows, comp = compose("scarce:0.5", real_train(), None, seed=0, classes=CLASSES)
    # Half the patients per label, rounded half up: 5 -> 3, 3 -> 2, 2 -> 1; every image of a kept patient stays.
    assert counts(rows, "real") == {"blank": 6, "disc": 4, "bar": 2}
    assert comp["scarce"]["patients_kept"] == 6 and comp["scarce"]["patients_total"] == 10
    per_patient = rows.groupby("patient_id").size()
    assert (per_patient == 2).all()
    # A tiny fraction still keeps one patient of every label.
    rows_small, _ = compose("scarce:0.01", real_train(), None, seed=0, classes=CLASSES)
    assert rows_small.groupby("label")["patient_id"].nunique().to_dict() == {"bar": 1, "blank": 1, "disc": 1}


def test_scarce_plus_synthetic_fills_up_to_full_size_per_class():
    rows, comp = compose("scarce:0.5+synthetic", real_train(), synthetic(), seed=0, classes=CLASSES)
    assert counts(rows, "real") == {"blank": 6, "disc": 4, "bar": 2}
    assert counts(rows, "synthetic") == {"blank": 4, "disc": 2, "bar": 2}
    assert comp["n_total"] == 20
    # The same seed keeps the same real patients as plain scarce:F, so the two are paired.
    plain, _ = compose("scarce:0.5", real_train(), None, seed=0, classes=CLASSES)
    assert set(rows[rows["origin"] == "real"]["case_id"]) == set(plain["case_id"])


def test_pretrain_has_a_synthetic_stage_then_the_real_one():
    rows, comp = compose("pretrain", real_train(), synthetic(), seed=0, classes=CLASSES)
    pre = rows[rows["stage"] == "pretrain"]
    fine = rows[rows["stage"] == "finetune"]
    assert (
        counts(pre, "synthetic") == {"blank": 10, "disc": 6, "bar": 4}
        and (pre["origin"] == "synthetic").all()
    )
    assert counts(fine, "real") == {"blank": 10, "disc": 6, "bar": 4} and (fine["origin"] == "real").all()
    assert comp["stages"]["pretrain"]["n_synthetic"] == 20
    assert comp["stages"]["finetune"]["n_real"] == 20


def test_compose_is_deterministic_per_seed():
    a, _ = compose("scarce:0.5+synthetic", real_train(), synthetic(), seed=3, classes=CLASSES)
    b, _ = compose("scarce:0.5+synthetic", real_train(), synthetic(), seed=3, classes=CLASSES)
    pd.testing.assert_frame_equal(a, b)
    picks = {
        tuple(sorted(compose("scarce:0.5", real_train(), None, seed=s, classes=CLASSES)[0]["patient_id"]))
        for s in range(8)
    }
    assert len(picks) > 1


def test_balance_synthetic_uses_the_synthetic_proportions():
    syn = synthetic({"blank": 10, "disc": 10, "bar": 20})
    rows, comp = compose("augment:1", real_train(), syn, seed=0, classes=CLASSES, balance="synthetic")
    assert counts(rows, "synthetic") == {"blank": 5, "disc": 5, "bar": 10}
    assert comp["balance"] == "synthetic"


def test_missing_synthetic_class_is_recorded():
    syn = synthetic({"blank": 10, "disc": 10})
    rows, comp = compose("synthetic", real_train(), syn, seed=0, classes=CLASSES)
    assert counts(rows, "synthetic") == {"blank": 10, "disc": 6, "bar": 0}
    assert comp["sampling"]["missing_classes"] == {"bar": 4}


def test_regimes_that_need_synthetic_data_say_so():
    with pytest.raises(BadInput, match="augment:1"):
        compose("augment:1", real_train(), None, seed=0, classes=CLASSES)
