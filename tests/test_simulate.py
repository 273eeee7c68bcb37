"""``gemini-simulate``: the cluster-scale model's numbers, its measured costs, its console script.

The probabilities must be ``placement.recovery_probability``'s own; the
effective training time ratio must match its closed-form expectation where
one exists (a constant cost per failure), within a tolerance derived from the
Monte Carlo variance; measured costs are read from real MLflow runs that
``gemini.tracking.record_job`` logs into a real sqlite store; and the console
script runs as a real process, writes its CSVs and records a run, or refuses
bad input in one line with exit status 2.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomllib
from conftest import compose_config

from gemini.checkpoint.placement import recovery_probability
from gemini.config import to_schema
from gemini.simulate import FIG9_COLUMNS, FIG11_COLUMNS, FIG15_COLUMNS, SimulateConfig, simulate
from gemini.simulate.config import CostConfig, FailureProcessConfig
from gemini.simulate.costs import cost_sources, costs_from_mlflow
from gemini.simulate.probability import memory_probability
from gemini.simulate.training import (
    DAY_S,
    SystemModel,
    Tier,
    draw_failures,
    lost_training_s,
    simulate_system,
)

REPO = Path(__file__).resolve().parents[1]


# -- Fig. 9: the placement's own probabilities ----------------------------------


def test_every_fig9_row_is_recovery_probability_of_its_method() -> None:
    cfg = SimulateConfig(nodes=[8, 9, 16], figures=["fig9"])
    cfg.probability.placements = ["group", "mixed", "ring"]
    cfg.probability.monte_carlo_trials = 2000
    rows = simulate(cfg).fig9
    seen = {(r["N"], r["placement"], r["method"]) for r in rows}
    # group where m | N (mixed lays out the same there), mixed where it does not;
    # the closed form only for group; every small case enumerated.
    assert (9, "mixed", "exact") in seen and (9, "group", "exact") not in seen
    assert (8, "group", "closed_form") in seen and (8, "mixed", "exact") not in seen
    assert not any(p != "group" and m == "closed_form" for _, p, m in seen)
    assert {m for _, _, m in seen} == {"exact", "closed_form", "monte_carlo"}
    for r in rows:
        est = recovery_probability(
            r["N"], r["m"], r["k"], r["placement"], r["method"], trials=2000, seed=cfg.seed
        )
        assert (r["probability"], r["exact"]) == (est.value, est.exact), r
    # The paper's numbers (N = 16, m = 2): group 93.3% and 80.0%.
    exact16 = {
        (r["k"], r["placement"]): r["probability"]
        for r in rows
        if r["N"] == 16 and r["method"] == "exact"
    }
    assert exact16[(2, "group")] == pytest.approx(14 / 15)
    assert exact16[(3, "group")] == pytest.approx(0.8)
    assert exact16[(2, "ring")] < exact16[(2, "group")]


def test_enumeration_is_left_out_above_the_cap_and_monte_carlo_stays() -> None:
    cfg = SimulateConfig(nodes=[64], figures=["fig9"])
    cfg.probability.ks = [3]
    cfg.probability.exact_limit = 1000
    cfg.probability.monte_carlo_trials = 500
    methods = {(r["placement"], r["method"]) for r in simulate(cfg).fig9}
    assert methods == {
        ("group", "closed_form"),
        ("group", "monte_carlo"),
        ("ring", "monte_carlo"),
    }


def test_fig15_memory_odds_are_recovery_probability() -> None:
    for n, k, placement in [(16, 2, "ring"), (16, 3, "group"), (15, 2, "group")]:
        got = memory_probability(n, 2, k, placement, exact_limit=10**8, trials=100, seed=0)
        want = recovery_probability(n, 2, k, "mixed" if n % 2 else placement, "exact").value
        assert got == pytest.approx(want, abs=1e-15)
    # A single lost machine never takes every copy of m >= 2.
    assert memory_probability(10_000, 2, 1, "ring", exact_limit=0, trials=1, seed=0) == 1.0


# -- Fig. 11: the bandwidth formula ---------------------------------------------


def test_checkpoint_time_reduction_is_the_bandwidth_ratio() -> None:
    cfg = SimulateConfig(nodes=[16, 1000], figures=["fig11"])
    rows = simulate(cfg).fig11
    assert [(r["N"], r["net_gbps"]) for r in rows] == [
        (16, 100.0),
        (16, 400.0),
        (1000, 100.0),
        (1000, 400.0),
    ]
    for r in rows:
        assert r["t_storage_s"] == pytest.approx(r["N"] * 75e9 * 8 / 20e9)
        assert r["t_gemini_s"] == pytest.approx(75e9 * 8 / (r["net_gbps"] * 1e9))
        assert r["reduction"] == pytest.approx(r["N"] * r["net_gbps"] / 20.0)


# -- Fig. 15: the failure process against closed forms --------------------------


def test_lost_training_averages_half_an_interval_plus_the_checkpoint_time() -> None:
    u = np.random.default_rng(3).random(400_000)
    for interval, lag in [(62.0, 62.0), (558.0, 540.0), (100.0, 250.0), (10800.0, 540.0)]:
        lost = lost_training_s(np.full(u.size, interval), np.full(u.size, lag), u)
        sd = interval / math.sqrt(12 * u.size)
        assert lost.mean() == pytest.approx(interval / 2 + lag, abs=5 * sd)
        assert lost.min() >= lag - 1e-9, "a checkpoint still being written is no restore point"


def _expected_covered_s(rate_per_s: float, before: float, after: float, horizon: float) -> float:
    """E|union of [t - before, t + after] within [0, T]| for Poisson arrivals t on [0, T].

    A point x is covered iff an arrival falls in [x - after, x + before] clipped
    to [0, T]; integrated over x numerically (the integrand is piecewise smooth).
    """
    x = np.linspace(0.0, horizon, 2_000_001)
    span = np.minimum(x + before, horizon) - np.maximum(x - after, 0.0)
    return float(np.trapezoid(1.0 - np.exp(-rate_per_s * span), x))


def _constant_cost_model(lost_s: float) -> SystemModel:
    # An interval far below the lag: every failure loses ``lost_s`` (to 1e-6 s).
    return SystemModel("constant", None, Tier(1e-6, lost_s, 0.0), 0.0)


@pytest.mark.parametrize(
    ("per_day", "lost_s", "down_s", "trials"),
    [
        (1.0, 100.0, 500.0, 4000),  # rare: overlaps negligible, 1 - rate * cost
        (4.0, 1800.0, 5400.0, 400),  # 2 h per failure at 4 a day: overlaps matter
    ],
)
def test_effective_ratio_matches_the_closed_form_for_a_constant_cost(
    per_day: float, lost_s: float, down_s: float, trials: int
) -> None:
    days = 30.0
    f = FailureProcessConfig(trials=trials)
    c = CostConfig(detect_s=down_s, restart_s=0.0, retrieve_memory_s=0.0, retrieve_storage_s=0.0)
    draws = draw_failures(np.random.default_rng(11), per_day, days, f)
    got = simulate_system(_constant_cost_model(lost_s), draws, c, {})["effective_ratio"]

    horizon, rate, cost = days * DAY_S, per_day / DAY_S, lost_s + down_s
    want = 1.0 - _expected_covered_s(rate, lost_s, down_s, horizon) / horizon
    # Each run's waste is about (Poisson count) x cost: sd = cost sqrt(rate T) / T.
    sd = cost * math.sqrt(rate * horizon) / horizon / math.sqrt(trials)
    assert got == pytest.approx(want, abs=4 * sd)
    # To first order that is 1 - rate x cost; overlaps only add the second order.
    second_order = (rate * cost) ** 2 / 2
    assert got == pytest.approx(1.0 - rate * cost, abs=4 * sd + second_order)
    if second_order > 10 * sd:
        assert got > 1.0 - rate * cost, "overlapping windows are wasted once"


def test_the_whole_fig15_path_matches_the_closed_form_for_a_constant_cost() -> None:
    # Gemini with an iteration of a microsecond and a fixed lag: each (single
    # machine, m = 2) failure recovers from memory and wastes lag + downtime.
    cfg = SimulateConfig(nodes=[16, 10_000], failures_per_day=[2.0], figures=["fig15"])
    cfg.failures.trials = 3000
    cfg.failures.per_node_per_day = 0.0  # every row at the one cluster rate
    cfg.failures.systems = ["gemini", "ideal"]
    cfg.costs = CostConfig(
        iter_time_s=1e-6, memory_ckpt_s=120.0, detect_s=300.0, restart_s=200.0,
        retrieve_memory_s=100.0, replace_s=0.0, memory_stall_s=0.0, storage_stall_s=0.0,
    )  # fmt: skip
    rows = simulate(cfg).fig15
    horizon, rate = cfg.days * DAY_S, 2.0 / DAY_S
    want = 1.0 - _expected_covered_s(rate, 120.0, 600.0, horizon) / horizon
    sd = 720.0 * math.sqrt(rate * horizon) / horizon / math.sqrt(3000)
    for r in rows:
        assert set(r) == set(FIG15_COLUMNS)
        if r["system"] == "ideal":
            assert (r["effective_ratio"], r["failures"]) == (1.0, 0.0)
            continue
        assert r["effective_ratio"] == pytest.approx(want, abs=4 * sd)
        assert r["failures"] == pytest.approx(60.0, abs=4 * math.sqrt(60 / 3000))
        assert (r["from_memory"], r["from_storage"]) == (r["failures"], 0.0)


def test_storage_baselines_lose_more_than_gemini_and_node_rates_grow_with_n() -> None:
    cfg = SimulateConfig(nodes=[16, 1000], failures_per_day=[0.0134], figures=["fig15"])
    cfg.failures.rate_unit = "node"
    cfg.failures.multi_node_probability = 0.5
    rows = simulate(cfg).fig15
    # The list already is OPT-175B's rate per machine: no second row of it.
    assert len(rows) == 2 * len(cfg.failures.systems)
    assert {r["rate_unit"] for r in rows} == {"node"}
    at = {(r["system"], r["N"]): r for r in rows}
    for n in (16, 1000):
        assert at[("gemini", n)]["failures_per_day"] == pytest.approx(0.0134 * n)
        assert (
            at[("ideal", n)]["effective_ratio"]
            > at[("gemini", n)]["effective_ratio"]
            > at[("highfreq", n)]["effective_ratio"]
        )
    assert at[("gemini", 1000)]["effective_ratio"] < at[("gemini", 16)]["effective_ratio"]
    # Two machines at once can take both copies of a checkpoint (m = 2): then
    # Gemini falls back to storage; the baselines always read storage.
    assert at[("gemini", 16)]["from_storage"] > 0
    assert at[("highfreq", 1000)]["from_memory"] == 0


def test_the_default_run_also_simulates_every_n_at_a_rate_per_machine() -> None:
    cfg = SimulateConfig(figures=["fig15"])
    cfg.failures.trials = 20
    rows = simulate(cfg).fig15
    per_node = cfg.failures.per_node_per_day
    assert per_node == pytest.approx(0.0134), "OPT-175B's rate, the paper's Fig. 15b"
    node = [r for r in rows if r["rate_unit"] == "node"]
    assert sorted({(r["system"], r["N"]) for r in node}) == sorted(
        (s, n) for s in cfg.failures.systems for n in cfg.nodes
    )
    for r in node:
        assert r["failures_per_day"] == pytest.approx(r["N"] * per_node)
    gemini = {r["N"]: r for r in node if r["system"] == "gemini"}
    assert gemini[1000]["failures"] > gemini[16]["failures"], "the cluster's rate grows with N"
    # The listed cluster rates are simulated exactly as without the per-machine rate.
    cfg.failures.per_node_per_day = 0.0
    assert [r for r in rows if r["rate_unit"] == "cluster"] == simulate(cfg).fig15


def test_weibull_failures_keep_the_configured_mean_rate() -> None:
    f = FailureProcessConfig(process="weibull", weibull_shape=0.7, trials=300)
    draws = draw_failures(np.random.default_rng(5), 8.0, 30.0, f)
    assert draws.t.size / 300 == pytest.approx(240, rel=0.05)
    assert draws.t.max() < 30 * DAY_S


# -- costs measured by gemini runs, read from a real MLflow store --------------


def _log_gemini_run(uri: str, backend: str, summary: dict[str, Any], experiment: str) -> str:
    """A run logged as ``gemini`` logs one (``record_job``): params, ``run/`` metrics."""
    from gemini.tracking import record_job

    cfg = to_schema(
        compose_config(
            [
                f"backend={backend}",
                "failure=none",
                f"tracking.uri={uri}",
                f"tracking.experiment={experiment}",
            ]
        )
    )
    base = {"outcome": "completed", "steps": 40, "checkpoints": 20}
    return record_job(
        cfg, Path(uri[len("sqlite:///") :]).parent / backend, run_name=backend,
        summary={**base, **summary}, step_metrics=[], recoveries=[], parent=None,
    )  # fmt: skip


REPLICATED = {
    "iter_time_s": 0.5, "ckpt_time_s": 0.4, "ckpt_stall_s": 0.01, "mean_detect_s": 2.0,
    "mean_retrieve_s": 0.3, "mean_recovery_s": 9.0, "mean_replay_s": 1.2,
}  # fmt: skip
DISK = {
    "iter_time_s": 0.8, "ckpt_time_s": 3.0, "ckpt_stall_s": 0.3, "mean_detect_s": 4.0,
    "mean_retrieve_s": 2.5, "mean_recovery_s": 15.0, "mean_replay_s": 3.0,
}  # fmt: skip


class Store:
    """A real sqlite MLflow store with runs as ``gemini`` logs them."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        # Experiment "gemini": two replicated runs (the second 3x the first) and a disk run.
        self.replicated = _log_gemini_run(uri, "replicated", REPLICATED, "gemini")
        _log_gemini_run(uri, "replicated", {k: 3 * v for k, v in REPLICATED.items()}, "gemini")
        _log_gemini_run(uri, "disk", DISK, "gemini")
        # Experiment "idle": a run without a checkpoint backend measures no cost.
        _log_gemini_run(uri, "none", {}, "idle")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    # One store for the module: creating one costs seconds of schema migrations.
    return Store(f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}")


