"""Bad input is refused before anything starts: one line naming the key, the value and
what to do, exit status 2, no traceback, and nothing created or started.

Every case goes through ``gemini.cli.main`` (what the console script calls) with
its argv, in this process: composition, the schema, and ``validate`` with its dry
run of the cadence, the placement and the failure schedule, and its host checks.
A handful also go through the installed console script as a real process, which
must leave no outputs directory and no shared-memory segment behind.
"""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

import psutil
import pytest
from conftest import failure_free, free_port, run_cli

# A tracking server's address with nothing listening.
NO_SERVER = f"http://127.0.0.1:{free_port()}"

# (id, overrides, key, value): the refused line must name both.
CASES: list[tuple[str, list[str], str, str]] = [
    # -- unknown keys and options
    ("unknown key", ["foo.bar=1"], "foo.bar", "1"),
    ("misspelt key in a group", ["train.stepz=3"], "train.stepz", "3"),
    ("misspelt nested key", ["backend.replication.factr=2"], "backend.replication.factr", "2"),
    ("added key the schema lacks", ["+model.nope=1"], "model.nope", "1"),
    ("unknown model", ["model=nope"], "model", "nope"),
    ("unknown failure schedule", ["failure=meteor"], "failure", "meteor"),
    ("unknown option in a sweep", ["-m", "model=mlp,nope"], "model", "nope"),
    # -- wrong types
    ("nodes not a number", ["cluster.nodes=abc"], "cluster.nodes", "abc"),
    ("steps not an integer", ["train.steps=1.5"], "train.steps", "1.5"),
    ("learning rate not a number", ["train.lr=fast"], "train.lr", "fast"),
    ("flag not a bool", ["cluster.warm_spares=maybe"], "cluster.warm_spares", "maybe"),
    ("failure step not a number", ["failure.at_step=half"], "failure.at_step", "half"),
    # -- out of range
    ("no nodes", ["cluster.nodes=0"], "cluster.nodes", "0"),
    ("no ranks per node", ["cluster.ranks_per_node=0"], "cluster.ranks_per_node", "0"),
    ("zero heartbeat", ["cluster.heartbeat_s=0"], "cluster.heartbeat_s", "0"),
    ("unknown device", ["cluster.device=tpu"], "cluster.device", "tpu"),
    ("unknown launcher", ["cluster.launcher=carrier-pigeon"], "cluster.launcher",
     "carrier-pigeon"),
    ("more nodes than the host holds", ["cluster.nodes=64"], "cluster.nodes", "64"),
    ("negative standby nodes", ["cluster=slurm", "cluster.standby_nodes=-1"],
     "cluster.standby_nodes", "-1"),
    ("negative standby nodes locally", ["cluster.standby_nodes=-2"], "cluster.standby_nodes",
     "-2"),
    ("unknown restart", ["cluster.restart=reboot"], "cluster.restart", "reboot"),
    ("store port out of range", ["cluster.store_port=70000"], "cluster.store_port", "70000"),
    ("slurm cluster without a launcher", ["cluster=slurm"], "cluster", "slurm"),
    ("slurm cluster under a launcher of one task", ["-m", "hydra/launcher=basic",
     "cluster=slurm"], "cluster", "slurm"),
    ("no steps", ["train.steps=0"], "train.steps", "0"),
    ("zero learning rate", ["train.lr=0"], "train.lr", "0"),
    ("negative warm-up", ["train.warmup_steps=-1"], "train.warmup_steps", "-1"),
    ("unknown parallelism", ["train.parallel=pipeline"], "train.parallel", "pipeline"),
    ("no layers", ["model.n_layer=0"], "model.n_layer", "0"),
    ("heads not dividing the width", ["model.n_head=3"], "model.n_head", "3"),
    ("sequence longer than the block", ["train.seq_len=300"], "train.seq_len", "300"),
    ("checkpoint every 0 steps", ["backend=memory", "backend.every_n=0"], "backend.every_n", "0"),
    ("unknown cadence", ["backend=memory", "backend.cadence=sometimes"], "backend.cadence",
     "sometimes"),
    ("no overhead allowed", ["backend=disk", "backend.cadence=checkfreq",
     "backend.overhead_bound_pct=0"], "backend.overhead_bound_pct", "0"),
    ("negative MTBF for young_daly", ["backend=disk", "backend.cadence=young_daly",
     "backend.mtbf_s=-1"], "backend.mtbf_s", "-1"),
    ("keep no checkpoint", ["backend=disk", "backend.keep_last=0"], "backend.keep_last", "0"),
    ("negative persist period", ["backend=memory", "backend.persist_every_n=-2"],
     "backend.persist_every_n", "-2"),
    ("persist period in seconds and steps", ["backend=replicated", "backend.persist_every_s=5",
     "backend.persist_every_n=4"], "backend.persist_every_n", "4"),
    ("more replicas than nodes", ["backend=replicated", "backend.replication.factor=5"],
     "backend.replication.factor", "5"),
    ("unknown placement", ["backend=replicated", "backend.replication.placement=star"],
     "backend.replication.placement", "star"),
    ("unknown replication schedule", ["backend=replicated",
     "backend.replication.schedule=eager"], "backend.replication.schedule", "eager"),
    ("planned schedule without a profile", ["backend=replicated",
     "backend.replication.schedule=interleave", "backend.replication.profile_steps=0"],
     "backend.replication.profile_steps", "0"),
    ("planned schedule on a backend that sends no replicas", ["backend=memory",
     "backend.replication.schedule=interleave_nopipe"], "backend.replication.schedule",
     "interleave_nopipe"),
    ("failure on a node that does not exist", ["failure=hardware_once", "failure.node=9"],
     "failure.node", "9"),
    ("failure at the last step", ["failure=hardware_once", "train.steps=10",
     "failure.at_step=10"], "failure.at_step", "10"),
    ("no time between failures", ["failure=poisson", "failure.mtbf_s=0"], "failure.mtbf_s", "0"),
    ("zero Weibull shape", ["failure=weibull", "failure.weibull_shape=0"],
     "failure.weibull_shape", "0"),
    ("no failure events", ["failure=poisson", "failure.max_events=0"], "failure.max_events", "0"),
    ("more correlated nodes than nodes", ["failure=correlated", "failure.k=9"], "failure.k", "9"),
    ("killed rank not on the node", ["failure=software_once", "failure.rank_in_node=1"],
     "failure.rank_in_node", "1"),
    ("hung rank not on the node", ["failure=hang_once", "failure.rank_in_node=2"],
     "failure.rank_in_node", "2"),
    ("hang watchdog within one beat", ["cluster.heartbeat_s=0.5", "cluster.hang_timeout_s=0.5"],
     "cluster.hang_timeout_s", "0.5"),
    ("negative hang watchdog", ["cluster.hang_timeout_s=-1"], "cluster.hang_timeout_s", "-1"),
    ("unknown network", ["cluster.network=wifi"], "cluster.network", "wifi"),
    ("partition on loopback", ["failure=partition"], "failure.name", "partition"),
    ("negative partition", ["cluster.network=netns", "failure=partition",
     "failure.partition_s=-1"], "failure.partition_s", "-1.0"),
    ("link cap on loopback", ["cluster.link_gbps=2"], "cluster.link_gbps", "2.0"),
    ("negative link cap", ["cluster.network=netns", "cluster.link_gbps=-1"],
     "cluster.link_gbps", "-1.0"),
    ("emulated links on SLURM", ["cluster=slurm", "cluster.network=netns"], "cluster.network",
     "netns"),
    ("store address chosen with emulated links", ["cluster.network=netns",
     "cluster.host=127.0.0.2"], "cluster.host", "127.0.0.2"),
    # -- this host
    ("address of another machine", ["cluster.host=203.0.113.7"], "cluster.host", "203.0.113.7"),
    ("unwritable storage", ["backend=disk", "backend.path=/proc/gemini-nope"], "backend.path",
     "/proc/gemini-nope"),
    ("unwritable outputs", ["paths.outputs=/proc/nope"], "paths.outputs", "/proc/nope"),
    ("tracking server not answering", [f"tracking.uri={NO_SERVER}"], "tracking.uri", NO_SERVER),
    ("tracking server without a host", ["tracking.uri=http://:5000"], "tracking.uri",
     "http://:5000"),
    ("tracking server on no port", ["tracking.uri=https://127.0.0.1:99999"], "tracking.uri",
     "https://127.0.0.1:99999"),
    # -- impossible combinations
    ("kill during a snapshot on disk", ["failure=kill_during_snapshot", "backend=disk"],
     "backend.name", "disk"),
    ("kill during a snapshot without checkpoints", ["failure=kill_during_snapshot",
     "backend=none"], "backend.name", "none"),
    ("kill during a snapshot at Poisson times", ["backend=replicated", "failure=poisson",
     "failure.kind=kill_during_snapshot"], "failure.kind", "kill_during_snapshot"),
    ("kill during a snapshot at Weibull times", ["backend=memory", "failure=weibull",
     "failure.kind=kill_during_snapshot"], "failure.kind", "kill_during_snapshot"),
    ("kill during a snapshot on a rack", ["backend=replicated", "failure=correlated",
     "failure.kind=kill_during_snapshot"], "failure.kind", "kill_during_snapshot"),
    ("kill during a snapshot with an adaptive cadence", ["backend=memory",
     "backend.cadence=highfreq", "failure=kill_during_snapshot"], "backend.cadence", "highfreq"),
    ("kill during a snapshot after the last snapshot", ["backend=memory", "backend.every_n=7",
     "train.steps=10", "failure=kill_during_snapshot", "failure.at_step=8"],
     "failure.at_step", "8"),
    ("corruption without replicas", ["backend=memory", "failure=corruption"], "failure.name",
     "corruption"),
    ("corruption with one copy", ["backend=replicated", "backend.replication.factor=1",
     "failure=corruption"], "failure.name", "corruption"),
    ("corruption of a whole rack", ["backend=replicated", "failure=correlated",
     "failure.kind=corruption"], "failure.kind", "corruption"),
    ("root loss of a rack", ["backend=replicated", "failure=correlated",
     "failure.kind=root_loss"], "failure.kind", "root_loss"),
    ("hang with its watchdog off", ["failure=hang_once", "cluster.hang_timeout_s=0"],
     "failure.name", "hang_once"),
    ("hangs at Poisson times with the watchdog off", ["failure=poisson", "failure.kind=hang",
     "cluster.hang_timeout_s=0"], "failure.kind", "hang"),
    ("two in a group of one", ["backend=replicated", "backend.replication.factor=1",
     "failure=two_in_group"], "failure.name", "two_in_group"),
    ("bad value inside a sweep", ["-m", "cluster.nodes=2,0"], "cluster.nodes", "0"),
]  # fmt: skip

