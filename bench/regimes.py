"""Training regimes: which real and synthetic images a run trains on.

A regime is a string a user writes on the command line or in a protocol YAML:

    real                   the real training split (the baseline)
    synthetic              synthetic only (train on synthetic, test on real)
    augment:R              all real images plus R x |real| synthetic ones
    replace:F              a fraction F of the real images replaced by synthetic ones; same total
    scarce:F               a fraction F of the real *patients* only
    scarce:F+synthetic     the scarce real patients plus synthetic images filling up to the full real size
    pretrain               pretrain on synthetic (as `synthetic`), then fine-tune on real (as `real`)

Class balance follows the real training data: synthetic images are drawn per class in proportion to the real class
counts, without replacement while a class has enough images and with replacement only for the shortfall (said so in
the composition). `compose` is deterministic for a seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BadInput

KINDS = ("real", "synthetic", "augment", "replace", "scarce", "scarce+synthetic", "pretrain")
# Upper bound on augment:R. Larger ratios drown the real data and are almost certainly a typo (e.g. 50 for 0.5).
MAX_AUGMENT = 20.0
BALANCES = ("real", "synthetic")

REGIME_HELP = (
    "real | synthetic | augment:R (0<R<=20) | replace:F (0<F<=1) | scarce:F (0<F<=1) | "
    "scarce:F+synthetic | pretrain"
)


@dataclass(frozen=True)
class Regime:
    kind: str
    ratio: float | None = None

    @property
    def name(self) -> str:
        """Canonical string, e.g. `augment:1`, `scarce:0.25+synthetic`."""
        if self.kind == "scarce+synthetic":
            return f"scarce:{_fmt(self.ratio)}+synthetic"
        if self.ratio is None:
            return self.kind
        return f"{self.kind}:{_fmt(self.ratio)}"

    @property
    def slug(self) -> str:
        """File-system friendly form used in run folder names (`augment-1`, `scarce-0.25+syn`)."""
        if self.kind == "scarce+synthetic":
            return f"scarce-{_fmt(self.ratio)}+syn"
        return self.name.replace(":", "-")

    @property
    def uses_synthetic(self) -> bool:
        return self.kind not in ("real", "scarce")

    def __str__(self) -> str:
        return self.name


def _fmt(x: float | None) -> str:
    return f"{x:g}"


def parse_regime(s: str | Regime) -> Regime:
    """Parse a regime string; an unknown regime or a ratio out of range raises BadInput naming it."""
    if isinstance(s, Regime):
        return s
    raw = str(s).strip()
    text = raw.lower().replace(" ", "")
    if text in ("real", "synthetic", "pretrain"):
        return Regime(text)
    head, sep, rest = text.partition(":")
    if not sep or head not in ("augment", "replace", "scarce"):
        raise BadInput(f"regime {raw!r}: unknown regime (expected {REGIME_HELP})")
    kind = head
    if head == "scarce" and rest.endswith("+synthetic"):
        kind, rest = "scarce+synthetic", rest[: -len("+synthetic")]
    elif head == "scarce" and rest.endswith("+syn"):
        kind, rest = "scarce+synthetic", rest[: -len("+syn")]
    try:
        ratio = float(rest)
    except ValueError:
        raise BadInput(f"regime {raw!r}: {rest!r} is not a number (expected {REGIME_HELP})") from None
    if not math.isfinite(ratio):
        raise BadInput(f"regime {raw!r}: ratio must be finite")
    if kind == "augment":
        if not 0 < ratio <= MAX_AUGMENT:
            raise BadInput(f"regime {raw!r}: ratio R={ratio:g} out of range (0, {MAX_AUGMENT:g}]")
    elif not 0 < ratio <= 1:
        raise BadInput(f"regime {raw!r}: fraction F={ratio:g} out of range (0, 1]")
    return Regime(kind, ratio)


def expand_regimes(items: list[str], ratios: list[float] | None = None) -> list[Regime]:
    """Parse a list of regimes; a bare `augment` expands to `augment:R` for every protocol ratio."""
    out: list[Regime] = []
    for item in items:
        if str(item).strip().lower() == "augment":
            if not ratios:
                raise BadInput("regime 'augment': give a ratio (augment:R) or list `ratios` in the protocol")
            out += [parse_regime(f"augment:{r:g}") for r in ratios]
        else:
            out.append(parse_regime(item))
    seen: set[str] = set()
    uniq = []
    for r in out:
        if r.name not in seen:
            seen.add(r.name)
            uniq.append(r)
    return uniq


# -- composition -------------------------------------------------------------------------------------------------


def _apportion(weights: dict[str, int], total: int) -> dict[str, int]:
    """Split `total` over classes proportionally to `weights` (largest remainder, ties by class order)."""
    s = sum(weights.values())
    if s == 0 or total == 0:
        return {k: 0 for k in weights}
    exact = {k: total * w / s for k, w in weights.items()}
    base = {k: int(math.floor(v)) for k, v in exact.items()}
    short = total - sum(base.values())
    order = sorted(weights, key=lambda k: (-(exact[k] - base[k]), list(weights).index(k)))
    for k in order[:short]:
        base[k] += 1
    return base


class _Sampler:
    """Draws synthetic rows per class; records where replacement or missing classes were unavoidable."""

    def __init__(self, synthetic: pd.DataFrame, rng: np.random.Generator):
        self.syn = synthetic.reset_index(drop=True)
        self.rng = rng
        self.by_class = {
            str(k): np.asarray(v) for k, v in self.syn.groupby("label", sort=True).groups.items()
        }
        self.replacement: dict[str, dict[str, int]] = {}
        self.missing: dict[str, int] = {}

    def draw(self, label: str, n: int) -> pd.DataFrame:
        if n <= 0:
            return self.syn.iloc[:0]
        pool = self.by_class.get(label)
        if pool is None or len(pool) == 0:
            self.missing[label] = self.missing.get(label, 0) + n
            return self.syn.iloc[:0]
        if n <= len(pool):
            idx = self.rng.choice(pool, size=n, replace=False)
        else:
            # Every available image once, then only the shortfall with replacement.
            extra = self.rng.choice(pool, size=n - len(pool), replace=True)
            idx = np.concatenate([self.rng.permutation(pool), extra])
            rec = self.replacement.setdefault(label, {"needed": 0, "available": int(len(pool))})
            rec["needed"] += int(n)
        return self.syn.iloc[np.sort(idx)]

    def draw_counts(self, counts: dict[str, int]) -> pd.DataFrame:
        parts = [self.draw(k, n) for k, n in counts.items()]
        parts = [p for p in parts if len(p)]
        return pd.concat(parts, ignore_index=True) if parts else self.syn.iloc[:0].copy()

    def notes(self) -> dict[str, Any]:
        return {
            "with_replacement": bool(self.replacement),
            "replacement_by_class": self.replacement,
            "missing_classes": self.missing,
        }


def _round_half_up(x: float) -> int:
    # Python's round() rounds half to even (round(2.5) == 2); counts here should round the way people do.
    return int(math.floor(x + 0.5 + 1e-9))


def _class_counts(df: pd.DataFrame, classes: list[str]) -> dict[str, int]:
    vc = df["label"].astype(str).value_counts()
    return {c: int(vc.get(c, 0)) for c in classes}


def _patient_labels(df: pd.DataFrame) -> pd.Series:
    """Each patient's majority label (ties to the first in sorted order), for stratified patient sampling."""
    return df.groupby("patient_id", sort=True)["label"].agg(
        lambda s: s.astype(str).value_counts().sort_index().idxmax()
    )


