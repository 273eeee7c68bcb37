"""Shared fixtures: isolated outputs and MLflow store, config composition, the console
script as a real subprocess, a real tracking server, and the check that a job left
nothing behind.

Every test that runs a job points ``GEMINI_OUTPUTS`` (and the MLflow store) at
its own ``tmp_path``, so tests never write into the repository's ``outputs/``
and never see each other's runs. A job is found again after the fact by the
``job.json`` it wrote under that directory: its ``run_id`` is what every
process of the job carries in ``GEMINI_RUN_ID`` and what prefixes its
shared-memory segments.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import pytest
from omegaconf import DictConfig

# A store of real jobs, built once per session for every module that reads it.
from report_store import job_store  # noqa: F401

from gemini.cluster.store import Store

# Where checkpoint segments live (gemini.checkpoint.slot honours the same variable).
SHM = Path(os.environ.get("GEMINI_SHM_DIR", "/dev/shm"))
REPO = Path(__file__).resolve().parents[1]
# The console script of the venv that runs the tests (an editable install).
GEMINI_BIN = Path(sys.executable).parent / "gemini"


# -- isolation --------------------------------------------------------------


@pytest.fixture
def outputs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where this test's runs go: ``GEMINI_OUTPUTS`` points here (not created yet)."""
    out = tmp_path / "outputs"
    monkeypatch.setenv("GEMINI_OUTPUTS", str(out))
    return out


@pytest.fixture
def mlflow_uri(tmp_path: Path) -> str:
    """An absolute sqlite MLflow store private to this test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


# -- composing the config as the console script does --------------------------


def failure_free(args: list[str]) -> list[str]:
    """``args`` with ``backend=none failure=none`` unless they choose their own.

    The default experiment is the headline (replicated, one hardware failure);
    tests that are about something else run the plain training job.
    """
    keys = {a.lstrip("+~").split("=", 1)[0] for a in args if "=" in a}
    extra = [f"{g}=none" for g in ("backend", "failure") if g not in keys]
    # After the caller's: Hydra's argparse wants flags (-m, --cfg job) before
    # the overrides, and an override ahead of them splits the list.
    return [*args, *extra]


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """conf/ composed with ``return_hydra_config=True`` (lightning-hydra-template style)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from gemini.cli import CONF
    from gemini.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", overrides=overrides or [], return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture
def hydra_compose() -> Callable[[list[str] | None], DictConfig]:
    """:func:`compose_config` itself: conf/ with exactly the given overrides."""
    return compose_config


@pytest.fixture
def compose_cfg(outputs_dir: Path) -> Callable[..., DictConfig]:
    """Compose conf/ with overrides, outputs pointed at this test's directory."""

    def _compose(*overrides: str) -> DictConfig:
        return compose_config(failure_free([f"paths.outputs={outputs_dir}", *overrides]))

    return _compose


# -- the console script -------------------------------------------------------


class CliResult(NamedTuple):
    rc: int
    stdout: str
    stderr: str


