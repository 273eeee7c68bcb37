"""A light MLflow tracking server over the project's sqlite store (``make mlflow-server``).

The store is the one every job writes (``<outputs>/mlflow.db``, see
``gemini.tracking``), so the server shows every run without moving anything.
It is kept light for a 2-core machine: one worker and MLflow's job execution
off (that would start a task queue and its consumers beside the web server).
It runs in the foreground: Ctrl-C or SIGTERM stops the server and every
process it started.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType

from gemini.config import default_outputs

HEALTH_TIMEOUT_S = 120.0
"""A first start creates the store's tables: seconds, more on a busy machine."""
STOP_TIMEOUT_S = 10.0


def default_store() -> Path:
    """The sqlite file jobs record into when ``tracking.uri`` is empty."""
    return Path(default_outputs()) / "mlflow.db"


def server_command(store: Path, host: str, port: int) -> list[str]:
    # MLflow 3 wants an absolute sqlite path; artifacts go beside the store,
    # where jobs already put theirs (gemini.tracking.artifact_location).
    store = store.resolve()
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{store}",
        "--artifacts-destination",
        str(store.parent / "mlartifacts"),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def server_env() -> dict[str, str]:
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_healthy(uri: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Return once ``/health`` answers; raise if the server exits or never answers."""
    deadline = time.monotonic() + timeout
    while not healthy(uri):
        if proc.poll() is not None:
            raise RuntimeError(f"the MLflow server exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the MLflow server did not answer {uri}/health in {timeout:.0f} s")
        time.sleep(0.2)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group, wait, then SIGKILL whatever is left of it."""
    # The server has a session of its own (start_new_session): its pgid is its pid.
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_TIMEOUT_S)
    # The server if it ignored SIGTERM, and any worker that outlived it.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def serve(store: Path, host: str, port: int) -> int:
    """Run the server until it exits or this process is interrupted; its exit code."""
    store.parent.mkdir(parents=True, exist_ok=True)
    uri = f"http://{host}:{port}"
    print(f"store: {store.resolve()}", flush=True)
    print(f"tracking URI: {uri}", flush=True)
    signal.signal(signal.SIGTERM, _terminate)
    # A session of its own: one killpg reaches the server and its workers,
    # and a terminal's Ctrl-C reaches this process, which then stops them.
    proc = subprocess.Popen(
        server_command(store, host, port), env=server_env(), start_new_session=True
    )
    try:
        wait_healthy(uri, proc, HEALTH_TIMEOUT_S)
        print("ready (Ctrl-C stops it)", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        stop(proc)
        print("stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gemini.tracking_server", description=__doc__)
    p.add_argument(
        "--store",
        type=Path,
        default=None,
        help="the sqlite file (default: <outputs>/mlflow.db, outputs = GEMINI_OUTPUTS or outputs/)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 5000))
    args = p.parse_args(argv)
    return serve(args.store or default_store(), args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
