"""The cluster interface: ``cluster.launcher`` picks an implementation, and the
local one does what the interface promises to real processes.

Whole jobs that fail through the interface (software, hardware, root loss,
corruption) are in tests/test_recovery_e2e.py and tests/test_failure_kinds_e2e.py.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import STORE_SECRET
from omegaconf import OmegaConf

from gemini.cluster import keys
from gemini.cluster.base import Cluster, make_cluster
from gemini.cluster.job import JobSpec
from gemini.cluster.local import LocalCluster
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


def test_killing_trainers_kills_only_those_ranks_of_that_node_in_the_current_generation(
    signed_store: Store, sleepers: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    cluster: Cluster = LocalCluster(job_for(signed_store, tmp_path), signed_store)
    # Generation 1's trainers are up; generation 0's records are stale PIDs
    # that must not be signalled (here: the rank that is to survive).
    signed_store.set_json(keys.GEN, 1)
    for rank, p in enumerate(sleepers):
        signed_store.set_json(keys.trainer(1, rank), {"pid": p.pid, "node": rank // 2})
    signed_store.set_json(keys.trainer(0, 3), {"pid": sleepers[2].pid, "node": 1})
    cluster.kill_trainers(1, [1])
    assert sleepers[3].wait(timeout=10) == -9, "the named trainer survived"
    assert [p.poll() for p in sleepers[:3]] == [None] * 3, "another trainer was killed"


def test_killing_a_trainer_that_is_not_up_is_skipped(
    signed_store: Store, sleepers: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    cluster: Cluster = LocalCluster(job_for(signed_store, tmp_path), signed_store)
    cluster.kill_trainers(0, [0, 1])
    assert all(p.poll() is None for p in sleepers)


def test_killing_the_root_kills_the_process_the_store_names_as_root(
    signed_store: Store, sleepers: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    # After an election the root is not a process the cluster started: only
    # the store knows which one it is.
    cluster: Cluster = LocalCluster(job_for(signed_store, tmp_path), signed_store)
    signed_store.set_json(keys.ROOT_PID, {"pid": sleepers[1].pid})
    cluster.kill_root()
    assert sleepers[1].wait(timeout=10) == -9
    assert all(p.poll() is None for i, p in enumerate(sleepers) if i != 1)