# Cases run through the installed console script as well, as a real process.
THROUGH_THE_SCRIPT = {
    "misspelt key in a group",
    "nodes not a number",
    "unknown cadence",
    "failure on a node that does not exist",
    "kill during a snapshot on disk",
    "kill during a snapshot at Poisson times",
    "address of another machine",
    "tracking server not answering",
}

# What a fix says: an instruction, not only a complaint.
FIX = re.compile(r"\b(use|choose|must|set|lower|check|fix|write|pick)\b")


def assert_refused(rc: int, out: str, err: str, key: str, value: str) -> None:
    assert rc == 2, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    line = lines[0]
    assert line.startswith("gemini: error: ")
    assert key in line, f"{key!r} not named in: {line}"
    assert value in line, f"{value!r} not named in: {line}"
    assert FIX.search(line.split(key, 1)[1]), f"no fix in: {line}"
    assert "Traceback" not in err and "Traceback" not in out


def _accepted(cfg: object) -> None:
    raise AssertionError("the config was accepted: a job would have started")


def assert_cli_refuses(
    args: list[str],
    key: str,
    value: str,
    outputs_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``gemini ARGS``, in this process, is refused in one line naming ``key`` and
    ``value``, with nothing created and no process started."""
    from gemini import cli

    monkeypatch.setattr(sys, "argv", ["gemini", *failure_free(args)])
    # Were validation to let the config through, no job may run from a test.
    monkeypatch.setattr(cli, "_task", _accepted)
    sigterm = signal.getsignal(signal.SIGTERM)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        with pytest.raises(SystemExit) as exited:
            cli.main()
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    got = capsys.readouterr()
    code = exited.value.code
    assert_refused(code if isinstance(code, int) else 1, got.out, got.err, key, value)
    assert not outputs_dir.exists(), "a refused run must not create its outputs directory"
    started = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not started, "a refused run started a process"


@pytest.mark.parametrize(
    ("args", "key", "value"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_refused_in_one_line_before_anything_exists(
    args: list[str],
    key: str,
    value: str,
    outputs_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert_cli_refuses(args, key, value, outputs_dir, monkeypatch, capsys)


def test_there_are_at_least_thirty_cases_and_every_kind_of_mistake() -> None:
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)
    assert len(THROUGH_THE_SCRIPT) >= 5
    assert THROUGH_THE_SCRIPT.issubset(c[0] for c in CASES)


SCRIPT_CASES = [c for c in CASES if c[0] in THROUGH_THE_SCRIPT]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "key", "value"), [c[1:] for c in SCRIPT_CASES], ids=[c[0] for c in SCRIPT_CASES]
)
def test_the_console_script_refuses_bad_input_and_leaves_nothing(
    args: list[str], key: str, value: str, tmp_path: Path
) -> None:
    cwd, outputs, shm = tmp_path / "cwd", tmp_path / "outputs", tmp_path / "shm"
    cwd.mkdir()
    shm.mkdir()
    rc, out, err = run_cli(
        args, cwd, outputs=outputs, timeout_s=50, env={"GEMINI_SHM_DIR": str(shm)}
    )
    assert_refused(rc, out, err, key, value)
    assert not outputs.exists(), "a refused run must not create its outputs directory"
    assert list(shm.iterdir()) == [], "a refused run left a shared-memory segment"
    assert list(cwd.iterdir()) == [], "nothing may be written to the working directory"
