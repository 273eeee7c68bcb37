"""Process helpers every part of a job uses: start a module, find a run's
processes, and signal or reap a whole process tree.

They are plain functions over psutil and subprocess, shared by the local
cluster, the node launchers and the agents, so that how a process is started
and stopped is decided in one place.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import psutil


def spawn_module(
    module: str,
    args: list[str],
    *,
    log_path: Path,
    env: dict[str, str] | None = None,
    new_session: bool = False,
    stdin_pipe: bool = False,
    prefix: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """Start ``python -m module args`` with output to a log file.

    ``new_session`` puts a node's tree in its own process group so that the
    injector can kill exactly that node, and a Ctrl-C on the console reaches
    only the controller, which then tears everything down in order.
    ``prefix`` runs the interpreter through a command that execs it (``ip netns
    exec``), so the process keeps the pid returned here.
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it after fork
    try:
        return subprocess.Popen(
            [*prefix, sys.executable, "-m", module, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            env=full_env,
            start_new_session=new_session,
        )
    finally:
        log.close()


def _signal_tree(pid: int, sig: int, timeout_s: float) -> list[psutil.Process]:
    """Signal a process and all its descendants; returns those still alive after the wait."""
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    return list(alive)


def kill_tree(pid: int, sig: int = signal.SIGKILL, timeout_s: float = 5.0) -> None:
    """Signal a process and all its descendants, then reap them."""
    _signal_tree(pid, sig, timeout_s)


def terminate_tree(pid: int, grace_s: float = 3.0) -> None:
    """SIGTERM a tree, then SIGKILL whatever is left after ``grace_s``."""
    alive = _signal_tree(pid, signal.SIGTERM, 0.0)
    # A stopped process (a hang) holds SIGTERM pending until it is continued:
    # continue every one so that it exits within the grace, not after it.
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGCONT)
    _, alive = psutil.wait_procs(alive, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=grace_s)


def free_run(run_id: str) -> None:
    """Kill every live process of a run on this machine, orphans included, and free
    its shared memory: the end of every teardown, and of a killed earlier attempt."""
    from gemini.checkpoint.slot import unlink_prefix

    leftovers = run_processes(run_id)
    for proc in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(leftovers, timeout=5)
    unlink_prefix(f"gemini-{run_id}-")


def run_processes(run_id: str, prefix: bool = False) -> list[psutil.Process]:
    """Every live process started for this run, orphans included (found by env);
    ``prefix``: of every run whose id starts with ``run_id``."""
    me = os.getpid()
    out = []
    for p in psutil.process_iter(["pid"]):
        if p.pid == me:
            continue
        try:
            found = p.environ().get("GEMINI_RUN_ID", "")
            if found == run_id or (prefix and found.startswith(run_id)):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out
