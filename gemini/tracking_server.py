"""A light MLflow tracking server over the project's sqlite store (``make mlflow-server``).

The store is the one every job writes (``<outputs>/mlflow.db``, see
``gemini.tracking``), so the server shows every run without moving anything;
jobs given ``tracking.uri=http://host:port`` record through it instead, and
:func:`health_error` is the probe their config check makes before a start.
It is kept light for a 2-core machine: one worker and MLflow's job execution
off (that would start a task queue and its consumers beside the web server).
It runs in the foreground: Ctrl-C or SIGTERM stops the server and every
process it started. It serves MLflow's app as :mod:`gemini.mlflow_app`
(experiments open in the model-training view).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import ssl
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
        # MLflow's server, its page opening the model-training view (gemini.mlflow_app).
        "--app-name",
        "gemini",
    ]


def server_env() -> dict[str, str]:
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def _tls_context() -> ssl.SSLContext:
    """Verify an https server as MLflow's client will: its own variables choose how."""
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return ssl._create_unverified_context()
    return ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"))


def health_error(uri: str, timeout: float = 2.0) -> str | None:
    """Why ``<uri>/health`` does not answer 200 within ``timeout`` seconds; None if it does."""
    url = f"{uri.rstrip('/')}/health"
    try:
        context = _tls_context() if url.lower().startswith("https:") else None
        with urllib.request.urlopen(url, timeout=timeout, context=context) as r:
            return None if r.status == 200 else f"/health answered HTTP {r.status}"
    except urllib.error.HTTPError as e:  # a URLError too: something answers, not MLflow
        return f"/health answered HTTP {e.code}"
    except urllib.error.URLError as e:
        reason = e.reason
        return str(getattr(reason, "strerror", None) or reason)
    except (OSError, ValueError) as e:  # a timeout mid-answer, a missing CA file, a bad URL
        return str(getattr(e, "strerror", None) or e) or type(e).__name__


def healthy(uri: str) -> bool:
    return health_error(uri) is None


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
