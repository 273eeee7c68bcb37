"""How a job that does not complete says why, and what a failed restore attempt rules out.

Pure functions of the controller (``summarize``, ``print_results``) and of the
root's recovery (``excluded_sources``, ``gave_up``), fed what the real
components put in the store.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import compose_config

from gemini.cluster.recovering import MAX_ATTEMPTS, Attempt, excluded_sources, gave_up
from gemini.config import GeminiConfig, to_schema
from gemini.experiment import print_results, summarize
from gemini.recovery import plan_recovery

VANISHED = "the root agent stopped beating 75 s ago and no new root was elected"


def cfg() -> GeminiConfig:
    return to_schema(compose_config(["backend=none", "failure=none", "tracking=off"]))


def reports(root: dict[str, Any]) -> dict[str, Any]:
    """What ``collect`` returns for a job that ended before any rank reported."""
    return {"steps": [], "finals": {}, "recoveries": [], "gen": 1, "final_waits": [], "root": root}


def test_a_vanished_root_is_named_in_the_summary_and_the_results(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A root that vanished wrote no result: only the controller knows why the job ended.
    summary = summarize(cfg(), reports({}), 80.0, "error", "r1", [], [], reason=VANISHED)
    assert summary["outcome"] == "error"
    assert summary["reason"] == VANISHED
    print_results(cfg(), summary, [])
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("reason") and line.endswith(VANISHED) for line in out), out


def test_the_roots_own_reason_wins_over_the_controllers() -> None:
    root = {"status": "failed", "reason": "recovery failed after 5 attempts: ..."}
    summary = summarize(cfg(), reports(root), 80.0, "failed", "r1", [], [], reason="other")
    assert summary["reason"] == root["reason"]


def group_plan(excluded: list[tuple[int, int, str, int]] | None = None) -> Any:
    """Four nodes, m=2 groups {0,1} {2,3}, node 1 lost: rank 1 comes from node 0's replica."""
    memory = {
        0: {0: [(9, 1), (8, 1)], 1: [(9, 1), (8, 1)]},
        2: {2: [(9, 1), (8, 1)], 3: [(9, 1), (8, 1)]},
        3: {3: [(9, 1), (8, 1)], 2: [(9, 1), (8, 1)]},
    }
    return plan_recovery(
        {r: r for r in range(4)}, memory, storage=[(6, 1)], excluded=excluded or [], failed_step=9
    )


def test_a_failed_restore_excludes_only_the_source_that_failed() -> None:
    plan = group_plan()
    assert plan.step == 9 and plan.sources[1]["kind"] == "peer"
    # Rank 1 could not read node 0's replica; ranks 0, 2 and 3 restored and
    # then hung in the first collective waiting for it (no ready report).
    attempt = Attempt(
        plan,
        generation=2,
        readies={},
        failed_restores={
            1: {"step": 9, "source": plan.sources[1], "error": "ChecksumError: chunk 3"}
        },
    )
    assert not attempt.ok
    excluded = excluded_sources(attempt)
    assert excluded == [(1, 9, "peer", 0)]
    again = group_plan(excluded)
    # Rank 1 falls back to its older copy; nobody else's source was ruled out,
    # so every other rank restores the same step from its own memory again.
    assert again.step == 8
    assert again.sources[1] == {"kind": "peer", "node": 0, "generation": 1}
    assert all(again.sources[r]["kind"] == "local" for r in (0, 2, 3))
    assert "rank 1 could not read step 9 from peer:0 (ChecksumError: chunk 3)" in (
        attempt.describe()
    )


def test_an_attempt_without_a_reported_failure_excludes_nothing() -> None:
    plan = group_plan()
    attempt = Attempt(plan, generation=2, readies={0: {"t": 1.0}})
    assert excluded_sources(attempt) == []
    assert "ranks [1, 2, 3] did not come back" in attempt.describe()


def test_a_recovery_that_runs_out_of_attempts_names_every_one() -> None:
    plan = group_plan()
    attempts = [Attempt(plan, generation=g, newly_dead=[2]) for g in range(2, 2 + MAX_ATTEMPTS)]
    reason = gave_up(attempts)
    assert reason.startswith(f"recovery failed after {MAX_ATTEMPTS} attempts")
    for i in range(1, MAX_ATTEMPTS + 1):
        assert f"attempt {i} (step 9, generation {i + 1}): nodes [2] died" in reason


def test_the_reason_is_an_mlflow_tag_of_the_failed_run(tmp_path: Any, mlflow_uri: str) -> None:
    import mlflow

    from gemini.tracking import record_job

    c = to_schema(compose_config(["backend=none", "failure=none", f"tracking.uri={mlflow_uri}"]))
    summary = summarize(c, reports({}), 80.0, "error", "r1", [], [], reason=VANISHED)
    rid = record_job(
        c, tmp_path, run_name="vanished", summary=summary, step_metrics=[], recoveries=[],
        parent=None,
    )  # fmt: skip
    got = mlflow.MlflowClient(mlflow_uri).get_run(rid)
    assert got.data.tags["reason"] == VANISHED
    assert got.info.status == "FAILED"
