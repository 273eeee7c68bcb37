"""A job on emulated links (``cluster.network=netns``): every node, standbys
included, in a namespace of its own behind a capped link. It trains as it does
on loopback (the same final state), recovers a lost node onto a standby, and
leaves no namespace, link or bridge behind. Needs root and iproute2 (skipped
with the reason elsewhere; CI runs it as root)."""

from __future__ import annotations

import json
import subprocess

import pytest
from test_netns import WHY_NOT
from test_recovery_e2e import AT_STEP, References, RunJob, job, only_recovery

from gemini.cluster.agent import FENCED_EXIT

pytestmark = [
    pytest.mark.skipif(bool(WHY_NOT), reason=f"netns unavailable: {WHY_NOT}"),
    pytest.mark.usefixtures("no_leftovers"),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> References:
    return References(tmp_path_factory.mktemp("reference"))


@pytest.mark.timeout(400)
def test_a_job_on_capped_links_recovers_a_lost_node_exactly_and_removes_its_network(
    reference: References, run_job: RunJob
) -> None:
    summary, job_dir = job(
        run_job,
        "cluster.network=netns",
        "cluster.link_gbps=1",
        "backend=replicated",
        "failure=hardware_once",
        f"failure.at_step={AT_STEP}",
        "failure.node=1",
    )
    # The network does not change the arithmetic: loopback is the reference.
    assert summary["state_digest"] == reference.digest()
    rec = only_recovery(summary, "hardware")
    assert rec["rank_sources"]["1"] == "peer:0"
    assert rec["rank_restart"]["1"] == "standby"
    # The store listened on the fabric's bridge (the benchmarking range) ...
    store = json.loads((job_dir / "job.json").read_text())["store"]
    assert store.startswith("198.18.") or store.startswith("198.19."), store
    # ... and the run's namespaces and links are gone with it.
    tag = summary["run_id"][:8]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "link", "show"], capture_output=True, text=True).stdout
    assert f"gemini-{tag}-" not in listed
    assert f"gb{tag}" not in links and f"gv{tag}" not in links


@pytest.mark.parametrize("heal_after_s", [0.0, 6.0], ids=["for_good", "link_returns"])
@pytest.mark.timeout(400)
def test_a_partitioned_node_is_replaced_fences_itself_and_stays_out(
    reference: References, run_job: RunJob, heal_after_s: float
) -> None:
    summary, job_dir = job(
        run_job,
        "cluster.network=netns",
        "backend=replicated",
        "failure=partition",
        f"failure.at_step={AT_STEP}",
        "failure.node=1",
        f"failure.partition_s={heal_after_s}",
        # A link this slow carries one of the cut-off node's replica puts
        # nearly all the time, so the cut leaves one open on the survivor's
        # holder: the recovery must end it, or the next generation's put of
        # that rank waits behind it for the io timeout (30 s) and its peer's
        # all-reduce gives up first: a second, spurious failure.
        "cluster.link_gbps=0.2",
        # How long the survivor's all-reduce with a peer that vanished without
        # a reset waits before it leaves the generation.
        "cluster.collective_timeout_s=10",
    )
    assert summary["state_digest"] == reference.digest()
    # To the root a cut-off node is a lost one: its index goes to a standby,
    # and its rank comes back from the survivor's copy; the next generation
    # then runs to the end (one recovery, no second failure).
    rec = only_recovery(summary, "hardware")
    assert rec["dead_nodes"] == [1]
    assert [i["kind"] for i in rec["injected"]] == ["partition"]
    assert rec["rank_sources"]["1"] == "peer:0"
    assert rec["rank_restart"]["1"] == "standby"
    # The cut-off node was not killed by anyone: it fenced itself (its agent
    # says so and exits with its own status), also when its link came back.
    (part,) = summary["cluster_layout"]["partitions"]
    assert part["node"] == 1 and part["exit_code"] == FENCED_EXIT, part
    if heal_after_s:
        assert part["t_heal"] is not None
    logs = "".join(p.read_text() for p in (job_dir / "logs").glob("agent1.log"))
    assert "node 1: fencing itself and staying out" in logs
    # Only the standby's agent ever registered for node 1 after the cut.
    assert summary["generations"] == 2