def cli_env(outputs: Path | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if outputs is not None:
        env["GEMINI_OUTPUTS"] = str(outputs)
    env.update(extra or {})
    return env


def _default_sigint() -> None:
    # A shell that starts a job in the background ignores SIGINT for it, and
    # the child would inherit that: give the script a terminal's Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(
    args: list[str],
    cwd: Path,
    *,
    outputs: Path | None = None,
    timeout_s: float = 180.0,
    env: dict[str, str] | None = None,
) -> CliResult:
    """Run ``gemini ARGS`` from ``cwd`` as a real process; (rc, stdout, stderr)."""
    p = subprocess.run(
        [str(GEMINI_BIN), *failure_free(args)],
        cwd=cwd,
        env=cli_env(outputs, env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        preexec_fn=_default_sigint,
    )
    return CliResult(p.returncode, p.stdout, p.stderr)


def start_cli(
    args: list[str],
    cwd: Path,
    *,
    outputs: Path | None = None,
    log_dir: Path,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``gemini ARGS`` without waiting; stdout/stderr go to files in ``log_dir``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "stdout.txt", "wb") as out, open(log_dir / "stderr.txt", "wb") as err:
        return subprocess.Popen(
            [str(GEMINI_BIN), *failure_free(args)],
            cwd=cwd,
            env=cli_env(outputs, env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            preexec_fn=_default_sigint,
        )


@pytest.fixture
def gemini_cli(outputs_dir: Path) -> Callable[..., CliResult]:
    """``gemini_cli(args, cwd, timeout_s=...)``: the console script with this test's outputs."""

    def _run(args: list[str], cwd: Path, timeout_s: float = 180.0) -> CliResult:
        return run_cli(args, cwd, outputs=outputs_dir, timeout_s=timeout_s)

    return _run


@pytest.fixture
def gemini_popen(outputs_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``gemini_popen(args, cwd)``: start the console script, output to files under tmp_path.

    Whatever is still running when the test ends is killed (the test failed).
    """
    started: list[subprocess.Popen[bytes]] = []

    def _start(args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
        p = start_cli(args, cwd, outputs=outputs_dir, log_dir=tmp_path / f"cli{len(started)}")
        started.append(p)
        return p

    yield _start
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


# -- nothing left behind --------------------------------------------------------


def job_specs(root: Path) -> list[dict[str, Any]]:
    """The ``job.json`` of every job that ran under ``root``."""
    out = []
    for path in sorted(root.rglob("job.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return out


def run_ids(root: Path) -> set[str]:
    return {str(spec["run_id"]) for spec in job_specs(root)}


def processes_of(ids: set[str], mention: str | None = None) -> list[psutil.Process]:
    """Live processes whose GEMINI_RUN_ID is one of ``ids`` (or whose command names ``mention``)."""
    me = os.getpid()
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid == me:
            continue
        try:
            rid = p.environ().get("GEMINI_RUN_ID")
            if rid is None or p.status() == psutil.STATUS_ZOMBIE:
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        cmd = " ".join(p.info["cmdline"] or [])
        if rid in ids or (mention is not None and mention in cmd):
            found.append(p)
    return found


def describe(procs: list[psutil.Process]) -> str:
    lines = []
    for p in procs:
        try:
            lines.append(f"  pid {p.pid}: {' '.join(p.cmdline())[:160]}")
        except psutil.Error:
            lines.append(f"  pid {p.pid}: (gone)")
    return "\n".join(lines)


def segments_of(ids: set[str]) -> list[str]:
    """/dev/shm segments of the given runs (every segment name starts ``gemini-{run_id}-``)."""
    if not SHM.is_dir():
        return []
    return sorted(
        e.name for e in SHM.iterdir() if any(e.name.startswith(f"gemini-{rid}-") for rid in ids)
    )


def leftovers(root: Path, grace_s: float = 3.0) -> tuple[list[psutil.Process], list[str]]:
    """Processes and shared-memory segments still there for the jobs that ran under ``root``.

    A job returns only after its teardown, so the grace covers nothing but the
    kernel finishing off processes that were already killed and reaped.
    """
    ids = run_ids(root)
    deadline = time.monotonic() + grace_s
    while True:
        procs, segs = processes_of(ids, mention=str(root)), segments_of(ids)
        if (not procs and not segs) or time.monotonic() > deadline:
            return procs, segs
        time.sleep(0.2)


def assert_nothing_left(root: Path) -> None:
    """No process and no shared-memory segment of any job under ``root`` is left."""
    procs, segs = leftovers(root)
    assert not procs, "processes left behind:\n" + describe(procs)
    assert not segs, f"shared-memory segments left behind: {segs}"


@pytest.fixture
def no_leftovers(tmp_path: Path) -> Iterator[None]:
    """After the test: no process and no /dev/shm segment of any job it ran is left."""
    yield
    procs, segs = leftovers(tmp_path)
    message = describe(procs)
    # Whatever leaked must not run on into the next test either.
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    for name in segs:
        (SHM / name).unlink(missing_ok=True)
    assert not procs, "processes left behind:\n" + message
    assert not segs, f"shared-memory segments left behind: {segs}"


@pytest.fixture(autouse=True)
def _no_hydra_state() -> Iterator[None]:
    """Hydra's singletons must not leak from one test into the next."""
    yield
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None


# -- one job, in this process ---------------------------------------------------


class JobResult(NamedTuple):
    summary: dict[str, Any]
    job_dir: Path


@pytest.fixture
def run_job(compose_cfg: Callable[..., DictConfig], tmp_path: Path) -> Callable[..., JobResult]:
    """``run_job(*overrides)``: one job through ``gemini.experiment.run`` in this process.

    The test process is the controller, as the console script's is. Small by
    default (one thread per rank, no progress bar, tracking off unless given
    a store); afterwards nothing of the job may be left.
    """
    count = 0

    def _run(*overrides: str, tracking_uri: str | None = None) -> JobResult:
        from gemini.experiment import run

        nonlocal count
        count += 1
        tracking = f"tracking.uri={tracking_uri}" if tracking_uri else "tracking=off"
        cfg = compose_cfg(tracking, "progress=false", "cluster.threads_per_rank=1", *overrides)
        job_dir = tmp_path / "jobs" / f"job{count}"
        try:
            summary = run(cfg, job_dir=job_dir)
        except BaseException:
            print_log_tails(job_dir)
            raise
        assert_nothing_left(job_dir)
        return JobResult(summary, job_dir)

    return _run


def print_log_tails(job_dir: Path, lines: int = 15) -> None:
    """The end of every process log of a job, into the failing test's captured output."""
    for log in sorted((job_dir / "logs").glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        if tail:
            print(f"---- {log.name} (last {len(tail)} lines)")
            print("\n".join(tail))


def wait_for_job(outputs: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> dict[str, Any]:
    """The job.json the console script's controller wrote (run id, store address, secret file)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the console script exited before starting the job"
        for path in outputs.glob("runs/*/job.json"):
            try:
                spec = dict(json.loads(path.read_text()))
            except ValueError:  # being written
                continue
            if spec.get("store"):
                return spec
        time.sleep(0.1)
    raise AssertionError(f"no job.json under {outputs} after {timeout_s} s")


# -- a tracking server ------------------------------------------------------------


def free_port() -> int:
    """A TCP port of 127.0.0.1 with nothing listening on it (at the time of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class TrackingServer(NamedTuple):
    uri: str
    store: Path
    proc: subprocess.Popen[str]
    output: list[str]
    """Its stdout and stderr lines so far (a reader thread appends them)."""


def start_tracking_server(store: Path, cwd: Path, timeout_s: float = 150.0) -> TrackingServer:
    """``python -m gemini.tracking_server`` (what ``make mlflow-server`` runs) over ``store``
    on a free port; returns once it prints "ready"."""
    port = free_port()
    module = [sys.executable, "-m", "gemini.tracking_server"]
    proc = subprocess.Popen(
        [*module, "--store", str(store), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=cwd,
        env={
            **os.environ,
            # The checkout under test, whichever one the venv was installed from.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        },
    )
    output: list[str] = []
    out = proc.stdout
    assert out is not None
    threading.Thread(target=lambda: output.extend(out), daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not any(x.startswith("ready") for x in output):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_tracking_server(proc)
            raise AssertionError(f"the tracking server did not get ready:\n{''.join(output)}")
        time.sleep(0.2)
    return TrackingServer(f"http://127.0.0.1:{port}", store, proc, output)


def stop_tracking_server(proc: subprocess.Popen[str], timeout_s: float = 30.0) -> None:
    """SIGTERM it as Ctrl-C would; it must exit 0 and take its whole process tree along."""
    try:
        tree = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        tree = [proc.pid]
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=timeout_s)
    deadline = time.monotonic() + 15
    while alive := [p for p in tree if running(p)]:
        assert time.monotonic() < deadline, f"still running after SIGTERM: {alive}"
        time.sleep(0.2)
    assert rc == 0, f"the tracking server exited with {rc}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:
    """A tracking server for a module's tests, started as ``make mlflow-server`` starts
    it, over a store of its own; SIGTERM takes its tree down when the module ends."""
    root = tmp_path_factory.mktemp("tracking-server")
    srv = start_tracking_server(root / "store" / "mlflow.db", cwd=root)
    yield srv
    stop_tracking_server(srv.proc)


STORE_SECRET = secrets.token_bytes(32)
"""The secret of the stores the ``signed_store`` fixture hosts."""


@pytest.fixture
def signed_store() -> Iterator[Store]:
    """A real KV store on 127.0.0.1 whose values are signed with STORE_SECRET."""
    s = Store("127.0.0.1", 0, STORE_SECRET, timeout_s=10.0, master=True)
    yield s
    s.raw = None  # type: ignore[assignment]  # closes the listening socket
