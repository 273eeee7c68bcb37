"""Soak: many randomly drawn failure schedules, each checked for exactness and leftovers.

Each run draws, from its own seed, a failure (kind, step, node), a backend,
a placement and a replication factor, and a cluster size; runs it through
the real console script (``python -m gemini.cli``) on a small model in a
temporary outputs directory; and checks that

* it completed with the state digest of the failure-free run of the same
  workload (one reference per distinct workload, run once and cached; the
  backend does not change the digest, so the reference is ``backend=none``);
* it left nothing behind: no process of the run (found by its
  ``GEMINI_RUN_ID``, orphans included) and no child of this script, no
  ``/dev/shm/gemini-<run id>*`` segment, no stale file in its job directory
  (the run secret, a temporary checkpoint file).

A combination the configuration check refuses (exit status 2, one line)
counts as *refused*, not as a failure; the draw avoids the combinations known
to be unsupported. The table at the end gives runs, refused, recoveries,
exact and leaked, then the seed of every run that failed a check::

    .venv/bin/python -m benchmarks.soak --runs 100 --seed 1      # make soak
    .venv/bin/python -m benchmarks.soak --replay 2861903957      # one run again, by its seed

Exit status: 0 when every run that was not refused ended exact and clean.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

try:
    from benchmarks.checkpoint import machine, markdown
except ModuleNotFoundError:  # run as a script: siblings are top level
    from checkpoint import machine, markdown  # type: ignore[no-redef]
from gemini.checkpoint.slot import list_segments
from gemini.cluster.processes import kill_tree, run_processes

MODEL = "mlp"
STEPS = 12
FAST_DETECTION = ("cluster.heartbeat_s=0.5", "cluster.missed_beats=4")
KINDS = (
    "software_once",
    "hardware_once",
    "correlated",
    "two_in_group",
    "corruption",
    "kill_during_snapshot",
    "root_loss",
)
STALE_PATTERNS = (".secret", "*.tmp", ".write-probe-*")
"""Files a finished job must not leave in its job directory."""


@dataclass
class Draw:
    """One run's configuration, a pure function of its seed."""

    seed: int
    nodes: int
    overrides: list[str]

    @property
    def workload(self) -> tuple[str, ...]:
        """What the failure-free reference must share with the run."""
        return (f"model={MODEL}", f"cluster.nodes={self.nodes}", f"train.steps={STEPS}")


def draw(seed: int, max_nodes: int = 4) -> Draw:
    """A failure schedule and a layout the configuration check accepts."""
    rng = random.Random(seed)
    kind = rng.choice(KINDS)
    nodes = rng.randint(2, max(2, max_nodes))
    # Kinds that need a peer's copy (or a whole group to lose) need replicas.
    if kind in ("corruption", "two_in_group"):
        backend = "replicated"
    elif kind == "kill_during_snapshot":
        backend = rng.choice(("memory", "replicated"))
    else:
        backend = rng.choice(("disk", "memory", "replicated"))
    over = [f"failure={kind}", f"failure.at_step={rng.randint(3, STEPS - 3)}"]
    over.append(f"failure.node={rng.randrange(nodes)}")
    if kind == "correlated":
        over.append(f"failure.k={rng.randint(2, nodes)}")
    over.append(f"backend={backend}")
    if backend == "replicated":
        m = rng.randint(2, min(3, nodes))
        if kind == "two_in_group":
            m = 2  # two failures of one group leave no copy only with m=2
        placement = rng.choice(("group", "mixed", "ring"))
        if placement == "group" and nodes % m:
            placement = "mixed"  # Algorithm 1's group layout needs m | N
        over += [f"backend.replication.factor={m}", f"backend.replication.placement={placement}"]
    # Sometimes a persistent tier, so that losing every copy falls back to storage.
    persist = rng.random() < 0.5
    if persist and backend in ("memory", "replicated") and kind != "kill_during_snapshot":
        over.append("backend.persist_every_s=1.0")
    if backend == "disk":
        over += ["backend.cadence=every_n", f"backend.every_n={rng.randint(1, 3)}"]
    return Draw(seed, nodes, over)


@dataclass
class Outcome:
    seed: int
    overrides: list[str]
    status: str = ""
    """exact | refused | not exact | failed"""
    recoveries: int = 0
    leaks: list[str] = field(default_factory=list)
    detail: str = ""


def _job_dir(outputs: Path) -> Path | None:
    found = sorted(outputs.glob("runs/*/summary.json"))
    return found[-1].parent if found else None


