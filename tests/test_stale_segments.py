"""A controller killed outright leaves its shared memory behind: the next run frees it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

from gemini.checkpoint.slot import SHM_DIR, SlotSet, list_segments, unlink_prefix
from gemini.cluster.local import sweep_stale_segments


def _segment(run_id: str, age_s: float) -> str:
    name = f"gemini-{run_id}-n0-r0-local"
    SlotSet.create(name, 4096, 4096, touch=False).close()
    old = time.time() - age_s
    os.utime(SHM_DIR / name, (old, old))
    return name


def test_segments_of_a_dead_run_are_freed_and_a_live_runs_are_kept() -> None:
    dead, live, fresh = (uuid.uuid4().hex[:10] for _ in range(3))
    _segment(dead, age_s=3600)
    _segment(live, age_s=3600)
    _segment(fresh, age_s=0)
    # A process of the live run, found by the env every process of a run carries.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        env={**os.environ, "GEMINI_RUN_ID": live},
    )
    try:
        freed = sweep_stale_segments()
        assert dead in freed
        assert list_segments(f"gemini-{dead}-") == []
        assert list_segments(f"gemini-{live}-") != []
        # Too new to judge: a run that is starting up.
        assert list_segments(f"gemini-{fresh}-") != []
    finally:
        holder.kill()
        holder.wait()
        for run_id in (dead, live, fresh):
            unlink_prefix(f"gemini-{run_id}-")


def test_segments_not_named_by_a_run_are_never_touched() -> None:
    name = f"gemini-bench-{uuid.uuid4().hex[:8]}"
    SlotSet.create(name, 4096, 4096, touch=False).close()
    old = time.time() - 3600
    os.utime(SHM_DIR / name, (old, old))
    try:
        sweep_stale_segments()
        assert list_segments(name) == [name]
    finally:
        unlink_prefix(name)