def _scarce(real: pd.DataFrame, frac: float, rng: np.random.Generator) -> tuple[pd.DataFrame, dict[str, Any]]:
    plabels = _patient_labels(real)
    keep: list[str] = []
    per_label: dict[str, dict[str, int]] = {}
    for label, pids in plabels.groupby(plabels, sort=True):
        ids = np.asarray(sorted(map(str, pids.index)))
        n = max(1, _round_half_up(frac * len(ids))) if len(ids) else 0
        chosen = rng.choice(ids, size=n, replace=False) if n < len(ids) else ids
        keep += list(chosen)
        per_label[str(label)] = {"kept": int(n), "of": int(len(ids))}
    rows = real[real["patient_id"].astype(str).isin(set(keep))]
    info = {
        "fraction": frac,
        "patients_kept": len(keep),
        "patients_total": int(plabels.size),
        "patients_by_label": per_label,
    }
    return rows, info


def _with_origin(df: pd.DataFrame, origin: str) -> pd.DataFrame:
    out = df.copy()
    out["origin"] = origin
    return out


def compose(
    regime: str | Regime,
    real_train: pd.DataFrame,
    synthetic: pd.DataFrame | None,
    seed: int,
    *,
    classes: list[str] | None = None,
    balance: str = "real",
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The training rows of a regime and a description of what they hold.

    `real_train`: the real manifest's train-split rows (training sites only). `synthetic`: one generator's synthetic
    manifest rows, or None for regimes that use none. Returns `(rows, composition)`; rows keep the manifest columns
    plus `origin` and `stage` (`train`, or `pretrain`/`finetune` for the two-stage regime). `balance="synthetic"`
    draws synthetic images in the synthetic manifest's own class proportions instead of the real ones.
    """
    reg = parse_regime(regime)
    if balance not in BALANCES:
        raise BadInput(f"class balance {balance!r}: expected one of {list(BALANCES)}")
    classes = list(classes) if classes is not None else sorted(set(real_train["label"].astype(str)))
    if reg.uses_synthetic and (synthetic is None or len(synthetic) == 0):
        raise BadInput(f"regime {reg.name!r} needs a synthetic manifest with at least one row")
    if len(real_train) == 0:
        raise BadInput(f"regime {reg.name!r}: the real manifest has no rows in the 'train' split")
    rng = np.random.default_rng([int(seed), 7919])
    real = _with_origin(real_train.reset_index(drop=True), "real")
    sampler = _Sampler(_with_origin(synthetic, "synthetic"), rng) if synthetic is not None else None
    real_counts = _class_counts(real, classes)
    extra: dict[str, Any] = {}

    def syn_counts(total: int, target: dict[str, int] | None = None) -> dict[str, int]:
        if target is not None and balance == "real":
            return target
        assert sampler is not None
        weights = real_counts if balance == "real" else _class_counts(sampler.syn, classes)
        return _apportion(weights, total)

    if reg.kind == "real":
        rows = real
    elif reg.kind in ("synthetic", "pretrain"):
        syn = sampler.draw_counts(syn_counts(len(real), real_counts))
        if reg.kind == "synthetic":
            rows = syn
        else:
            rows = pd.concat([syn.assign(stage="pretrain"), real.assign(stage="finetune")], ignore_index=True)
    elif reg.kind == "augment":
        n = _round_half_up(reg.ratio * len(real))
        target = _apportion(real_counts, n)
        rows = pd.concat([real, sampler.draw_counts(syn_counts(n, target))], ignore_index=True)
    elif reg.kind == "replace":
        # Per class, so the class balance is exactly the real one: drop round(F * n_c) real images of class c and
        # draw as many synthetic images of that class.
        drop_n = {c: _round_half_up(reg.ratio * real_counts[c]) for c in classes}
        kept = []
        for c in classes:
            idx = np.flatnonzero(real["label"].astype(str).to_numpy() == c)
            keep_idx = np.sort(rng.choice(idx, size=len(idx) - drop_n[c], replace=False)) if len(idx) else idx
            kept.append(real.iloc[keep_idx])
        real_kept = pd.concat(kept, ignore_index=True)
        total_drop = sum(drop_n.values())
        rows = pd.concat([real_kept, sampler.draw_counts(syn_counts(total_drop, drop_n))], ignore_index=True)
    elif reg.kind in ("scarce", "scarce+synthetic"):
        rows, info = _scarce(real, reg.ratio, rng)
        extra["scarce"] = info
        if reg.kind == "scarce+synthetic":
            kept_counts = _class_counts(rows, classes)
            fill = {c: max(real_counts[c] - kept_counts[c], 0) for c in classes}
            rows = pd.concat(
                [rows, sampler.draw_counts(syn_counts(sum(fill.values()), fill))], ignore_index=True
            )
    else:  # pragma: no cover - parse_regime guards the kinds
        raise AssertionError(reg.kind)

    rows = rows.reset_index(drop=True)
    if "stage" not in rows.columns:
        rows["stage"] = "train"
    comp = describe(rows, classes)
    comp.update(
        regime=reg.name,
        seed=int(seed),
        balance=balance,
        real_available=int(len(real)),
        real_class_counts=real_counts,
        synthetic_available=int(len(synthetic)) if synthetic is not None else 0,
        sampling=sampler.notes() if sampler is not None else {"with_replacement": False},
        **extra,
    )
    if reg.kind == "pretrain":
        comp["stages"] = {st: describe(rows[rows["stage"] == st], classes) for st in ("pretrain", "finetune")}
    return rows, comp


def describe(rows: pd.DataFrame, classes: list[str]) -> dict[str, Any]:
    """Counts per class x origin x site (the `composition.json` of a run)."""
    by_class = {c: {"real": 0, "synthetic": 0} for c in classes}
    counts = []
    if len(rows):
        grp = rows.groupby(["label", "origin", "site"], sort=True, dropna=False).size()
        for (label, origin, site), n in grp.items():
            counts.append({"label": str(label), "origin": str(origin), "site": str(site), "n": int(n)})
            by_class.setdefault(str(label), {"real": 0, "synthetic": 0})[str(origin)] += int(n)
    origin = rows["origin"].astype(str) if len(rows) else pd.Series([], dtype=str)
    return {
        "n_total": int(len(rows)),
        "n_real": int((origin == "real").sum()),
        "n_synthetic": int((origin == "synthetic").sum()),
        "n_unique_cases": int(rows["case_id"].nunique()) if len(rows) else 0,
        "by_class": by_class,
        "counts": counts,
    }


# -- training budget ---------------------------------------------------------------------------------------------

BUDGET_UNITS = ("steps", "epochs")


def training_budget(
    n_real_train: int,
    epochs: int,
    batch_size: int,
    *,
    unit: str = "steps",
    pretrain_epochs: int | None = None,
) -> dict[str, Any]:
    """The optimizer-step budget every regime of a protocol trains for.

    `unit="steps"`: the budget is `epochs x ceil(n_real_train / batch_size)` optimizer steps, where `n_real_train`
    is the size of the real training split of the training sites, whatever the regime trains on. A scarce run
    takes as many steps on fewer images, an augmented one as many on more, so a regime's effect is the data's and
    not extra training. Validation (checkpoint selection, early stopping) happens every `steps_per_real_epoch`
    steps in every regime. For `pretrain` the synthetic stage gets `pretrain_epochs` real epochs of the budget
    (None: half) and fine-tuning the rest; the total is the budget.

    `unit="epochs"`: the legacy behaviour, each regime `epochs` passes over its own training set (so augmented
    runs train longer); kept to reproduce old numbers, not for comparisons.
    """
    if unit not in BUDGET_UNITS:
        raise BadInput(f"budget unit {unit!r}: expected one of {list(BUDGET_UNITS)}")
    if n_real_train < 1:
        raise BadInput("training budget: the real training split is empty")
    per_epoch = max(1, math.ceil(n_real_train / max(1, min(batch_size, n_real_train))))
    steps = int(epochs) * per_epoch
    out: dict[str, Any] = {
        "unit": unit,
        "real_epochs": int(epochs),
        "n_real_train": int(n_real_train),
        "batch_size": int(batch_size),
        "steps_per_real_epoch": int(per_epoch),
        "steps": steps if unit == "steps" else None,
        "samples_seen": steps * int(batch_size) if unit == "steps" else None,
        "derived": "epochs x ceil(n_real_train / batch_size) optimizer steps for every regime"
        if unit == "steps"
        else "epochs passes over each regime's own training set",
    }
    if unit == "steps":
        pre = int(pretrain_epochs) if pretrain_epochs is not None else max(1, int(epochs) // 2)
        # Both stages need at least one step; only a one-step budget is exceeded (by one step) for that.
        pre_steps = max(1, min(pre * per_epoch, steps - 1))
        out["pretrain_split"] = {"pretrain": pre_steps, "finetune": max(1, steps - pre_steps)}
    return out
