"""What every process of a job needs to know, handed over as one JSON file.

The controller writes ``job.json`` in the job dir; the root agent, the node
launchers, the worker agents and the trainers all start from it, however they
were started (locally or by SLURM). The per-run secret that authenticates
transport peers sits beside it in a file only the owner can read.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
from omegaconf import OmegaConf

from gemini.config import GeminiConfig


@dataclass
class JobSpec:
    run_id: str
    """Unique id of this job: prefixes shared-memory names and store keys."""
    job_dir: str
    """The Hydra job dir: config, logs, summary, checkpoints by default."""
    store: str
    """host:port of the KV store."""
    secret_file: str
    """File holding the per-run transport secret (hex), mode 0600."""
    config: dict[str, Any]
    """The resolved config (GeminiConfig as a plain dict)."""

    @property
    def cfg(self) -> GeminiConfig:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(GeminiConfig), self.config))
        assert isinstance(obj, GeminiConfig)
        return obj

    @property
    def world_size(self) -> int:
        c = self.config["cluster"]
        return int(c["nodes"]) * int(c["ranks_per_node"])

    def secret(self) -> bytes:
        return bytes.fromhex(Path(self.secret_file).read_text().strip())

    def save(self) -> Path:
        path = Path(self.job_dir) / "job.json"
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> JobSpec:
        return cls(**json.loads(Path(path).read_text()))


def new_secret_file(job_dir: Path) -> Path:
    path = job_dir / ".secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def spawn_module(
    module: str,
    args: list[str],
    *,
    log_path: Path,
    env: dict[str, str] | None = None,
    new_session: bool = False,
    stdin_pipe: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``python -m module args`` with output to a log file.

    ``new_session`` puts a node's tree in its own process group so that the
    injector can kill exactly that node, and a Ctrl-C on the console reaches
    only the controller, which then tears everything down in order.
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it after fork
    try:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
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
    alive = _signal_tree(pid, signal.SIGTERM, grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=grace_s)


def run_processes(run_id: str) -> list[psutil.Process]:
    """Every live process started for this run, orphans included (found by env)."""
    me = os.getpid()
    out = []
    for p in psutil.process_iter(["pid"]):
        if p.pid == me:
            continue
        try:
            if p.environ().get("GEMINI_RUN_ID") == run_id:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def wait_until(pred: Any, timeout_s: float, poll_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(poll_s)
    return bool(pred())
