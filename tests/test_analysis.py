"""analysis.figures: Fig. 9's analytic numbers, and runs read back from a real MLflow store
made by a real job, drawn into PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from analysis.figures import (
    fig_iteration,
    fig_recovery_phases,
    fig_recovery_probability,
    load_runs,
    load_step_metrics,
    recovery_probability_data,
    write_figures,
)


def test_fig9_group_placement_matches_the_paper_at_16_nodes() -> None:
    data = recovery_probability_data([16], m=2, ks=(2, 3)).set_index(["placement", "k"])
    assert data.loc[("group", 2), "probability"] == pytest.approx(0.9333, abs=1e-4)
    assert data.loc[("group", 3), "probability"] == pytest.approx(0.8000, abs=1e-4)
    assert data["exact"].all()
    # Ring's failure sets overlap: it loses a checkpoint more often.
    for k in (2, 3):
        assert data.loc[("ring", k), "probability"] < data.loc[("group", k), "probability"]


def test_recovery_probability_figure_says_analytic(tmp_path: Path) -> None:
    fig = fig_recovery_probability(recovery_probability_data([4, 8, 16]))
    assert "analytic" in fig.axes[0].get_title()
    fig.savefig(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_recovery_phases_figure_draws_one_bar_per_recovered_run(tmp_path: Path) -> None:
    df = pd.DataFrame(
        {
            "run_name": ["a", "b", "c"],
            "params.backend.name": ["replicated", "disk", "none"],
            "tags.host": ["h1", "h1", "h1"],
            "mean_recovery_s": [3.0, 9.0, None],
            "mean_detect_s": [1.0, 1.0, None],
            "mean_retrieve_s": [0.5, 6.0, None],
        }
    )
    fig = fig_recovery_phases(df)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["replicated · a", "disk · b"]
    assert "measured on h1" in ax.get_title()
    fig.savefig(tmp_path / "r.png")


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """An MLflow store holding one real job: gpt_tiny, 2 nodes, 3 steps, no checkpoints."""
    from conftest import assert_nothing_left, compose_config

    from gemini.experiment import run

    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = compose_config(
        [
            f"paths.outputs={root / 'outputs'}",
            f"tracking.uri={uri}",
            "tracking.experiment=analysis-test",
            "progress=false",
            "model=gpt_tiny",
            "cluster.nodes=2",
            "cluster.threads_per_rank=1",
            "train.steps=3",
            "backend=none",
            "failure=none",
        ]
    )
    summary = run(cfg, job_dir=root / "job")
    assert_nothing_left(root / "job")
    return uri, summary


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_load_runs_reads_back_the_job_as_one_row(
    tiny_store: tuple[str, dict[str, Any]],
) -> None:
    uri, summary = tiny_store
    df = load_runs(uri, "analysis-test")
    assert len(df) == 1
    row = df.iloc[0]
    assert row["iter_time_s"] == pytest.approx(summary["iter_time_s"])
    assert row["params.backend.name"] == "none"
    assert row["params.cluster.nodes"] == "2"
    assert row["tags.host"]
    steps = load_step_metrics(uri, row["run_id"], "iter_time_s")
    assert list(steps["step"]) == [1, 2, 3]
    assert load_runs(uri, "no-such-experiment").empty


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_figures_render_to_png(
    tiny_store: tuple[str, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri, _ = tiny_store
    fig = fig_iteration(load_runs(uri, "analysis-test"))
    assert fig.axes[0].get_title().count("measured on") == 1
    written = write_figures(uri, tmp_path / "figs", "analysis-test")
    names = sorted(p.name for p in written)
    # The job had no failure: no recovery figure, and the CLI says why.
    assert names == ["iteration_time.png", "recovery_probability.png"]
    assert "skipping recovery_phases.png" in capsys.readouterr().out
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
