"""``make mlflow-server``: a real MLflow server over a given sqlite store.

The server is started as ``make mlflow-server`` starts it (the module in a
process of its own), on a free port over a store in ``tmp_path``, so the
repository's store is never touched; a client then writes to it over HTTP,
and SIGTERM must take down the whole process tree.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from conftest import REPO, free_port, running


def test_the_server_serves_the_given_store_and_stops_with_its_whole_tree(tmp_path: Path) -> None:
    import mlflow

    port = free_port()
    store = tmp_path / "store" / "mlflow.db"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gemini.tracking_server",
            "--store",
            str(store),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Anything written relative to the working directory stays in tmp_path.
        cwd=tmp_path,
        env={
            **os.environ,
            # Where the default store would go if --store were ignored.
            "GEMINI_OUTPUTS": str(tmp_path / "not-this"),
            # The checkout under test, whichever one the venv was installed from.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        },
    )
    lines: queue.Queue[str] = queue.Queue()
    out = proc.stdout
    assert out is not None
    # A reader thread, so that waiting for a line can time out.
    threading.Thread(target=lambda: [lines.put(x) for x in out], daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 150
        while not any(x.startswith("ready") for x in seen):
            assert proc.poll() is None, f"the server script exited early:\n{''.join(seen)}"
            assert time.monotonic() < deadline, f"no 'ready' line:\n{''.join(seen)}"
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=1))
        uri = f"http://127.0.0.1:{port}"
        assert f"tracking URI: {uri}\n" in seen
        tree = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
        assert len(tree) >= 2, "the server runs in processes of its own"

        client = mlflow.MlflowClient(uri)
        exp_id = client.create_experiment("served")
        assert client.get_experiment_by_name("served").experiment_id == exp_id
        assert store.is_file()
        assert not (tmp_path / "not-this").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0

    deadline = time.monotonic() + 15
    while alive := [p for p in tree if running(p)]:
        assert time.monotonic() < deadline, f"still running after SIGTERM: {alive}"
        time.sleep(0.2)