def test_costs_from_a_run_are_that_runs_measurements(store: Store) -> None:
    rid = store.replicated
    costs, measured, label = costs_from_mlflow(CostConfig(from_run=rid), store.uri)
    assert label == f"run:{rid}"
    assert costs.iter_time_s == pytest.approx(0.5)
    assert costs.detect_s == pytest.approx(2.0)
    assert costs.retrieve_memory_s == pytest.approx(0.3)
    assert costs.memory_ckpt_s == pytest.approx(0.4)
    # recovery less detection, retrieval and replay; the stall per checkpoint.
    assert costs.restart_s == pytest.approx(9.0 - 2.0 - 0.3 - 1.2)
    assert costs.memory_stall_s == pytest.approx(0.01 * 40 / 20)
    assert costs.retrieve_storage_s == CostConfig().retrieve_storage_s, "no disk run: configured"
    sources = cost_sources(measured, label, ["gemini", "highfreq"])
    assert sources == {"gemini": f"run:{rid}+config", "highfreq": f"run:{rid}+config"}


def test_costs_from_an_experiment_take_each_backend_from_its_runs(store: Store) -> None:
    costs, measured, _ = costs_from_mlflow(CostConfig(from_experiment="gemini"), store.uri)
    assert costs.iter_time_s == pytest.approx(1.0), "the mean of the replicated runs"
    assert costs.detect_s == pytest.approx(4.0), "common costs from replicated runs first"
    assert costs.retrieve_memory_s == pytest.approx(0.6)
    assert costs.retrieve_storage_s == pytest.approx(2.5)
    assert costs.storage_ckpt_s == pytest.approx(3.0)
    assert costs.storage_stall_s == pytest.approx(0.3 * 40 / 20)
    assert {"retrieve_storage_s", "retrieve_memory_s", "restart_s"} <= measured


