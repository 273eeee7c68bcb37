"""The cluster interface: ``cluster.launcher`` picks an implementation, and
failures are carried out by their targets' own agents (``gemini.cluster.orders``)
on real processes.

Whole jobs that fail through the interface (software, hardware, root loss,
corruption) are in tests/test_recovery_e2e.py and tests/test_failure_kinds_e2e.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import STORE_SECRET
from omegaconf import OmegaConf

from gemini.cluster import keys
from gemini.cluster.agent import WorkerAgent
from gemini.cluster.base import Cluster, make_cluster
from gemini.cluster.job import JobSpec
from gemini.cluster.local import LocalCluster
from gemini.cluster.processes import spawn_module
from gemini.cluster.slurm import SlurmCluster, TaskEnv, check_tasks
from gemini.cluster.store import Store
from gemini.config import ConfigError, GeminiConfig

NODES, RANKS_PER_NODE = 2, 2


def job_for(store: Store, tmp_path: Path, launcher: str = "local") -> JobSpec:
    cfg = GeminiConfig()
    cfg.model.name = "gpt_tiny"
    cfg.cluster.launcher = launcher
    cfg.cluster.nodes = NODES
    cfg.cluster.ranks_per_node = RANKS_PER_NODE
    secret_file = tmp_path / ".secret"
    secret_file.write_text(STORE_SECRET.hex())
    return JobSpec(
        run_id="test",
        job_dir=str(tmp_path),
        store=store.address,
        secret_file=str(secret_file),
        config=OmegaConf.to_container(OmegaConf.structured(cfg)),  # type: ignore[arg-type]
    )


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Stand-ins for the job's processes: they only need to be killable."""
    procs = [
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        for _ in range(NODES * RANKS_PER_NODE)
    ]
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def test_the_local_cluster_is_a_cluster(signed_store: Store, tmp_path: Path) -> None:
    # The annotation is the structural check a type checker makes; isinstance
    # is the same check at run time (method names only).
    cluster: Cluster = LocalCluster(job_for(signed_store, tmp_path), signed_store)
    assert isinstance(cluster, Cluster)


def test_the_local_launcher_makes_a_local_cluster(signed_store: Store, tmp_path: Path) -> None:
    cluster = make_cluster(job_for(signed_store, tmp_path), signed_store)
    assert isinstance(cluster, LocalCluster)
    assert cluster.replaced == []


def test_an_unknown_launcher_is_refused_naming_the_key(signed_store: Store, tmp_path: Path) -> None:
    job = job_for(signed_store, tmp_path, launcher="carrier-pigeon")
    with pytest.raises(ConfigError) as e:
        make_cluster(job, signed_store)
    assert e.value.key == "cluster.launcher" and e.value.value == "carrier-pigeon"
    assert "local" in e.value.fix


