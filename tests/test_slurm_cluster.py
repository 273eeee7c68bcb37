"""The single-node SLURM cluster of ``scripts/slurm.sh`` runs real jobs.

Marked ``slurm``: they need the cluster up (``make slurm-up``; CI starts one).
The cluster is found through ``SLURM_CONF`` or, when that is unset, the
configuration ``scripts/slurm.sh`` writes under ``GEMINI_SLURM_DIR``. Without
either they are skipped; with one, a cluster that does not answer fails them.
Several tasks share this one host, which is what the node's oversubscribed
CPU count is for.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

STATE_DIR = Path(os.environ.get("GEMINI_SLURM_DIR") or "/tmp/gemini-slurm")
CONF = os.environ.get("SLURM_CONF") or str(STATE_DIR / "slurm.conf")
TASKS = 4

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        "SLURM_CONF" not in os.environ and not Path(CONF).is_file(),
        reason="no SLURM cluster set up (make slurm-up)",
    ),
]


def slurm(*args: str, timeout: float = 60) -> str:
    """Run a SLURM client against the cluster; its stdout (it must succeed)."""
    out = subprocess.run(
        args,
        env={**os.environ, "SLURM_CONF": CONF},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, f"{' '.join(args)} exited {out.returncode}: {out.stderr.strip()}"
    return out.stdout


def job_state(job_id: str) -> str:
    fields = dict(
        kv.split("=", 1)
        for kv in slurm("scontrol", "-o", "show", "job", job_id).split()
        if "=" in kv
    )
    return fields["JobState"]


def wait_until(what: str, cond: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"not {what} after {timeout:.0f} s"
        time.sleep(0.2)


def test_the_single_node_is_idle_with_room_for_four_tasks() -> None:
    rows = slurm("sinfo", "-h", "-N", "-o", "%t %c").split("\n")
    rows = [r for r in rows if r]
    assert len(rows) == 1, f"expected one node, sinfo says {rows}"
    state, cpus = rows[0].split()
    assert state == "idle"
    assert int(cpus) >= TASKS


def test_a_four_task_batch_job_completes_with_one_line_per_task(tmp_path: Path) -> None:
    script = tmp_path / "job.sh"
    # Each task prints its rank: four distinct ranks prove four tasks ran,
    # with the interpreter of this test (the host is the compute node).
    script.write_text(
        "#!/bin/bash\n"
        f"srun {sys.executable} -c "
        '\'import os; print(os.environ["SLURM_PROCID"], os.environ["SLURM_NTASKS"])\'\n'
    )
    out = tmp_path / "job.out"
    # --wait: sbatch returns when the job ends, with the job's exit code.
    job_id = (
        slurm(
            "sbatch",
            "--parsable",
            "--wait",
            f"--ntasks={TASKS}",
            f"--output={out}",
            str(script),
            timeout=120,
        )
        .strip()
        .split(";")[0]
    )

    assert job_state(job_id) == "COMPLETED"
    lines = sorted(out.read_text().splitlines())
    assert lines == [f"{rank} {TASKS}" for rank in range(TASKS)]
    assert slurm("squeue", "-h") == ""


def test_a_cancelled_job_leaves_neither_queue_entry_nor_process(tmp_path: Path) -> None:
    marker = f"gemini-slurm-test-{os.getpid()}"
    # exec: the task *is* the sleep, so finding it by its argument finds the task.
    job_id = (
        slurm(
            "sbatch",
            "--parsable",
            f"--ntasks={TASKS}",
            f"--output={tmp_path / 'job.out'}",
            f"--wrap=srun bash -c 'exec -a {marker} sleep 300'",
        )
        .strip()
        .split(";")[0]
    )

    def tasks() -> list[psutil.Process]:
        return [
            p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0] == marker
        ]

    wait_until("running", lambda: job_state(job_id) == "RUNNING")
    wait_until(f"{TASKS} tasks started", lambda: len(tasks()) == TASKS)

    slurm("scancel", job_id)
    wait_until("out of the queue", lambda: slurm("squeue", "-h") == "")
    wait_until("all tasks gone", lambda: tasks() == [])
    assert job_state(job_id) == "CANCELLED"
