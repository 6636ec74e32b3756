"""The power planner: its arithmetic, its command, and its predictions against simulated power."""

from __future__ import annotations

import numpy as np
import pytest
from test_leaderboard_support import make_run

from bench.cli import main
from bench.metrics.compare import compare_to_baseline, comparison_inputs
from bench.metrics.power import Components, components, mde, plan, power, site_spread
from bench.metrics.simulate import clustered_auroc, signal_for_auroc, simulate_clustered, simulation_task

TASK = simulation_task()


def test_power_arithmetic():
    # No seed variance, large df: the normal power formula; power rises with patients and seeds; MDE inverts it.
    comp = Components(common=1e-4, within=(0.0, 0.0), tau2=(0.0, 0.0), seeds=3, patients=100, paired=False)
    assert power(comp, 0.0) == pytest.approx(0.05, abs=1e-9)
    assert power(comp, 2.8016 * 0.01) == pytest.approx(0.80, abs=0.002)  # (1.96 + 0.8416) sd
    assert mde(comp) == pytest.approx(2.8016 * 0.01, rel=1e-3)
    assert comp.variance(3, 400) == pytest.approx(2.5e-5)
    seeds = Components(common=1e-4, within=(1e-4,), tau2=(4e-4,), seeds=3, patients=100, paired=True)
    assert power(seeds, 0.03, 6) > power(seeds, 0.03, 3) and power(seeds, 0.03, 3, 400) > power(seeds, 0.03)
    # seed-to-seed variance does not shrink with patients: the patients needed at 3 seeds may not exist
    p = plan(seeds, 0.03)
    assert p.patients_needed is None and p.seeds_needed is not None
    assert power(seeds, 0.03, p.seeds_needed) >= 0.8 > power(seeds, 0.03, p.seeds_needed - 1)


def _sim_power(mu_c: float, seeds: int, patients: int, sims: int, start: int) -> float:
    rej = 0
    for sim in range(sims):
        rng = np.random.default_rng(start + sim)
        preds = simulate_clustered(
            rng, {("none", "real"): 1.2, ("twin", "synthetic"): mu_c}, patients, 3, seeds
        )
        r = compare_to_baseline(preds, TASK, n_boot=150, seed=sim, metrics=["auroc"]).iloc[0]
        rej += bool(r["p_boot"] < 0.05)
    return rej / sims


def _planned(mu_c: float, seeds: int, patients: int, pilots: int = 10) -> float:
    # components averaged over a few pilots (3 seeds, 150 patients): one pilot's seed variance rests on 2 df
    effect = clustered_auroc(mu_c) - clustered_auroc(1.2)
    comps = []
    for k in range(pilots):
        rng = np.random.default_rng(70000 + k)
        preds = simulate_clustered(rng, {("none", "real"): 1.2, ("twin", "synthetic"): mu_c}, 150, 3, 3)
        (x,) = comparison_inputs(preds, TASK, n_boot=150, seed=k)
        comps.append(
            components(x["xa"], x["xb"], x["pa"], x["pb"], paired=x["paired"], patients=x["n_patients"])
        )
    mean = Components(
        common=float(np.mean([c.common for c in comps])),
        within=tuple(np.mean([c.within for c in comps], axis=0)),
        tau2=tuple(np.mean([c.tau2 for c in comps], axis=0)),
        seeds=3,
        patients=int(np.mean([c.patients for c in comps])),
        paired=comps[0].paired,
    )
    return power(mean, effect, seeds, patients)


MU_C = signal_for_auroc(clustered_auroc(1.2) + 0.04)


def test_site_spread_by_hand():
    # d = 0.1, -0.1, 0.3 with se 0.1 each: w = 100, pooled 0.1, Q = 100 x (0 + 0.04 + 0.04) = 8 on 2 df,
    # C = 300 - 30000 / 300 = 200, tau2 = (8 - 2) / 200 = 0.03; p = exp(-8 / 2) for 2 df
    s = site_spread(["a", "b", "c"], [0.1, -0.1, 0.3], [0.1, 0.1, 0.1])
    assert (s.q, s.tau2, s.p) == pytest.approx((8.0, 0.03, np.exp(-4.0)))
    assert s.sd == pytest.approx(np.sqrt(0.03))
    # sites that agree within their noise: Q < k - 1, no between-site variance
    assert site_spread(["a", "b"], [0.01, 0.02], [0.05, 0.05]).tau2 == 0.0
    # a site without a standard error does not count; fewer than two left: nothing to say
    assert site_spread(["a", "b"], [0.1, 0.2], [0.1, float("nan")]) is None


def test_planned_power_matches_simulated_power_in_one_design():
    planned = _planned(MU_C, 5, 300, pilots=4)
    simulated = _sim_power(MU_C, 5, 300, 30, 81000)
    # 30 simulations: Monte-Carlo sd up to 9 points
    assert abs(planned - simulated) <= 0.25, (planned, simulated)


@pytest.mark.slow
@pytest.mark.parametrize(("seeds", "patients"), [(3, 150), (5, 300), (8, 150)])
def test_planned_power_within_ten_points_of_simulated_power(seeds, patients):
    planned = _planned(MU_C, seeds, patients)
    simulated = _sim_power(MU_C, seeds, patients, 200, 90000 + 1000 * seeds + patients)
    print(f"design {seeds} seeds x {patients} patients: planned {planned:.3f}, simulated {simulated:.3f}")
    assert abs(planned - simulated) <= 0.10


def test_plan_command_prints_power_and_needs(tmp_path, capsys):
    run = make_run(tmp_path / "run", {"good": 2.0})
    assert main(["plan", str(run), "--detect", "0.02", "--n-boot", "50"]) == 0
    out = capsys.readouterr().out
    assert "good/synthetic" in out and "MDE" in out and "seeds needed" in out and "patients needed" in out
    # one external hospital: nothing to say about a new one, and the command says so
    assert "between sites: 1 hospital(s)" in out and "not measured" in out


def test_plan_bad_input_exits_2_naming_it(tmp_path, capsys):
    run = make_run(tmp_path / "run", {"good": 2.0})
    assert main(["plan", str(run), "--detect", "0"]) == 2
    assert "--detect" in capsys.readouterr().err
    assert main(["plan", str(tmp_path / "nothing"), "--detect", "0.02"]) == 2
    assert "nothing" in capsys.readouterr().err
    solo = make_run(tmp_path / "solo", {"good": 2.0})
    import shutil

    for d in solo.iterdir():
        if d.is_dir() and d.name.startswith("none"):
            shutil.rmtree(d)
    assert main(["plan", str(solo), "--detect", "0.02"]) == 2
    assert "baseline" in capsys.readouterr().err
