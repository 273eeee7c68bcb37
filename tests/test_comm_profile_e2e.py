"""The idle-span profile of a real job: two nodes over gloo, DDP's all-reduces timed
by the communication hook, and the hook leaves the training bit for bit unchanged."""

from __future__ import annotations

import pytest
from test_recovery_e2e import References, RunJob, job

pytestmark = pytest.mark.usefixtures("no_leftovers")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> References:
    return References(tmp_path_factory.mktemp("reference"))


@pytest.mark.timeout(300)
def test_a_replicated_job_profiles_its_idle_spans_and_ends_where_an_unprofiled_one_does(
    reference: References, run_job: RunJob
) -> None:
    summary, _ = job(
        run_job, "backend=replicated", "failure=none", "backend.replication.profile_steps=5"
    )
    # The hook scales and sums as DDP does without one: backend=none, which
    # profiles nothing, is the reference.
    assert summary["state_digest"] == reference.digest()
    profiles = summary["idle_profiles"]
    assert sorted(profiles) == ["0", "1"]
    for p in profiles.values():
        assert p["profiled"] == 5 and 1 <= p["iterations"] <= 5
        # At least one all-reduce per iteration: a span before it and one after.
        assert len(p["spans_s"]) >= 2 and len(p["span_cv"]) == len(p["spans_s"])
        assert all(s >= 0 for s in p["spans_s"])
        assert p["comm_s"] > 0 and p["idle_s"] > 0
        assert p["idle_s"] + p["comm_s"] == pytest.approx(p["iter_s"])
    assert summary["idle_s"] > 0 and summary["comm_s"] > 0


@pytest.mark.timeout(300)
def test_no_profile_when_it_is_off(run_job: RunJob) -> None:
    summary, _ = job(
        run_job, "backend=replicated", "failure=none", "backend.replication.profile_steps=0"
    )
    assert "idle_profiles" not in summary and "idle_s" not in summary
