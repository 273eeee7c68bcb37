"""Nothing outlives a job: after it completes, and after a Ctrl-C or a SIGTERM in
the middle of training, no process of the run is left (found by its
GEMINI_RUN_ID, orphans included) and no shared-memory segment of the run
remains in /dev/shm.

The jobs checkpoint into memory (``backend=memory``) so that they really hold
shared-memory segments while they run: a cleanup check on a run that never
allocated any would prove nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for_job

from gemini.cluster import keys
from gemini.cluster.processes import run_processes
from gemini.cluster.store import Store

pytestmark = pytest.mark.usefixtures("no_leftovers")

SHM = Path(os.environ.get("GEMINI_SHM_DIR", "/dev/shm"))
LONG_RUN = [
    "train.steps=100000",
    "cluster.nodes=2",
    "model=gpt_tiny",
    "backend=memory",
    "tracking=off",
]


def segments(run_id: str) -> list[str]:
    return sorted(n for n in os.listdir(SHM) if n.startswith(f"gemini-{run_id}-"))


def wait_for_training(job: dict[str, Any], min_step: int, timeout_s: float) -> int:
    """Poll the job's KV store until every rank has finished ``min_step`` steps."""
    secret = bytes.fromhex(Path(job["secret_file"]).read_text())
    store = Store.from_address(job["store"], secret, timeout_s=10.0)
    world = int(job["config"]["cluster"]["nodes"]) * int(job["config"]["cluster"]["ranks_per_node"])
    deadline = time.monotonic() + timeout_s
    step = 0
    while time.monotonic() < deadline:
        steps = [store.get_int(keys.progress(r), -1) for r in range(world)]
        if min(steps) >= 0:
            step = min(steps)
            if step >= min_step:
                return step
        time.sleep(0.2)
    raise AssertionError(f"training did not reach step {min_step} in {timeout_s} s (at {step})")


def assert_run_gone(run_id: str, grace_s: float = 3.0) -> None:
    deadline = time.monotonic() + grace_s
    while (run_processes(run_id) or segments(run_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [" ".join(p.cmdline()) for p in run_processes(run_id)]
    assert not left, "processes of the run left behind:\n" + "\n".join(left)
    assert not segments(run_id), f"shared memory of the run left behind: {segments(run_id)}"


@pytest.mark.timeout(300)
def test_a_completed_run_leaves_no_process_and_no_shared_memory(
    gemini_popen: Callable[..., subprocess.Popen[bytes]], tmp_path: Path, outputs_dir: Path
) -> None:
    proc = gemini_popen(
        ["train.steps=6", "cluster.nodes=2", "backend=memory", "tracking=off"], cwd=tmp_path
    )
    job = wait_for_job(outputs_dir, proc, timeout_s=120)
    seen: set[str] = set()
    while proc.poll() is None:
        seen.update(segments(job["run_id"]))
        time.sleep(0.05)
    assert proc.returncode == 0
    assert seen, "the run never held shared memory: nothing was checked"
    assert_run_gone(job["run_id"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("sig", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_a_signal_mid_training_stops_the_job_and_frees_everything(
    gemini_popen: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
    outputs_dir: Path,
    sig: signal.Signals,
    exit_code: int,
) -> None:
    proc = gemini_popen(LONG_RUN, cwd=tmp_path)
    job = wait_for_job(outputs_dir, proc, timeout_s=120)
    wait_for_training(job, min_step=2, timeout_s=180)
    assert segments(job["run_id"]), "training holds checkpoints in shared memory"
    proc.send_signal(sig)
    try:
        rc = proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the console script did not exit within 20 s of {sig.name}")
    assert rc == exit_code
    stderr = (tmp_path / "cli0" / "stderr.txt").read_text()
    assert "Traceback" not in stderr
    assert "interrupted" in stderr
    assert_run_gone(job["run_id"])


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ctrl_c_while_the_cluster_starts_up_frees_everything(
    gemini_popen: Callable[..., subprocess.Popen[bytes]], tmp_path: Path, outputs_dir: Path
) -> None:
    """Interrupted before any rank trained: the processes are still importing torch."""
    proc = gemini_popen(LONG_RUN, cwd=tmp_path)
    job = wait_for_job(outputs_dir, proc, timeout_s=120)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert_run_gone(job["run_id"])