def run_cli(overrides: list[str], outputs: Path, timeout_s: float) -> tuple[int, str, Path | None]:
    """One job through the console script; (exit status, stderr tail, job dir)."""
    cmd = [sys.executable, "-m", "gemini.cli", *overrides, "tracking=off", "progress=false"]
    env = {**os.environ, "GEMINI_OUTPUTS": str(outputs), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        _, err = proc.communicate()
        return 124, f"timed out after {timeout_s:.0f} s", _job_dir(outputs)
    return proc.returncode, (err or "").strip()[-600:], _job_dir(outputs)


def leftovers(run_id: str | None, job_dir: Path | None) -> list[str]:
    """Everything the run left behind: processes, shared memory, stale files."""
    out: list[str] = []
    # Let the last processes of a torn-down job finish exiting.
    deadline = time.monotonic() + 5.0
    while True:
        procs = run_processes(run_id) if run_id else []
        children = psutil.Process().children(recursive=True)
        if (not procs and not children) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    out += [f"process {p.pid} of the run" for p in procs]
    out += [f"child process {p.pid}" for p in children]
    if run_id:
        out += [f"/dev/shm/{name}" for name in list_segments(f"gemini-{run_id}")]
    if job_dir is not None:
        for pattern in STALE_PATTERNS:
            out += [f"stale file {p}" for p in job_dir.rglob(pattern)]
    return out


class References:
    """Failure-free digests, one per workload, run once."""

    def __init__(self, base: Path, timeout_s: float) -> None:
        self.base, self.timeout_s = base, timeout_s
        self.digests: dict[tuple[str, ...], str | None] = {}

    def digest(self, workload: tuple[str, ...]) -> str | None:
        if workload not in self.digests:
            outputs = self.base / f"reference-{len(self.digests)}"
            overrides = [*workload, "backend=none", "failure=none"]
            rc, err, job_dir = run_cli(overrides, outputs, self.timeout_s)
            summary = _summary(job_dir)
            if rc != 0 or summary is None:
                raise RuntimeError(f"reference {' '.join(overrides)} failed (exit {rc}): {err}")
            self.digests[workload] = summary.get("state_digest")
        return self.digests[workload]


def _summary(job_dir: Path | None) -> dict[str, Any] | None:
    if job_dir is None or not (job_dir / "summary.json").is_file():
        return None
    data: dict[str, Any] = json.loads((job_dir / "summary.json").read_text())
    return data


def soak_one(d: Draw, base: Path, refs: References, timeout_s: float) -> Outcome:
    overrides = [*d.workload, *FAST_DETECTION, *d.overrides]
    out = Outcome(d.seed, overrides)
    outputs = base / f"run-{d.seed}"
    rc, err, job_dir = run_cli(overrides, outputs, timeout_s)
    summary = _summary(job_dir)
    run_id = summary.get("run_id") if summary else None
    out.leaks = leftovers(run_id, job_dir)
    if rc == 2:
        out.status, out.detail = "refused", err.splitlines()[-1] if err else ""
        if outputs.exists() and any(outputs.iterdir()):
            out.leaks.append(f"a refused run created {outputs}")
        return out
    if rc != 0 or summary is None:
        out.status, out.detail = "failed", f"exit {rc}: {err.splitlines()[-1] if err else ''}"
        return out
    out.recoveries = len(summary.get("recoveries") or [])
    reference = refs.digest(d.workload)
    if summary.get("state_digest") == reference and reference is not None:
        out.status = "exact"
    else:
        out.status = "not exact"
        out.detail = f"digest {str(summary.get('state_digest'))[:12]} vs {str(reference)[:12]}"
    return out


def table(outcomes: list[Outcome]) -> str:
    ran = [o for o in outcomes if o.status != "refused"]
    row = [
        str(len(outcomes)),
        str(sum(o.status == "refused" for o in outcomes)),
        str(sum(o.recoveries for o in outcomes)),
        f"{sum(o.status == 'exact' for o in ran)} / {len(ran)}",
        str(sum(o.status == "not exact" for o in ran)),
        str(sum(o.status == "failed" for o in ran)),
        str(sum(bool(o.leaks) for o in outcomes)),
    ]
    return markdown(
        ["runs", "refused", "recoveries", "exact", "not exact", "failed", "leaked"], [row]
    )


def run_seeds(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.getrandbits(32) for _ in range(n)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=10, help="how many schedules to draw")
    ap.add_argument("--seed", type=int, default=0, help="seed of the draw of run seeds")
    ap.add_argument("--replay", type=int, action="append", help="run only this run seed again")
    ap.add_argument("--max-nodes", type=int, default=4, help="largest cluster drawn (>= 2)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per job")
    ap.add_argument("--dir", default=None, help="scratch dir for the jobs' outputs")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="start no new run after this many seconds (0 = no limit); the table\n"
        "then counts the runs done, and says how many of those asked for",
    )
    a = ap.parse_args(argv)
    seeds = a.replay or run_seeds(a.runs, a.seed)
    command = " ".join(["python -m benchmarks.soak", *(argv if argv is not None else sys.argv[1:])])
    print(f"machine: {machine()}")
    print(f"command: {command}", flush=True)
    outcomes: list[Outcome] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gemini-soak-", dir=a.dir) as tmp:
        refs = References(Path(tmp), a.timeout)
        for i, s in enumerate(seeds, 1):
            if a.budget_s > 0 and time.perf_counter() - t0 > a.budget_s:
                print(f"budget of {a.budget_s:.0f} s spent: {i - 1} of {len(seeds)} runs done")
                break
            d = draw(s, a.max_nodes)
            o = soak_one(d, Path(tmp), refs, a.timeout)
            outcomes.append(o)
            flag = "" if o.status in ("exact", "refused") and not o.leaks else "  <-- FAILED"
            print(
                f"[{i}/{len(seeds)}] seed {s}: {o.status}, {o.recoveries} recoveries"
                f"{', leaked ' + '; '.join(o.leaks) if o.leaks else ''}"
                f"{' (' + o.detail + ')' if o.detail else ''}{flag}\n"
                f"    {' '.join(d.overrides)} cluster.nodes={d.nodes}",
                flush=True,
            )
    bad = [o for o in outcomes if o.status not in ("exact", "refused") or o.leaks]
    print(
        f"\nsoak of {len(outcomes)} runs (of {len(seeds)} asked for) "
        f"in {time.perf_counter() - t0:.0f} s\n"
    )
    print(table(outcomes))
    if bad:
        print("\nfailed runs (replay each with `python -m benchmarks.soak --replay SEED`):")
        for o in bad:
            print(f"  seed {o.seed}: {o.status} {o.detail} {'; '.join(o.leaks)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
