"""gemini-report: refuses a missing or empty store in one line (exit 2, nothing created);
on a store made by real jobs, draws what they measured beside the paper's values, writes
report.md and a self-contained report.html that headless Chromium shows with its figures
and no console error, and logs itself as a ``kind=report`` run."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import browser
import pytest
from report_store import JobStore, log_simulation, sim_tables

from gemini.analysis import load_runs
from gemini.analysis.report import Report, write_report

REPORT = [sys.executable, "-m", "gemini.analysis.cli"]
"""The console script's code (``gemini-report`` runs ``gemini.analysis.cli:main``)."""


def gemini_report(args: list[str], cwd: Path, outputs: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GEMINI_OUTPUTS": str(outputs)}
    return subprocess.run(
        [*REPORT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240
    )


def assert_one_line_error(p: subprocess.CompletedProcess[str], *parts: str) -> None:
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("gemini-report: error: "), lines[0]
    for part in parts:
        assert part in lines[0], lines[0]


def test_a_missing_store_is_one_line_and_exit_2_with_nothing_created(tmp_path: Path) -> None:
    db = tmp_path / "none" / "mlflow.db"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    p = gemini_report(
        [f"tracking.uri=sqlite:///{db}", f"out={tmp_path / 'out'}"], cwd, tmp_path / "outputs"
    )
    assert_one_line_error(p, f"tracking.uri=sqlite:///{db}", "run a sweep first")
    assert not db.parent.exists()
    assert not (tmp_path / "out").exists()
    assert list(cwd.iterdir()) == []
    # The default store, <paths.outputs>/mlflow.db, missing too: nothing created there either.
    p = gemini_report([], cwd, tmp_path / "outputs")
    assert_one_line_error(p, f"tracking.uri=sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    assert not (tmp_path / "outputs").exists()
    assert list(cwd.iterdir()) == []


def test_a_store_without_job_runs_is_one_line_and_exit_2(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_simulation(uri, sim_tables(), tmp_path)  # a simulation is no job
    p = gemini_report([f"tracking.uri={uri}", f"out={tmp_path / 'out'}"], tmp_path, tmp_path)
    assert_one_line_error(p, "no job runs in experiment 'gemini'", "gemini -m +sweep=")
    assert not (tmp_path / "out").exists()


def test_an_unknown_key_is_one_line_and_exit_2(tmp_path: Path) -> None:
    p = gemini_report(["trackin.uri=sqlite:///x.db"], tmp_path, tmp_path / "outputs")
    assert_one_line_error(p, "trackin", "no such setting")


# -- on a store made by real jobs ---------------------------------------------------


@dataclass
class Store:
    root: Path
    """GEMINI_OUTPUTS of the jobs: the store is root/mlflow.db (the default)."""
    uri: str
    report: Report
    """write_report's result on it."""


@pytest.fixture(scope="module")
def store(job_store: JobStore) -> Store:
    """The shared store of real jobs (report_store.py), and the report on it."""
    # The job that recovered drew its timeline in the report's style.
    assert (job_store.root / "job2" / "recovery_timeline.png").is_file()
    report = write_report(job_store.uri, job_store.root / "report")
    return Store(job_store.root, job_store.uri, report)


def run_metric(uri: str, backend: str, failure: str, key: str) -> float:
    from mlflow import MlflowClient

    (run,) = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("gemini").experiment_id],
        f"params.`backend.name` = '{backend}' and params.`failure.name` = '{failure}'",
    )
    return float(run.data.metrics[key])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_report_draws_what_the_jobs_measured_beside_the_papers_values(store: Store) -> None:
    report = store.report
    drawn = {s.spec.key for s in report.sections}
    assert {"fig7", "fig9", "fig11", "fig15"} <= drawn
    assert {"fig10", "fig14", "backends_under_failure"} <= drawn, "the software failure's runs"
    skipped = {spec.key: why for spec, why in report.skipped}
    assert "fig8" in skipped and "idle_s" in skipped["fig8"]
    # One replication schedule is no ablation: Fig. 16 is not drawn from it.
    assert "fig16" in skipped
    assert drawn | set(skipped) == {
        "fig7", "fig8", "fig9", "fig10", "fig11", "fig12", "fig14", "fig15", "fig16",
        "backends_under_failure",
    }  # fmt: skip
    for png in report.pngs:
        assert png.read_bytes()[:4] == b"\x89PNG"

    # Ours is what the store holds: replicated / none iteration time of the real runs.
    fig7 = next(s for s in report.sections if s.spec.key == "fig7").paper.set_index("quantity")
    ratio = run_metric(store.uri, "replicated", "none", "run/iter_time_s") / run_metric(
        store.uri, "none", "none", "run/iter_time_s"
    )
    assert fig7.loc["iteration time with Gemini / without", "ours"] == pytest.approx(ratio)
    runs = load_runs(store.uri)
    host, cores = runs["tags.host"].iloc[0], runs["tags.cpu_cores"].iloc[0]
    assert fig7["machine"].iloc[0].startswith(f"{host} ({cores} cores, ")
    assert set(fig7["kind"]) == {"measured"}

    md = report.markdown.read_text() if report.markdown else ""
    assert "## Figures not drawn" in md and "`gemini -m +sweep=idle_spans`" in md
    assert "Paper vs this harness" in md and "](fig7_iteration_time.png)" in md

    # The report is a run of its own, with its files, and no job table counts it.
    from mlflow import MlflowClient

    client = MlflowClient(store.uri)
    run = client.get_run(report.run_id)
    assert run.data.tags["kind"] == "report"
    artifacts = {a.path for a in client.list_artifacts(report.run_id)}
    assert {"report.md", "report.html", "fig7_iteration_time.png"} <= artifacts
    assert len(runs) == 3


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_html_report_is_self_contained(store: Store) -> None:
    assert store.report.html is not None
    html = store.report.html.read_text()
    images = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert len(images) == len(store.report.sections)
    assert all(src.startswith("data:image/png;base64,") for src in images)
    for url in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert url.startswith(("data:", "#")), f"the report would fetch {url}"
    assert "<script" not in html and "@import" not in html and "url(" not in html


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gemini_report_runs_from_any_directory_on_the_default_store(
    store: Store, tmp_path: Path
) -> None:
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    p = gemini_report([], cwd, store.root)
    assert p.returncode == 0, p.stderr
    assert list(cwd.iterdir()) == [], "Hydra leaves nothing in the working directory"
    (out,) = (store.root / "reports").iterdir()
    assert {"report.md", "report.html", "fig7_iteration_time.png"} <= {
        f.name for f in out.iterdir()
    }
    assert "not drawn: Fig. 8" in p.stdout and "gemini -m +sweep=idle_spans" in p.stdout


# -- in a browser -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_html_report_shows_its_figures_in_headless_chromium(
    store: Store, tmp_path: Path
) -> None:
    from PIL import Image, ImageStat

    with browser.browser(1280, 2000) as driver:
        assert store.report.html is not None
        driver.get(store.report.html.resolve().as_uri())
        loaded = driver.execute_script(
            "return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0)"
        )
        png = driver.get_screenshot_as_png()
        errors = browser.console_errors(driver)
    (tmp_path / "screenshot.png").write_bytes(png)
    assert errors == []
    assert loaded == [True] * len(store.report.sections)
    shot = Image.open(io.BytesIO(png)).convert("L")
    assert shot.size[0] >= 1000
    # A blank page is one colour: the figures make the pixels vary.
    assert ImageStat.Stat(shot).stddev[0] > 20
    dark = sum(shot.histogram()[:200]) / (shot.size[0] * shot.size[1])
    assert dark > 0.02, "almost nothing drawn on the page"
