"""Forged control values written into a running job's store change nothing.

A real job through the console script (root agent, node launchers, worker
agents, trainers, a software failure). While it runs, a client that knows the
store's address but not the run's secret writes what would steer the job if it
were trusted: a plan for the next generation (a real plan replayed under the
wrong key), a spawn request, final digests and exit codes of every rank, a
stop of the running generation and an abort. (Overwriting a value the job has
written is denial of service, which no signature prevents: not tested.) The
job must refuse each of them (one log line per key and reader), recover from
its own failure and end with the failure-free ``state_digest``.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import wait_for_job
from test_recovery_e2e import AT_STEP, CLUSTER, NODES, STEPS, References, assert_left_nothing

from gemini.cluster import keys

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leftovers")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> References:
    return References(tmp_path_factory.mktemp("reference"))


def connect(address: str) -> dist.TCPStore:
    host, port = address.rsplit(":", 1)
    return dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=10))


def raw_step(value: bytes) -> int:
    """A rank's progress as stored (signed ``mac.step``, or a bare number)."""
    return int(value.rsplit(b".", 1)[-1])


def forge(address: str, world: int) -> None:
    """Write forged control values into the job's store, as an outsider can."""
    bad = connect(address)
    real_plan = bad.get(keys.plan(1))
    bad.set(keys.plan(2), real_plan)  # a real signature, under another key
    for r in range(world):
        bad.set(keys.final(1, r), json.dumps({"digest": "0" * 64, "step": STEPS}))
        bad.set(keys.exited(1, r), json.dumps({"code": 0, "node": r, "t": time.time()}))
    n = int(bad.add(keys.queue_length(keys.SPAWN), 1))
    bad.set(keys.queue_item(keys.SPAWN, n), json.dumps({"node": 0, "t": time.time()}))
    bad.set(keys.stop(1), "1")
    bad.set(keys.ABORT, "1")


@pytest.mark.timeout(300)
def test_forged_control_values_are_refused_and_the_job_ends_exact(
    reference: References,
    gemini_popen: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
    outputs_dir: Path,
) -> None:
    args = [
        *CLUSTER,
        f"train.steps={STEPS}",
        "backend=memory",
        "failure=software_once",
        f"failure.at_step={AT_STEP}",
        "failure.node=1",
        "tracking=off",
    ]
    proc = gemini_popen(args, cwd=tmp_path)
    spec = wait_for_job(outputs_dir, proc, timeout_s=120)
    # Forge once generation 1 trains, well before the injected failure.
    probe = connect(spec["store"])
    deadline = time.monotonic() + 180
    while not (probe.check([keys.progress(0)]) and raw_step(probe.get(keys.progress(0))) >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, "training never started"
        time.sleep(0.05)
    assert raw_step(probe.get(keys.progress(0))) < AT_STEP - 1, (
        "too late to forge before the failure"
    )
    forge(spec["store"], world=NODES)  # one rank per node

    assert proc.wait(timeout=240) == 0, (tmp_path / "cli0" / "stderr.txt").read_text()[-3000:]
    job_dir = Path(spec["job_dir"])
    summary = json.loads((job_dir / "summary.json").read_text())
    assert summary["outcome"] == "completed" and summary["steps"] == STEPS
    assert summary["state_digest"] == reference.digest()
    # The job's own failure, and nothing else: no spawned node, no early end.
    recs = summary["recoveries"]
    assert [r["kind"] for r in recs] == ["software"], recs
    assert set(recs[0]["rank_sources"].values()) == {"local"}
    assert_left_nothing(summary["run_id"])
    assert not (job_dir / ".secret").exists(), "the run's secret outlived it"

    # Each reader said once what it refused, and why.
    logs = {p.name: p.read_text() for p in (job_dir / "logs").glob("*.log")}
    logs["controller"] = (tmp_path / "cli0" / "stderr.txt").read_text()
    refused = [
        (name, line) for name, text in logs.items() for line in text.splitlines()
        if line.startswith("[store]")
    ]  # fmt: skip
    assert len(refused) == len(set(refused)), "a refusal was logged twice by one reader"
    said = {line for _, line in refused}
    assert f"[store] {keys.ABORT}: refused: unsigned" in said
    assert f"[store] {keys.stop(1)}: refused: unsigned" in said
    assert f"[store] {keys.exited(1, 0)}: refused: unsigned" in said
    assert f"[store] {keys.queue_item(keys.SPAWN, 1)}: refused: unsigned" in said