# -- the console script ---------------------------------------------------------


def simulate_command() -> list[str]:
    """``gemini-simulate`` as installed, else the entry point pyproject declares for it."""
    script = Path(sys.executable).parent / "gemini-simulate"
    if script.exists():
        return [str(script)]
    # An editable install made before the script was declared lacks it until
    # `pip install -e .` runs again: start the same function it would.
    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"][
        "gemini-simulate"
    ]
    module, func = target.split(":")
    code = f"import sys; from {module} import {func}; sys.argv[0] = 'gemini-simulate'; {func}()"
    return [sys.executable, "-c", code]


def run_simulate(args: list[str], outputs: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GEMINI_OUTPUTS": str(outputs), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [*simulate_command(), *args],
        cwd=outputs.parent,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open() as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def test_the_script_writes_the_three_csvs_and_records_a_simulation_run(
    tmp_path: Path, store: Store
) -> None:
    import mlflow

    uri = store.uri
    outputs = tmp_path / "outputs"
    p = run_simulate(
        [
            "nodes=16,32", "failures_per_day=1,4", "probability.monte_carlo_trials=500",
            "failures.trials=20", f"tracking.uri={uri}", "costs.from_experiment=gemini",
        ],
        outputs,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    (run_dir,) = (outputs / "simulate").iterdir()
    for name, columns in (("fig9", FIG9_COLUMNS), ("fig11", FIG11_COLUMNS)):
        header, rows = _read_csv(run_dir / f"{name}.csv")
        assert header == list(columns) and rows
    header, rows = _read_csv(run_dir / "fig15.csv")
    assert header == list(FIG15_COLUMNS)
    assert {(r["N"], r["failures_per_day"]) for r in rows if r["rate_unit"] == "cluster"} == {
        ("16", "1.0"), ("16", "4.0"), ("32", "1.0"), ("32", "4.0"),
    }  # fmt: skip
    # Fig. 15b beside them: OPT-175B's 0.0134 failures per machine per day.
    node = {int(r["N"]): float(r["failures_per_day"]) for r in rows if r["rate_unit"] == "node"}
    assert node == pytest.approx({16: 16 * 0.0134, 32: 32 * 0.0134})
    by_system = {r["system"]: r["cost_source"] for r in rows}
    # The store has replicated and disk runs: every cost of these systems measured.
    assert by_system["gemini"] == by_system["highfreq"] == "experiment:gemini"
    assert by_system["ideal"] == "none"
    assert "Fig. 15" in p.stdout
    assert "0.2144/day (0.0134/machine)" in p.stdout, "a per-machine row names its rate"

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("gemini-simulate")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'simulation'")
    assert run.info.status == "FINISHED"
    assert run.data.params["nodes"] == "[16, 32]"
    assert run.data.params["costs.from_experiment"] == "gemini"
    assert 0 < run.data.metrics["sim/ratio_gemini"] <= 1
    assert 0 < run.data.metrics["sim/ratio_gemini_per_node"] <= 1
    assert run.data.metrics["sim/p_group_min"] == pytest.approx(0.8)  # N = 16, k = 3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"fig9.csv", "fig11.csv", "fig15.csv"} <= artifacts


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["nodes=16,abc"], "nodes=16,abc"),
        (["failures.rate_unit=rack"], "failures.rate_unit='rack'"),
    ],
)
def test_the_script_refuses_bad_input_in_one_line(
    tmp_path: Path, args: list[str], named: str
) -> None:
    outputs = tmp_path / "outputs"
    p = run_simulate(args, outputs)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gemini-simulate: error: {named}"), p.stderr
    assert "Traceback" not in p.stderr
    assert not outputs.exists(), "nothing is created for a refused run"


