"""Every failure kind lands as configured, or the run is refused before it starts.

Fast checks of the injector against a real KV store and real processes (a
several-node software failure must kill a rank on every node it names), and of
``validate`` on the combinations that used to inject nothing or crash-loop. The
end-to-end exactness of each kind is in tests/test_failure_kinds_e2e.py.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import STORE_SECRET
from omegaconf import OmegaConf

from gemini.cluster import keys
from gemini.cluster.agent import WorkerAgent
from gemini.cluster.job import JobSpec
from gemini.cluster.local import LocalCluster
from gemini.cluster.store import Store
from gemini.config import ConfigError, GeminiConfig, validate
from gemini.failures import Injector, schedule_for


def config(**failure: object) -> GeminiConfig:
    cfg = GeminiConfig()
    cfg.model.name = "gpt_tiny"
    cfg.cluster.nodes = 4
    cfg.train.steps = 20
    cfg.backend.name = "replicated"
    for k, v in failure.items():
        setattr(cfg.failure, k, v)
    return cfg


@pytest.fixture
def store(signed_store: Store) -> Store:
    return signed_store


@pytest.fixture
def trainers() -> Iterator[list[subprocess.Popen[bytes]]]:
    """One stand-in trainer process per node (they only need to be killable)."""
    procs = [
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(4)
    ]
    yield procs
    for p in procs:
        p.kill()
        p.wait()


@contextlib.contextmanager
def agents_serving(injector: Injector, procs: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    """Each node's worker agent, serving its orders as its loop does in a job, with
    its node's stand-in trainer as generation 0's rank: a failure is an order the
    agent carries out (gemini.cluster.orders), not a signal the injector sends."""
    agents = []
    for node, p in enumerate(procs):
        agent = WorkerAgent(injector.job, node)
        agent.trainers = {node: p}
        agents.append(agent)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            for agent in agents:
                agent.obey_orders()
            time.sleep(0.01)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def injector_for(cfg: GeminiConfig, store: Store, tmp_path: Path) -> Injector:
    secret_file = tmp_path / ".secret"
    secret_file.write_text(STORE_SECRET.hex())
    job = JobSpec(
        run_id="test",
        job_dir=str(tmp_path),
        store=store.address,
        secret_file=str(secret_file),
        config=OmegaConf.to_container(OmegaConf.structured(cfg)),  # type: ignore[arg-type]
    )
    # Software failures kill trainers alone: the cluster is never started, so
    # no node launcher is involved (the agents are served by agents_serving).
    return Injector(job, store, LocalCluster(job, store))


def announce(store: Store, procs: list[subprocess.Popen[bytes]], step: int) -> None:
    """What generation 0's trainers write when they start, and their progress."""
    for rank, p in enumerate(procs):
        store.set_json(keys.trainer(0, rank), {"pid": p.pid, "node": rank})
        store.set(keys.progress(rank), str(step))


@pytest.mark.parametrize(
    "failure",
    [
        {"name": "correlated", "kind": "software", "k": 2, "node": 1, "at_step": 5},
        {"name": "two_in_group", "kind": "software", "at_step": 5},
    ],
    ids=["correlated", "two_in_group"],
)
def test_a_software_failure_of_several_nodes_kills_a_rank_on_each(
    failure: dict[str, object],
    store: Store,
    trainers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    cfg = config(**failure)
    validate(cfg)
    (event,) = schedule_for(cfg)
    assert event.kind == "software" and len(event.nodes) == 2
    injector = injector_for(cfg, store, tmp_path)
    announce(store, trainers, step=4)
    with agents_serving(injector, trainers):
        injector.tick()
        assert injector.fired == [], "fired before its step"
        announce(store, trainers, step=5)
        injector.tick()
    assert [f["nodes"] for f in injector.fired] == [list(event.nodes)]
    for rank, p in enumerate(trainers):
        if rank in event.nodes:
            assert p.wait(timeout=10) == -9, f"rank {rank} of a failed node survived"
        else:
            assert p.poll() is None, f"rank {rank} of a healthy node was killed"


def test_a_software_failure_due_during_a_restart_lands_on_the_next_generation(
    store: Store, trainers: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    cfg = config(name="software_once", node=2, at_step=5)
    injector = injector_for(cfg, store, tmp_path)
    for rank in range(4):
        store.set(keys.progress(rank), "6")
    with agents_serving(injector, trainers):
        injector.tick()  # due, but no trainer of the generation has started yet
        assert injector.fired == [] and len(injector.pending) == 1
        announce(store, trainers, step=6)
        injector.tick()
    assert len(injector.fired) == 1 and injector.pending == []
    assert trainers[2].wait(timeout=10) == -9


def test_a_kill_during_a_snapshot_is_armed_at_its_step_in_one_trainer(
    store: Store, tmp_path: Path
) -> None:
    cfg = config(name="kill_during_snapshot", node=3, at_step=7)
    injector_for(cfg, store, tmp_path)
    arm = store.get_json(keys.inject_arm(3))
    assert arm["step"] == 7 and arm["kind"] == "kill_during_snapshot"
    assert not any(store.exists(keys.inject_arm(r)) for r in range(3))


def test_a_kill_during_a_snapshot_lands_in_the_next_snapshot_of_a_sparser_cadence() -> None:
    cfg = config(name="kill_during_snapshot", node=0, at_step=7)
    cfg.backend.every_n = 4
    cfg.train.steps = 18
    validate(cfg)  # snapshot at step 8 is the one interrupted
    cfg.failure.at_step = 17  # the last snapshot is step 16
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert info.value.key == "failure.at_step" and "<= 16" in info.value.fix


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"backend.name": "disk"}, "backend.name"),
        ({"backend.name": "none"}, "backend.name"),
        ({"backend.cadence": "checkfreq"}, "backend.cadence"),
        ({"failure.name": "poisson", "failure.kind": "kill_during_snapshot"}, "failure.kind"),
        ({"failure.name": "weibull", "failure.kind": "kill_during_snapshot"}, "failure.kind"),
        ({"failure.name": "correlated", "failure.kind": "kill_during_snapshot"}, "failure.kind"),
        ({"failure.name": "corruption", "backend.name": "memory"}, "failure.name"),
        ({"failure.name": "two_in_group", "failure.kind": "corruption"}, "failure.kind"),
    ],
)
def test_a_failure_that_would_inject_nothing_or_crash_loop_is_refused(
    changes: dict[str, str], key: str
) -> None:
    cfg = config(name="kill_during_snapshot", node=0, at_step=5)
    validate(cfg)
    for path, value in changes.items():
        group, name = path.split(".")
        setattr(getattr(cfg, group), name, value)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert info.value.key == key
    assert "\n" not in str(info.value) and info.value.fix


def test_a_hang_stops_the_chosen_trainer_and_kills_nothing(
    store: Store, trainers: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    cfg = config(name="hang_once", node=2, at_step=5)
    validate(cfg)
    injector = injector_for(cfg, store, tmp_path)
    announce(store, trainers, step=5)
    with agents_serving(injector, trainers):
        injector.tick()
    assert [(f["kind"], f["nodes"]) for f in injector.fired] == [("hang", [2])]
    assert "unacknowledged" not in injector.fired[0]
    hung = psutil.Process(trainers[2].pid)
    deadline = time.monotonic() + 5  # a signal lands when the target is next scheduled
    while hung.status() != psutil.STATUS_STOPPED and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hung.status() == psutil.STATUS_STOPPED
    assert [p.poll() for p in trainers] == [None] * 4, "a hang kills nothing"
