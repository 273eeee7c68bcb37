"""gemini.analysis: the figures in one style (legends clear of titles, a caption saying
measured/analytic/simulated, machine and date), each figure's runs chosen by sweep tag
or by params, our numbers beside the paper's, and simulated tables read back from a
real MLflow store made with the real MlflowClient."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from report_store import log_simulation, sim_tables

from gemini.analysis import (
    FIGURES,
    StoreError,
    checkpoint_frequency_data,
    checkpoint_reduction_data,
    effective_time_data,
    fig_checkpoint_frequency,
    fig_checkpoint_reduction,
    fig_effective_time,
    fig_idle_spans,
    fig_interleave_ablation,
    fig_iteration_time,
    fig_recovery_probability,
    fig_recovery_timeline,
    fig_wasted_time,
    idle_spans_data,
    interleave_ablation_data,
    iteration_time_data,
    load_runs,
    load_simulation,
    paper_table,
    recovery_probability_data,
    recovery_probability_sim_data,
    recovery_timeline_data,
    select,
    wasted_time_data,
)
from gemini.analysis.style import overlaps
from gemini.config import GeminiConfig
from gemini.timeline import timeline_figure

HOST = {"tags.host": "box", "tags.cpu_cores": "2", "tags.ram_gib": "23.5", "tags.gpu": "none"}
MACHINE = "box (2 cores, 23.5 GiB RAM, no GPU)"


def runs_frame(rows: list[dict[str, Any]], sweep: str | None = None) -> pd.DataFrame:
    """Rows shaped as load_runs returns them: metrics by name, params.* and tags.*."""
    out = []
    for i, row in enumerate(rows):
        full = {
            "run_id": f"r{i}",
            "run_name": f"job{i}",
            "status": "FINISHED",
            "start_time": pd.Timestamp("2026-12-05 10:00") + pd.Timedelta(minutes=i),
            "parent_run_id": "p1" if sweep else None,
            **HOST,
            **({"tags.sweep": sweep} if sweep else {}),
        }
        full.update(row)
        out.append(full)
    return pd.DataFrame(out)


def p(**params: Any) -> dict[str, Any]:
    return {f"params.{k.replace('__', '.')}": str(v) for k, v in params.items()}


def measured_runs() -> pd.DataFrame:
    rows: list[dict[str, Any]] = []
    for model, it in (("gpt_tiny", 0.05), ("gpt_small", 0.4)):
        for backend, slow, schedule in (
            ("none", 1.0, "naive"), ("replicated", 1.02, "naive"),
            ("replicated", 1.01, "interleave"),
        ):  # fmt: skip
            rows.append(
                {**p(model__name=model, backend__name=backend, failure__name="none",
                     backend__replication__schedule=schedule, cluster__link_gbps=2),
                 "iter_time_s": it * slow, "ckpt_stall_s": 0.001,
                 "idle_s": it / 2, "comm_s": it / 4, "ckpt_replicate_s": it / 8,
                 "checkpoints_per_hour": 3600 / it if backend != "none" else None}
            )  # fmt: skip
    for backend, cadence, wasted in (
        ("disk", "young_daly", 600.0),
        ("disk", "highfreq", 60.0),
        ("replicated", "every_n", 3.0),
    ):
        for failure in ("software_once", "hardware_once", "two_in_group"):
            rows.append(
                {**p(backend__name=backend, backend__cadence=cadence, failure__name=failure,
                     backend__bandwidth_gbps=2.0, model__name="gpt_tiny"),
                 "mean_wasted_s": wasted, "iter_time_s": 1.5, "mean_recovery_s": 5.0,
                 "mean_detect_s": 1.0, "mean_retrieve_s": 2.0, "mean_load_s": 0.5,
                 "checkpoints_per_hour": 36000 / wasted}
            )  # fmt: skip
    return runs_frame(rows)


MEASURED = [
    (iteration_time_data, fig_iteration_time),
    (idle_spans_data, fig_idle_spans),
    (wasted_time_data, fig_wasted_time),
    (checkpoint_frequency_data, fig_checkpoint_frequency),
    (recovery_timeline_data, fig_recovery_timeline),
    (interleave_ablation_data, fig_interleave_ablation),
]


def caption_of(fig: Any) -> str:
    return str(fig._supxlabel.get_text())


@pytest.mark.parametrize(("data_of", "draw"), MEASURED, ids=[d.__name__ for d, _ in MEASURED])
def test_every_measured_figure_has_a_title_a_clear_legend_and_a_measured_caption(
    data_of: Any, draw: Any, tmp_path: Path
) -> None:
    fig = draw(data_of(measured_runs()))
    assert fig._suptitle.get_text().startswith(("Fig.", "Every"))
    assert caption_of(fig).startswith(f"Measured on {MACHINE}, 2026-12-05.")
    assert overlaps(fig) == []
    fig.savefig(tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("n", [1, 4])
def test_the_recovery_timeline_legend_covers_neither_its_title_nor_its_bars(n: int) -> None:
    rec = {"kind": "hardware", "detect_s": 1.0, "restart_s": 2.0, "retrieve_s": 0.5}
    fig = timeline_figure([rec] * n, GeminiConfig())
    assert overlaps(fig) == []
    assert caption_of(fig).startswith("Measured on ")


def test_fig9_group_placement_matches_the_paper_at_16_nodes() -> None:
    data = recovery_probability_data([16], m=2, ks=(2, 3)).set_index(["placement", "k"])
    assert data.loc[("group", 2), "probability"] == pytest.approx(0.9333, abs=1e-4)
    assert data.loc[("group", 3), "probability"] == pytest.approx(0.8000, abs=1e-4)
    assert data["exact"].all()
    # Ring's failure sets overlap: it loses a checkpoint more often.
    for k in (2, 3):
        assert data.loc[("ring", k), "probability"] < data.loc[("group", k), "probability"]


def test_fig9_is_labelled_analytic_and_its_table_matches_the_paper() -> None:
    data = recovery_probability_data([8, 16, 32])
    fig = fig_recovery_probability(data)
    assert caption_of(fig).startswith("Analytic (computed, not measured)")
    assert overlaps(fig) == []
    table = paper_table("fig9", data).set_index("quantity")
    assert list(table["kind"]) == ["analytic", "analytic"]
    assert table["ratio"].tolist() == pytest.approx([1.0, 1.0], abs=1e-3)


def test_a_sweep_tag_picks_the_newest_sweep_and_params_pick_untagged_runs() -> None:
    old = runs_frame([{**p(failure__name="none"), "iter_time_s": 1.0}] * 2, sweep="fig7_overhead")
    new = runs_frame([{**p(failure__name="none"), "iter_time_s": 2.0}] * 3, sweep="fig7_overhead")
    new["parent_run_id"] = "p2"
    new["start_time"] += pd.Timedelta(hours=1)
    new["run_id"] = ["n0", "n1", "n2"]
    mine = runs_frame([{**p(failure__name="none"), "iter_time_s": 3.0}])
    mine["run_id"] = "m0"

    def fallback(df: pd.DataFrame) -> pd.Series:
        return df["params.failure.name"] == "none"

    chosen, how = select(pd.concat([old, new, mine], ignore_index=True), "fig7_overhead", fallback)
    assert sorted(chosen["run_id"]) == ["n0", "n1", "n2"]
    assert how == "sweep fig7_overhead, 3 runs"
    chosen, how = select(mine, "fig7_overhead", fallback)
    assert list(chosen["run_id"]) == ["m0"]
    assert "selected by their params" in how


def test_the_paper_table_puts_measured_values_beside_the_papers() -> None:
    rows = [
        {**p(backend__name="none", failure__name="none"), "iter_time_s": 2.0},
        {**p(backend__name="replicated", failure__name="none",
             backend__replication__schedule="blocking"), "iter_time_s": 2.2},
        {**p(backend__name="replicated", failure__name="none",
             backend__replication__schedule="naive"), "iter_time_s": 2.1},
    ]  # fmt: skip
    table = paper_table("fig16", interleave_ablation_data(runs_frame(rows)))
    table = table.set_index("quantity")
    blocking = table.loc["iteration-time overhead, blocking"]
    assert blocking["ours"] == pytest.approx(10.0)
    assert blocking["ratio"] == pytest.approx(10.0 / 10.1)
    assert blocking["machine"] == MACHINE
    assert blocking["date"] == "2026-12-05"
    assert blocking["kind"] == "measured"
    naive = table.loc["iteration-time overhead, naive interleave"]
    assert naive["ours"] == pytest.approx(5.0)
    assert math.isnan(naive["ratio"])  # the paper has no number: it ran out of memory
    # Nothing measured, nothing claimed.
    assert math.isnan(table.loc["iteration-time overhead, Gemini's interleaving", "ours"])
    assert paper_table("fig16")["ours"].isna().all()
    assert set(FIGURES) >= {"fig7", "fig8", "fig9", "fig10", "fig11", "fig12", "fig14", "fig15"}


def test_wasted_time_names_the_papers_systems_and_compares_at_the_emulated_storage() -> None:
    data = wasted_time_data(measured_runs())
    assert set(data["system"]) == {"Strawman (disk)", "HighFreq (disk)", "Gemini (replicated)"}
    assert sorted(set(data["replaced"])) == [0, 1, 2]
    table = paper_table("fig10", data).set_index("quantity")
    assert table.loc["HighFreq / Gemini wasted time", "ours"] == pytest.approx(20.0)
    assert table.loc["Gemini wasted time per failure", "ours"] == pytest.approx(2.0)  # 3 s / 1.5 s
    assert table.loc["Strawman wasted time per failure", "ours"] == pytest.approx(10.0)  # min
    assert table["at"].iloc[0].startswith("emulated 2 Gbit/s storage")


def test_a_correlated_failure_replaces_its_k_machines_on_fig10s_axis() -> None:
    runs = runs_frame(
        [
            {**p(backend__name="replicated", failure__name=name, failure__k=k),
             "mean_wasted_s": 1.0, "iter_time_s": 0.1}
            for name, k in (("hardware_once", 2), ("correlated", 2), ("correlated", 3),
                            ("poisson", 2))
        ]
    )  # fmt: skip
    data = wasted_time_data(runs)
    assert list(zip(data["params.failure.name"], data["replaced"], strict=True)) == [
        ("hardware_once", 1), ("correlated", 2), ("correlated", 3),
    ]  # fmt: skip


# -- simulated tables, from a real store ------------------------------------------


def test_simulated_figures_come_from_the_newest_simulation_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tables = sim_tables()
    log_simulation(uri, {"fig11": tables["fig11"].assign(reduction=1.0)}, tmp_path)
    newest = log_simulation(uri, tables, tmp_path)
    assert load_runs(uri).empty, "a simulation run is not a job"
    sim = load_simulation(uri)
    assert sim is not None and sim.run_id == newest
    assert set(sim.tables) == {"fig9", "fig11", "fig15"}

    for data, draw, key in (
        (recovery_probability_sim_data(sim), fig_recovery_probability, "fig9"),
        (checkpoint_reduction_data(sim), fig_checkpoint_reduction, "fig11"),
        (effective_time_data(sim), fig_effective_time, "fig15"),
    ):
        fig = draw(data)
        assert caption_of(fig).startswith("Simulated (not measured) on simbox (2 cores)")
        assert overlaps(fig) == []
        table = paper_table(key, data)
        assert (table["kind"] == "simulated").all()
        assert table["ours"].notna().all(), key
    fig11 = paper_table("fig11", checkpoint_reduction_data(sim)).set_index("quantity")
    assert fig11.loc["checkpoint-time reduction at 100 Gbit/s", "ours"] == pytest.approx(160.0)
    fig15 = paper_table("fig15", effective_time_data(sim))
    assert fig15["ours"].iloc[0] == pytest.approx(0.93 - 1000 / 50000 - 0.02)
    # Exact rows win over Monte Carlo for the table.
    fig9 = paper_table("fig9", recovery_probability_sim_data(sim))
    assert fig9["ours"].tolist() == pytest.approx([0.9333, 0.8], abs=1e-4)


def _drawn(ax: Any) -> set[tuple[float, float]]:
    """(x, y) of every point the lines of one panel draw."""
    return {
        (float(x), round(float(y), 12))
        for line in ax.get_lines()
        for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True)
    }


def test_fig15_sets_the_papers_091_beside_gemini_at_a_rate_per_machine(tmp_path: Path) -> None:
    from gemini.simulate import SimulateConfig, simulate

    cfg = SimulateConfig(nodes=[16, 128, 1000], figures=["fig15"])
    cfg.failures.trials = 20
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_simulation(uri, {"fig15": pd.DataFrame(simulate(cfg).fig15)}, tmp_path)
    data = effective_time_data(load_simulation(uri))
    node = data[data["rate_unit"] == "node"]
    cluster = data[data["rate_unit"] == "cluster"]

    fig = fig_effective_time(data)
    assert overlaps(fig) == []
    by_n, by_rate = fig.axes[:2]
    assert by_n.get_title() == "0.0134 failures per machine per day"
    assert _drawn(by_n) == {
        (float(n), round(r, 12)) for n, r in zip(node["N"], node["effective_ratio"], strict=True)
    }
    at16 = cluster[cluster["N"] == 16]
    assert _drawn(by_rate) == {
        (f, round(r, 12))
        for f, r in zip(at16["failures_per_day"], at16["effective_ratio"], strict=True)
    }

    row = paper_table("fig15", data).iloc[0]
    gemini = node[(node["system"] == "gemini") & (node["N"] == 1000)]
    assert row["ours"] == pytest.approx(gemini["effective_ratio"].iloc[0])
    assert row["at"] == "N=1000, 0.0134 failures per machine per day"


def test_a_fig15_csv_from_before_the_rate_unit_column_draws_as_before(tmp_path: Path) -> None:
    from gemini.simulate import SimulateConfig, simulate

    cfg = SimulateConfig(nodes=[16, 1000], figures=["fig15"])
    cfg.failures.trials = 20
    cfg.failures.per_node_per_day = 0.0
    old = pd.DataFrame(simulate(cfg).fig15).drop(columns="rate_unit")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_simulation(uri, {"fig15": old}, tmp_path)
    data = effective_time_data(load_simulation(uri))
    assert "rate_unit" not in data

    fig = fig_effective_time(data)
    assert overlaps(fig) == []
    assert fig.axes[0].get_title() == "failures per day = 1"
    row = paper_table("fig15", data).iloc[0]
    gemini = old[(old["system"] == "gemini") & (old["N"] == 1000) & (old["failures_per_day"] == 1)]
    assert row["ours"] == pytest.approx(gemini["effective_ratio"].iloc[0])
    assert row["at"] == "N=1000, failures/day 1"


def test_a_missing_store_is_refused_and_not_created(tmp_path: Path) -> None:
    db = tmp_path / "nowhere" / "mlflow.db"
    with pytest.raises(StoreError, match="does not exist"):
        load_runs(f"sqlite:///{db}")
    assert not db.parent.exists()