BAD = [
    (["nodes=1"], "nodes=1"),
    (["factor=0"], "factor=0"),
    (["days=-1"], "days=-1.0"),
    (["failures_per_day=often"], "failures_per_day=often"),
    (["probability.placements=star"], "probability.placements='star'"),
    (["figures=fig10"], "figures='fig10'"),
    (["failures.trials=0"], "failures.trials=0"),
    (["failures.multi_node_probability=1.5"], "failures.multi_node_probability=1.5"),
    (["failures.per_node_per_day=-1"], "failures.per_node_per_day=-1.0: use a number >= 0"),
    (["failures.per_node_per_day=nan"], "failures.per_node_per_day=nan: use a number >= 0"),
    (["failures.per_node_per_day=100"], "failures.trials=200: 6e+08 failures to draw"),
    (["costs.iter_time_s=0"], "costs.iter_time_s=0.0"),
    (["costs.from_run=abc", "costs.from_experiment=x"], "costs.from_experiment='x'"),
    (["colour=blue"], "colour=blue"),
    (["nodes=[16"], "nodes=[16"),
    (["-m", "nodes=16,32"], "-m"),
]


@pytest.mark.parametrize(("args", "named"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_refused_before_anything_is_created(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    named: str,
) -> None:
    from gemini.simulate.cli import main

    outputs = tmp_path / "outputs"
    monkeypatch.setenv("GEMINI_OUTPUTS", str(outputs))
    monkeypatch.setattr(sys, "argv", ["gemini-simulate", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"gemini-simulate: error: {named}"), err
    assert not outputs.exists()


def test_measured_costs_from_a_missing_run_or_store_are_refused(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from gemini.simulate.cli import main

    monkeypatch.setenv("GEMINI_OUTPUTS", str(tmp_path / "outputs"))
    mlflow_uri = store.uri
    cases = [
        (["costs.from_run=0123abcd"], "costs.from_run='0123abcd': no such run"),
        (["costs.from_experiment=idle"], "costs.from_experiment='idle': measured no cost"),
        (["costs.from_experiment=nope"], "costs.from_experiment='nope': no such experiment"),
    ]
    for args, start in cases:
        monkeypatch.setattr(sys, "argv", ["gemini-simulate", f"costs.uri={mlflow_uri}", *args])
        with pytest.raises(SystemExit) as exit_:
            main()
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1, err
        assert err[0].startswith(f"gemini-simulate: error: {start}"), err
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    monkeypatch.setattr(
        sys, "argv", ["gemini-simulate", f"costs.uri={missing}", "costs.from_run=a"]
    )
    with pytest.raises(SystemExit):
        main()
    assert "no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists(), "reading costs creates no store"
    assert not (tmp_path / "outputs").exists()


def test_the_readme_command_composes_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gemini.simulate.cli import as_lists, check_args
    from gemini.simulate.config import register

    register()
    monkeypatch.setenv("GEMINI_OUTPUTS", str(tmp_path / "outputs"))
    given = ["nodes=16,128,1000,10000", "failures_per_day=1,2,4,8"]
    args = as_lists(given)
    assert args == ["nodes=[16,128,1000,10000]", "failures_per_day=[1,2,4,8]"]
    check_args(args, given)  # exits 2 on any refusal
    assert as_lists(["days=3", "failures.systems=gemini"]) == [
        "days=3",
        "failures.systems=[gemini]",
    ]
