"""Leaving a failed generation does not wait for its collectives.

After a failure, a survivor that restarts in place may still have collectives
queued on the failed generation's gloo group, waiting on a peer that is alive
but has left too. Freeing that group would wait for them until the collective
timeout, far past the handover to the next generation (seen as survivors
restarted as fresh processes in busy sweeps). Two real processes over gloo:
rank 0 leaves with an all-reduce pending that rank 1 never joins, and rank 1
stays alive until rank 0 says it is done.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, free_port

RANK = textwrap.dedent(
    """
    import gc, sys, time
    from datetime import timedelta
    from pathlib import Path
    import torch, torch.distributed as dist
    from gemini.workload.trainer import exit_process, release_process_group

    rank, port, marker = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=timedelta(seconds=30))
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=120)
    )
    if rank == 0:
        # As DDP's communication hook leaves it: an all-reduce with a Python
        # continuation, that the peer never joins.
        fut = dist.all_reduce(torch.ones(4096), async_op=True).get_future()
        chained = fut.then(lambda f: f.value()[0])
        time.sleep(0.5)
        why = release_process_group()
        del fut, chained
        gc.collect()
        print("left:", why, flush=True)
        marker.write_text("left")
        exit_process(0)
    else:
        # Alive, in no collective, until rank 0 has left (or the test gave up).
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    """
)


@pytest.mark.timeout(120)
def test_leaving_a_generation_with_a_pending_collective_does_not_wait_for_it(
    tmp_path: Path,
) -> None:
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    marker = tmp_path / "left"
    port = free_port()
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(port), str(marker)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for rank in (0, 1)
    ]
    try:
        # Well under the 120 s collective timeout; rank 1 holds its side open
        # until rank 0 is done, so only not waiting for the collective gets here.
        out, _ = procs[0].communicate(timeout=45)
        assert procs[0].returncode == 0, out
        assert "left: None" in out
        assert procs[1].wait(timeout=30) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
