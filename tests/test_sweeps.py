"""The ready sweeps of sweeps/ (the ``sweep`` config group): each composes, every job of it
is a valid config, each says how to run it, and the README lists it.

Jobs are composed as Hydra's basic sweeper composes them: the sweep's
``hydra.sweeper.params`` expanded into their cartesian product, each job's
overrides followed by ``+sweep=NAME``. A tiny cut of ``backends_under_failure``
then runs end to end (slow).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO, assert_nothing_left, compose_config, run_cli
from hydra.core.override_parser.overrides_parser import OverridesParser

from gemini.checkpoint.placement import holders_of_all, resolve_placement
from gemini.config import to_schema, validate
from gemini.failures import schedule_for
from gemini.multirun_table import TABLE_CSV

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
NAMES = [p.stem for p in SWEEPS]
FIGURE_SWEEPS = {
    "fig7_overhead": "Fig. 7",
    "idle_spans": "Fig. 8",
    "fig10_wasted": "Fig. 10",
    "fig12_frequency": "Fig. 12",
    "fig14_timeline": "Fig. 14",
    "interleave_ablation": "Fig. 16",
}


def sweep_jobs(name: str) -> list[list[str]]:
    """The override list of every job of ``+sweep=name``, in the sweeper's order."""
    params = yaml.safe_load((REPO / "sweeps" / f"{name}.yaml").read_text())["hydra"]["sweeper"][
        "params"
    ]
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
        if o.is_sweep_override()
        else [f"{o.get_key_element()}={o.get_value_element_as_str()}"]
        for o in parsed
    ]
    return [[*combo, f"+sweep={name}"] for combo in itertools.product(*axes)]


def test_the_figure_sweeps_are_all_there() -> None:
    assert set(FIGURE_SWEEPS) | {"backends_under_failure"} <= set(NAMES)
    assert (REPO / "conf" / "sweep").resolve() == (REPO / "sweeps").resolve()


@pytest.mark.parametrize("name", NAMES)
def test_every_job_of_the_sweep_composes_into_a_valid_config(name: str) -> None:
    jobs = sweep_jobs(name)
    assert len(jobs) >= 2, "a sweep compares jobs"
    seen = set()
    for overrides in jobs:
        cfg = compose_config(overrides)
        assert cfg.hydra.runtime.choices.get("sweep") == name
        typed = to_schema(cfg)
        validate(typed)
        seen.add(json.dumps(dataclasses.asdict(typed), sort_keys=True))
    assert len(seen) == len(jobs), "two jobs of the sweep would run the same config"


@pytest.mark.parametrize("path", SWEEPS, ids=NAMES)
def test_each_sweep_says_how_to_run_it_and_the_readme_lists_it(path: Path) -> None:
    text = path.read_text()
    assert text.startswith("# @package _global_\n")
    assert f"gemini -m +sweep={path.stem}\n" in text
    if path.stem in FIGURE_SWEEPS:
        assert FIGURE_SWEEPS[path.stem] in text
    readme = (REPO / "README.md").read_text()
    assert f"gemini -m +sweep={path.stem} " in readme


def test_the_strategies_are_the_papers_baselines() -> None:
    """Strawman, HighFreq and Gemini as fig10_wasted composes them."""
    by_strategy = {}
    for overrides in sweep_jobs("fig10_wasted"):
        if "failure=hardware_once" in overrides and "backend.bandwidth_gbps=1.25" in overrides:
            typed = to_schema(compose_config(overrides))
            by_strategy[overrides[0].split("=")[1]] = typed
    strawman, highfreq, gemini = (by_strategy[s] for s in ("strawman", "highfreq", "gemini"))
    assert (strawman.backend.name, strawman.backend.cadence) == ("disk", "every_n")
    assert strawman.backend.every_n == strawman.train.steps // 2
    assert (highfreq.backend.name, highfreq.backend.cadence) == ("disk", "highfreq")
    assert (gemini.backend.name, gemini.backend.every_n) == ("replicated", 1)
    assert gemini.backend.persist_every_n == strawman.backend.every_n
    for typed in by_strategy.values():
        assert typed.backend.bandwidth_gbps == 1.25
        # Half a Strawman interval after its last checkpoint: the cost model's 1/(2f).
        assert typed.failure.at_step == strawman.backend.every_n * 3 // 2


def test_fig10_replaces_0_1_and_2_machines_and_gemini_keeps_a_memory_copy_of_each() -> None:
    """As in the paper's figure, the two machines replaced at once are not the two
    holders of one checkpoint: every lost node's copy survives on a peer."""
    replaced = {}
    for overrides in sweep_jobs("fig10_wasted"):
        if "+strategy=gemini" in overrides and "backend.bandwidth_gbps=1.25" in overrides:
            typed = to_schema(compose_config(overrides))
            (event,) = schedule_for(typed)
            n, m = typed.cluster.nodes, typed.backend.replication.factor
            holders = holders_of_all(
                n, m, resolve_placement(n, m, typed.backend.replication.placement)
            )
            lost = set(event.nodes) if event.kind == "hardware" else set()
            replaced[len(lost)] = typed.failure.name
            assert all(set(holders[node]) - lost for node in lost), (typed.failure.name, lost)
    assert replaced == {0: "software_once", 1: "hardware_once", 2: "correlated"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_tiny_backends_under_failure_runs_end_to_end(tmp_path: Path) -> None:
    """Two backends under two failure kinds (and the failure-free reference each is judged
    against) on the mlp, 4 nodes, 12 steps: every job recovers and ends exact."""
    outputs = tmp_path / "outputs"
    args = [
        "-m",
        "+sweep=backends_under_failure",
        "model=mlp",
        "train.steps=12",
        "failure.at_step=9",
        "backend.persist_every_n=6",
        "backend=disk,replicated",
        "failure=none,hardware_once,two_in_group",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    rc, out, err = run_cli(args, tmp_path, outputs=outputs, timeout_s=850)
    assert_nothing_left(tmp_path)
    assert rc == 0, err[-3000:]
    (sweep_dir,) = (outputs / "multiruns").iterdir()
    assert f"Sweep backends_under_failure: 6 jobs ({sweep_dir})" in out
    rows = list(csv.DictReader(io.StringIO((sweep_dir / TABLE_CSV).read_text())))
    assert [(r["backend"], r["failure"]) for r in rows] == [
        (b, f) for b in ("disk", "replicated") for f in ("none", "hardware_once", "two_in_group")
    ]
    assert {r["outcome"] for r in rows} == {"completed"}
    failing = [r for r in rows if r["failure"] != "none"]
    assert {r["exact"] for r in failing} == {"yes"}
    for r in failing:
        assert float(r["mean_recovery_s"]) > 0 and float(r["mean_wasted_s"]) > 0
    # One node lost: Gemini restores it from its peer's memory, losing at most the steps
    # whose checkpoints were still in flight (the kill can land before the newest replica
    # is committed); both nodes of a group lost: from the last-resort persistent checkpoint.
    repl = {r["failure"]: r for r in rows if r["backend"] == "replicated"}
    one = json.loads((Path(repl["hardware_once"]["job_dir"]) / "summary.json").read_text())
    (rec,) = one["recoveries"]
    assert "peer" in rec["source_counts"] and "storage" not in rec["source_counts"]
    assert rec["lost_steps"] <= 2
    assert float(repl["hardware_once"]["mean_lost_steps"]) == rec["lost_steps"]
    summary = json.loads((Path(repl["two_in_group"]["job_dir"]) / "summary.json").read_text())
    assert "storage" in summary["recoveries"][0]["source_counts"]
