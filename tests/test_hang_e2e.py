"""A hung trainer is a failure: found by its stalled heartbeat, recovered exactly.

A ``hang`` stops one trainer (SIGSTOP): it never exits, so only the root's
watchdog on ``hb/rank{r}`` can find it, within ``cluster.hang_timeout_s``
rather than the peers' collective timeout. Real jobs, with the cluster and
failure-free references of tests/test_recovery_e2e.py.
"""

from __future__ import annotations

import pytest
from test_recovery_e2e import AT_STEP, References, RunJob, job, only_recovery

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leftovers")]

HANG_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> References:
    return References(tmp_path_factory.mktemp("reference"))


@pytest.mark.timeout(600)
def test_a_hung_trainer_is_detected_by_its_heartbeat_and_recovered_exactly(
    reference: References, run_job: RunJob
) -> None:
    summary, _ = job(
        run_job,
        "backend=replicated",
        "failure=hang_once",
        f"failure.at_step={AT_STEP}",
        "failure.node=1",
        f"cluster.hang_timeout_s={HANG_TIMEOUT_S}",
    )
    assert summary["state_digest"] == reference.digest()
    assert [f["kind"] for f in summary["failures_injected"]] == ["hang"]
    rec = only_recovery(summary, "hang")
    assert rec["failed_ranks"] == [1] and rec["dead_nodes"] == []
    # Found by the watchdog, long before the collective timeout (20 s) would
    # have ended its peer; measured from when the trainer was stopped.
    assert rec["detect_s"] < HANG_TIMEOUT_S + 2.0, rec["detect_s"]
    # Its node and memory lived on: every rank reads its own copy.
    assert set(rec["rank_sources"].values()) == {"local"}
