"""The table a multirun ends with, the ``sweep`` tag, and the MLflow view a sweep opens in.

The table is a pure function over job records (tested on hand-made ones), and
the end of a real tiny multirun (``+sweep=fig7_overhead`` on the mlp: a
``backend=none`` job and a ``replicated`` one) prints it and leaves it beside
the jobs, in an MLflow store of the test's own. The same store, served by
``python -m gemini.tracking_server``, is then opened in headless Chromium.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import browser
import pytest
import yaml
from conftest import (
    assert_nothing_left,
    compose_config,
    run_cli,
    start_tracking_server,
    stop_tracking_server,
)

from gemini.mlflow_view import (
    EXPERIMENT_KIND_TAG,
    KEY_COLUMNS,
    TRAINING_KIND,
    VIEW_ID,
    VIEW_TAG,
    experiment_url,
)
from gemini.multirun_table import (
    NO_SUMMARY,
    TABLE_CSV,
    TABLE_MD,
    JobRecord,
    build_table,
    read_jobs,
    swept_keys,
    to_csv,
    to_markdown,
    to_text,
)
from gemini.tracking import sweep_name


def job(num: int, *overrides: str, **summary: Any) -> JobRecord:
    return JobRecord(num=num, overrides=overrides, summary={"outcome": "completed", **summary})


# -- the table, from job records ---------------------------------------------------


def test_the_swept_keys_are_those_whose_value_differs_between_jobs() -> None:
    jobs = [
        job(0, "+sweep=s", "model=mlp", "backend=none", "train.seed=1"),
        job(1, "+sweep=s", "model=mlp", "backend=disk"),
    ]
    # train.seed is set in one job only: absent is a value of its own.
    assert swept_keys(jobs) == ["backend", "train.seed"]


def test_overhead_is_against_the_none_job_with_the_same_other_keys() -> None:
    jobs = [
        job(0, "model=tiny", "backend=none", backend="none", iter_time_s=1.0),
        job(1, "model=tiny", "backend=replicated", backend="replicated", iter_time_s=1.1),
        job(2, "model=small", "backend=none", backend="none", iter_time_s=2.0),
        job(3, "model=small", "backend=replicated", backend="replicated", iter_time_s=3.0),
    ]
    table = build_table(jobs)
    assert table.keys == ["model", "backend"]
    overhead = [r["overhead_pct"] for r in table.rows]
    assert overhead[0] is None and overhead[2] is None
    assert overhead[1] == pytest.approx(10.0)
    assert overhead[3] == pytest.approx(50.0)


def test_a_key_that_chooses_the_backend_is_not_one_the_reference_must_share() -> None:
    # The ablation: +ablation=none sets backend=none, every other value replicated.
    jobs = [
        job(0, "+ablation=none", backend="none", iter_time_s=2.0),
        job(1, "+ablation=blocking", backend="replicated", iter_time_s=2.2),
        job(2, "+ablation=interleave", backend="replicated", iter_time_s=2.0),
    ]
    rows = build_table(jobs).rows
    assert rows[1]["overhead_pct"] == pytest.approx(10.0)
    assert rows[2]["overhead_pct"] == pytest.approx(0.0)


def test_without_a_none_job_there_is_no_overhead() -> None:
    jobs = [
        job(0, "+strategy=strawman", backend="disk", iter_time_s=1.0, checkpoints=2),
        job(1, "+strategy=gemini", backend="replicated", iter_time_s=1.0, checkpoints=40),
    ]
    table = build_table(jobs)
    assert [r["overhead_pct"] for r in table.rows] == [None, None]
    assert [r["checkpoints"] for r in table.rows] == [2, 40]


def test_failed_jobs_and_jobs_without_a_summary_are_rows_with_their_outcome() -> None:
    jobs = [
        JobRecord(2, ("failure=two_in_group",), None, job_dir="/x/2"),
        job(0, "failure=none", backend="none", iter_time_s=1.0),
        JobRecord(1, ("failure=software_once",), {"outcome": "failed", "backend": "none"}),
    ]
    table = build_table(jobs)
    assert [r["num"] for r in table.rows] == [0, 1, 2]
    assert [r["outcome"] for r in table.rows] == ["completed", "failed", NO_SUMMARY]
    assert [r["num"] for r in table.failed] == [1, 2]
    text = to_text(table)
    assert "failed" in text and NO_SUMMARY in text


def test_the_console_markdown_and_csv_forms_hold_the_same_rows() -> None:
    jobs = [
        job(0, "backend=none", backend="none", iter_time_s=0.5, exact="yes"),
        job(
            1,
            "backend=replicated",
            backend="replicated",
            iter_time_s=0.75,
            mean_recovery_s=2.5,
            mean_wasted_s=3.25,
            mean_lost_steps=1,
            exact="yes",
        ),
    ]
    table = build_table(jobs)
    text = to_text(table).splitlines()
    assert text[0].split()[:3] == ["#", "backend", "iter"]
    assert text[3].split() == [
        "1", "replicated", "0.75", "+50.0", "%", "-", "2.5", "3.25", "1", "yes", "completed",
    ]  # fmt: skip
    md = to_markdown(table).splitlines()
    assert md[0].startswith("| # | backend | iter (s) | overhead vs none |")
    assert md[3] == "| 1 | replicated | 0.75 | +50.0 % | - | 2.5 | 3.25 | 1 | yes | completed |"
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert [r["backend"] for r in rows] == ["none", "replicated"]
    assert float(rows[1]["overhead_pct"]) == pytest.approx(50.0)
    assert rows[0]["overhead_pct"] == ""


def test_job_dirs_are_read_in_job_number_order(tmp_path: Path) -> None:
    for num in (10, 2):
        d = tmp_path / f"{num}_backend=x{num}"
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"backend=x{num}"]))
        (d / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
    (tmp_path / "2_backend=x2" / "summary.json").write_text(json.dumps({"outcome": "completed"}))
    (tmp_path / ".submitit").mkdir()  # not a job dir
    jobs = read_jobs(tmp_path)
    assert [j.num for j in jobs] == [2, 10]
    assert jobs[0].summary == {"outcome": "completed"}
    assert jobs[1].summary is None
    assert jobs[1].overrides == ("backend=x10",)


def test_the_sweep_name_is_the_sweep_groups_choice() -> None:
    assert sweep_name(compose_config(["+sweep=fig14_timeline"]).hydra.runtime.choices) == (
        "fig14_timeline"
    )
    assert sweep_name(compose_config([]).hydra.runtime.choices) is None
    assert sweep_name() is None  # not under Hydra


# -- a real tiny multirun -------------------------------------------------------------


class Sweep(NamedTuple):
    root: Path
    sweep_dir: Path
    uri: str
    rc: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sweep]:
    """``+sweep=fig7_overhead`` cut to the mlp and 3 steps: a none job and a replicated one."""
    root = tmp_path_factory.mktemp("tiny-sweep")
    outputs = root / "outputs"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    args = ["-m", "+sweep=fig7_overhead", "model=mlp", "train.steps=3", "backend=none,replicated"]
    rc, out, err = run_cli([*args, f"tracking.uri={uri}"], root, outputs=outputs, timeout_s=400)
    assert_nothing_left(root)
    (sweep_dir,) = (outputs / "multiruns").iterdir()
    yield Sweep(root, sweep_dir, uri, rc, out, err)


@pytest.mark.timeout(450)
def test_a_multirun_ends_with_one_table_printed_and_left_beside_its_jobs(
    tiny_sweep: Sweep,
) -> None:
    assert tiny_sweep.rc == 0, tiny_sweep.stderr
    lines = tiny_sweep.stdout.splitlines()
    start = lines.index(f"Sweep fig7_overhead: 2 jobs ({tiny_sweep.sweep_dir})")
    header, rule, none_row, replicated_row = lines[start + 1 : start + 5]
    assert header.split()[:2] == ["#", "backend"]
    assert set(rule) <= {"-", " "}
    assert none_row.split()[:2] == ["0", "none"]
    assert replicated_row.split()[:2] == ["1", "replicated"]
    assert none_row.split()[-1] == replicated_row.split()[-1] == "completed"
    summaries = [
        json.loads(p.read_text()) for p in sorted(tiny_sweep.sweep_dir.glob("*/summary.json"))
    ]
    iter_none, iter_repl = (s["iter_time_s"] for s in summaries)
    overhead = (iter_repl / iter_none - 1) * 100
    assert f"{overhead:+.1f} %" in replicated_row

    md = (tiny_sweep.sweep_dir / TABLE_MD).read_text()
    assert md.startswith("Sweep fig7_overhead: 2 jobs")
    assert "| 1 | replicated |" in md and f"{overhead:+.1f} %" in md
    rows = list(csv.DictReader(io.StringIO((tiny_sweep.sweep_dir / TABLE_CSV).read_text())))
    assert [r["backend"] for r in rows] == ["none", "replicated"]
    assert float(rows[1]["overhead_pct"]) == pytest.approx(overhead)
    assert float(rows[0]["iter_time_s"]) == iter_none
    assert f"table: {tiny_sweep.sweep_dir / TABLE_MD}" in tiny_sweep.stdout
    assert f"viewStateShareKey={VIEW_ID}" in tiny_sweep.stdout


@pytest.mark.timeout(450)
def test_the_sweeps_runs_are_tagged_with_its_name_and_its_parent_keeps_the_table(
    tiny_sweep: Sweep,
) -> None:
    import mlflow

    client = mlflow.MlflowClient(tiny_sweep.uri)
    exp = client.get_experiment_by_name("gemini")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "multirun"]
    jobs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(jobs) == 2
    assert {r.data.tags.get("sweep") for r in [parent, *jobs]} == {"fig7_overhead"}
    # The report selects a sweep's runs by its tag.
    tagged = client.search_runs([exp.experiment_id], "tags.sweep = 'fig7_overhead'")
    assert len(tagged) == 3
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {TABLE_MD, TABLE_CSV} <= artifacts
    # A parent ran no job of its own: what each job ran is on the job's run.
    assert "backend" not in parent.data.tags
    assert sorted(r.data.tags["backend"] for r in jobs) == ["none", "replicated"]
    assert exp.tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    view = json.loads(exp.tags[VIEW_TAG])
    state = json.loads(view["state"])
    assert "metrics.`run/iter_time_s`" in state["selectedColumns"]
    assert state["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "sweep"}]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_experiment_link_opens_the_training_runs_grouped_by_sweep_with_key_metrics(
    tiny_sweep: Sweep, tmp_path: Path
) -> None:
    """What a person sees following the printed link: MLflow's model-training view, not
    its GenAI one, the sweep's jobs with their metrics as columns."""
    browser.require()
    store = Path(tiny_sweep.uri.removeprefix("sqlite:///"))
    server = start_tracking_server(store, cwd=tmp_path)
    try:
        exp_id = "1"  # the first experiment of the store
        page = browser.open_page(
            experiment_url(server.uri, exp_id), text="Group: fig7_overhead", timeout_s=120
        )
        # The project's server (make mlflow-server) opens the training view without the
        # link's parameters too, in a browser that never chose a view.
        plain = browser.open_page(
            f"{server.uri}/#/experiments/{exp_id}", text="sweep fig7_overhead", timeout_s=120
        )
    finally:
        stop_tracking_server(server.proc)
    assert f"/#/experiments/{exp_id}/runs" in plain.url
    assert "workflowType=machine_learning" in plain.url
    for genai in ("Observability", "Token Usage", "Tool calls"):
        assert genai not in plain.text
    (tmp_path / "experiment.png").write_bytes(page.png)
    assert page.png.startswith(b"\x89PNG")
    assert f"/#/experiments/{exp_id}/runs" in page.url
    assert "workflowType=machine_learning" in page.url
    text = page.text
    # The runs table in the saved view: its name, the key metrics and tags as columns.
    assert "gemini: key metrics" in text
    # The columns these runs have values for (no recovery, no verdict without failures);
    # the table shows a column only where some run has it.
    for name in ("run/iter_time_s", "run/checkpoints_per_hour", "backend", "sweep"):
        assert name in {n for _, n in KEY_COLUMNS}
        assert name in text, name
    job_names = ["+sweep=fig7_overhead,backend=none", "+sweep=fig7_overhead,backend=replicated"]
    for name in job_names:
        assert name in text
    # What only the GenAI view shows.
    for genai in ("Observability", "Token Usage", "Tool calls"):
        assert genai not in text
    # The only console error allowed: the UI asks for a signed-in user the server has not.
    errors = [e for e in page.console_errors if "/users/current" not in e]
    assert errors == []


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_failed_job_does_not_stop_the_sweep_and_is_a_row_of_its_table(
    tmp_path: Path,
) -> None:
    """The failing job comes first; the next one still runs, the table shows both, the
    parent run ends FAILED and the command exits 1."""
    outputs = tmp_path / "outputs"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "-m",
        "model=mlp",
        "cluster.nodes=2",
        "train.steps=4",
        "backend=none",
        # A software failure with no restart allowed: the root gives the job up.
        "failure=software_once,none",
        "failure.at_step=2",
        "cluster.max_restarts=0",
        f"tracking.uri={uri}",
    ]
    rc, out, err = run_cli(args, tmp_path, outputs=outputs, timeout_s=500)
    assert_nothing_left(tmp_path)
    assert rc == 1, err
    assert "cluster.max_restarts=0" in err
    (sweep_dir,) = (outputs / "multiruns").iterdir()
    rows = list(csv.DictReader(io.StringIO((sweep_dir / TABLE_CSV).read_text())))
    assert [r["failure"] for r in rows] == ["software_once", "none"]
    assert rows[0]["outcome"] != "completed"
    assert rows[1]["outcome"] == "completed"
    assert f"2 jobs, 1 did not complete ({sweep_dir})" in out

    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("gemini")
    (parent,) = client.search_runs([exp.experiment_id], "tags.kind = 'multirun'")
    assert parent.info.status == "FAILED"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_jobs_run_as_submitit_tasks_carry_the_sweep_tag_and_the_table_is_left(
    tmp_path: Path,
) -> None:
    """A task of the submitit launcher has Hydra's config of its own job: the tag comes
    from there, as in a local multirun."""
    import mlflow

    outputs = tmp_path / "outputs"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "+sweep=fig7_overhead",
        "model=mlp",
        "train.steps=3",
        "backend=none,replicated",
        "progress=false",
        f"tracking.uri={uri}",
    ]
    rc, _, err = run_cli(args, tmp_path, outputs=outputs, timeout_s=500)
    assert_nothing_left(tmp_path)
    assert rc == 0, err
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("gemini")
    runs = client.search_runs([exp.experiment_id])
    jobs = [r for r in runs if r.data.tags.get("kind") != "multirun"]
    assert len(jobs) == 2
    assert all(r.data.tags.get("submitit_local_job_id") for r in jobs)
    assert {r.data.tags.get("sweep") for r in jobs} == {"fig7_overhead"}
    (sweep_dir,) = (outputs / "multiruns").iterdir()
    rows = list(csv.DictReader(io.StringIO((sweep_dir / TABLE_CSV).read_text())))
    assert [r["backend"] for r in rows] == ["none", "replicated"]