def obey_while(agent: WorkerAgent, work: Callable[[], Any]) -> Any:
    """Run ``work`` (which sends an order and waits for its ack) on a thread while
    the agent's loop serves its inbox, as it does ten times a second in a job."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(work()))
    thread.start()
    while thread.is_alive():
        agent.obey_orders()
        time.sleep(0.01)
    return out[0]


def test_killing_trainers_is_carried_out_by_their_own_agent(
    signed_store: Store, sleepers: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    job = job_for(signed_store, tmp_path)
    cluster: Cluster = LocalCluster(job, signed_store)
    agent = WorkerAgent(job, 1)
    agent.gen = 1
    agent.trainers = {2: sleepers[2], 3: sleepers[3]}  # node 1's ranks
    signed_store.set_json(keys.GEN, 1)
    record = {"id": 0, "kind": "software", "what": "test"}
    t = obey_while(agent, lambda: cluster.kill_trainers([1], [1], record))
    assert sleepers[3].wait(timeout=10) == -9, "the named trainer survived"
    assert [p.poll() for p in sleepers[:3]] == [None] * 3, "another trainer was killed"
    # The record is stamped by the agent when the kill landed, and only once.
    injected = [rec for _, rec in signed_store.items(keys.INJECT)]
    assert injected == [{**record, "t": t}]


def test_hanging_trainers_stops_them_alive_and_a_stop_of_the_generation_still_ends_them(
    signed_store: Store, sleepers: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    job = job_for(signed_store, tmp_path)
    cluster: Cluster = LocalCluster(job, signed_store)
    agent = WorkerAgent(job, 1)
    agent.gen = 1
    agent.trainers = {2: sleepers[2], 3: sleepers[3]}  # node 1's ranks
    signed_store.set_json(keys.GEN, 1)
    record = {"id": 0, "kind": "hang", "what": "test"}
    t = obey_while(agent, lambda: cluster.hang_trainers([1], [1], record))
    hung = psutil.Process(sleepers[3].pid)
    deadline = time.monotonic() + 5
    while hung.status() != psutil.STATUS_STOPPED and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hung.status() == psutil.STATUS_STOPPED, "the named trainer was not stopped"
    assert psutil.Process(sleepers[2].pid).status() != psutil.STATUS_STOPPED
    assert [p.poll() for p in sleepers] == [None] * 4, "a hang must kill nothing"
    # Alive and stopped: its agent has no exit to report.
    agent.poll_trainers()
    assert not signed_store.exists(keys.exited(1, 3))
    injected = [rec for _, rec in signed_store.items(keys.INJECT)]
    assert injected == [{**record, "t": t}]
    # A stop of the generation (SIGTERM, then SIGKILL after the grace) ends the
    # stopped trainer within the grace: a pending SIGTERM alone would wait for it.
    t0 = time.monotonic()
    agent.stop_trainers()
    assert time.monotonic() - t0 < 1.5, "the stopped trainer outlived the SIGTERM"
    assert sleepers[3].poll() is not None and sleepers[2].poll() is not None
    assert signed_store.exists(keys.exited(1, 3))


def test_an_order_for_a_past_generation_kills_nothing(
    signed_store: Store, sleepers: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    job = job_for(signed_store, tmp_path)
    cluster: Cluster = LocalCluster(job, signed_store)
    agent = WorkerAgent(job, 0)
    agent.gen = 2  # restarted since the order was sent for generation 1
    agent.trainers = {0: sleepers[0], 1: sleepers[1]}
    signed_store.set_json(keys.GEN, 1)
    obey_while(agent, lambda: cluster.kill_trainers([0], [0, 1]))
    assert all(p.poll() is None for p in sleepers)


def test_an_order_is_carried_out_once_even_by_a_replacement_agent(
    signed_store: Store, sleepers: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    job = job_for(signed_store, tmp_path)
    cluster: Cluster = LocalCluster(job, signed_store)
    signed_store.set_json(keys.GEN, 1)
    first = WorkerAgent(job, 0)
    first.gen = 1
    first.trainers = {0: sleepers[0]}
    obey_while(first, lambda: cluster.kill_trainers([0], [0]))
    assert sleepers[0].wait(timeout=10) == -9
    second = WorkerAgent(job, 0)
    second.gen = 1
    second.trainers = {0: sleepers[1]}
    second.obey_orders()
    assert sleepers[1].poll() is None


def test_an_unsigned_order_is_ignored(
    signed_store: Store, sleepers: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    job = job_for(signed_store, tmp_path)
    agent = WorkerAgent(job, 0)
    agent.gen = 1
    agent.trainers = {0: sleepers[0]}
    queue = keys.node_orders(0)
    n = signed_store.incr(keys.queue_length(queue))
    forged = json.dumps({"op": "kill_trainers", "ranks": [0], "gen": 1})
    signed_store.raw.set(keys.queue_item(queue, n), forged)
    agent.obey_orders()
    assert sleepers[0].poll() is None


def test_a_hardware_failure_is_the_agent_killing_its_node_and_freeing_its_memory(
    signed_store: Store, tmp_path: Path
) -> None:
    from gemini.checkpoint.slot import SHM_DIR

    job = job_for(signed_store, tmp_path)
    job.run_id = f"t{os.getpid():x}"
    job.save()
    (tmp_path / "logs").mkdir(exist_ok=True)
    mine = SHM_DIR / f"gemini-{job.run_id}-n1-r2-local"
    other = SHM_DIR / f"gemini-{job.run_id}-n0-r0-local"
    for seg in (mine, other):
        seg.write_bytes(b"x")
    agent = spawn_module(
        "gemini.cluster.agent",
        ["--job", str(tmp_path / "job.json"), "--node", "1"],
        log_path=tmp_path / "agent1.log",
    )
    try:
        assert signed_store.wait_for(keys.agent(1), timeout_s=60)
        cluster: Cluster = LocalCluster(job, signed_store)
        t = cluster.kill_nodes([1], {"id": 0, "kind": "hardware"})
        assert agent.wait(timeout=10) == -9
        assert t is not None
        assert not mine.exists(), "the node's memory was not freed"
        assert other.exists(), "another node's memory was freed"
    finally:
        other.unlink(missing_ok=True)
        mine.unlink(missing_ok=True)
        if agent.poll() is None:
            agent.kill()


def test_a_root_loss_is_the_root_killing_itself(signed_store: Store, tmp_path: Path) -> None:
    # The root's inbox watcher, alone in a process of its own (it ends that process).
    job = job_for(signed_store, tmp_path)
    job.save()
    code = (
        "import sys, threading; from gemini.cluster.job import JobSpec; "
        "from gemini.cluster.root import obey_orders; "
        "obey_orders(JobSpec.load(sys.argv[1]), threading.Event())"
    )
    root = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "job.json")])
    try:
        cluster: Cluster = LocalCluster(job, signed_store)
        t = cluster.kill_root({"id": 0, "kind": "root_loss"})
        assert root.wait(timeout=30) == -9
        assert [rec for _, rec in signed_store.items(keys.INJECT)] == [
            {"id": 0, "kind": "root_loss", "t": t}
        ]
    finally:
        if root.poll() is None:
            root.kill()


def slurm_job(store: Store, tmp_path: Path, standby: int) -> tuple[JobSpec, TaskEnv]:
    job = job_for(store, tmp_path, launcher="slurm")
    job.config["cluster"]["standby_nodes"] = standby
    # This task's place in a SLURM job, as submitit's JobEnvironment would say it.
    task = TaskEnv(rank=0, ntasks=NODES + standby, nhosts=1, job_id="42", hostname="vm")
    return job, task


def test_a_failed_node_is_taken_over_by_a_standby_task(signed_store: Store, tmp_path: Path) -> None:
    job, task = slurm_job(signed_store, tmp_path, standby=1)
    cluster: Cluster = SlurmCluster(job, signed_store, task)
    cluster.replace_node(1)
    assert signed_store.get_json(keys.slurm_assign(2))["node"] == 1
    (takeover,) = cluster.layout()["takeovers"]
    assert takeover == {**takeover, "node": 1, "from_task": 1, "task": 2, "standby": True}


def test_with_no_standby_left_the_failed_node_restarts_in_its_own_task(
    signed_store: Store, tmp_path: Path
) -> None:
    job, task = slurm_job(signed_store, tmp_path, standby=1)
    cluster = SlurmCluster(job, signed_store, task)
    cluster.assign(1, 1)  # what start() asks of task 1
    cluster.replace_node(1)  # the standby, task 2, takes node 1 over
    cluster.replace_node(1)  # it fails too: no standby left
    assign = signed_store.get_json(keys.slurm_assign(2))
    assert assign["node"] == 1 and assign["n"] == 2, "task 2 was not told to start node 1 again"
    assert [t["standby"] for t in cluster.layout()["takeovers"]] == [True, False]
    assert signed_store.get_json(keys.slurm_assign(1))["n"] == 1


def test_a_slurm_job_needs_one_task_per_node_and_standby(
    signed_store: Store, tmp_path: Path
) -> None:
    job, task = slurm_job(signed_store, tmp_path, standby=1)
    check_tasks(job.cfg, task)
    with pytest.raises(ConfigError) as e:
        check_tasks(job.cfg, TaskEnv(0, NODES, 1, "42", "vm"))
    assert e.value.key == "cluster.nodes" and "needs 3 SLURM tasks" in e.value.fix


def test_outside_a_slurm_job_the_slurm_cluster_says_how_to_submit() -> None:
    with pytest.raises(ConfigError) as e:
        TaskEnv.current()
    assert e.value.key == "cluster.launcher" and "hydra/launcher=slurm" in e.value.fix
