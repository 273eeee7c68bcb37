"""The KV store as a control plane: signed values, refused forgeries, one listening address.

Real TCPStores on loopback: a master ``Store`` as the controller hosts it, and
a bare ``torch.distributed.TCPStore`` client playing someone who reached the
port without the run's secret.
"""

from __future__ import annotations

import json
import secrets
from datetime import timedelta

import psutil
import pytest
import torch.distributed as dist
from conftest import STORE_SECRET

from gemini.cluster import keys
from gemini.cluster.store import Store, sign, verify


@pytest.fixture
def store(signed_store: Store) -> Store:
    return signed_store


def intruder(store: Store) -> dist.TCPStore:
    """A client that knows the address but not the secret."""
    return dist.TCPStore(store.host, store.port, is_master=False, timeout=timedelta(seconds=10))


def test_a_signed_value_round_trips_and_is_stored_with_its_mac(store: Store) -> None:
    plan = {"start_step": 6, "sources": {"0": {"kind": "local", "node": 0}}}
    store.set_json(keys.plan(2), plan)
    assert store.get_json(keys.plan(2)) == plan
    raw = bytes(store.raw.get(keys.plan(2)))
    mac, _, payload = raw.partition(b".")
    assert len(mac) == 64 and json.loads(payload) == plan
    # Another client of the same run (another process: its own connection) agrees.
    other = Store.from_address(store.address, STORE_SECRET)
    assert other.get_json(keys.plan(2)) == plan
    assert other.exists(keys.plan(2))


def test_flags_progress_and_metric_lines_are_signed_too(store: Store) -> None:
    store.set(keys.ABORT, "1")
    store.set(keys.progress(0), "17")
    store.append(keys.metrics(0), '{"step": 1}\n{"step": 2}\n')
    assert verify(STORE_SECRET, keys.ABORT, bytes(store.raw.get(keys.ABORT))) == b"1"
    assert store.exists(keys.ABORT)
    assert store.get_int(keys.progress(0)) == 17
    assert store.read_lines(keys.metrics(0)) == [{"step": 1}, {"step": 2}]


def test_forged_values_are_absent_to_readers_with_one_log_line_per_key(
    store: Store, capfd: pytest.CaptureFixture[str]
) -> None:
    bad = intruder(store)
    # Unsigned, signed under another secret, and a real signature moved to another key.
    bad.set(keys.ABORT, "1")
    bad.set(keys.plan(3), sign(secrets.token_bytes(32), keys.plan(3), b'{"start_step": 0}'))
    store.set_json(keys.final(1, 0), {"digest": "a" * 64, "step": 12})
    bad.set(keys.final(1, 1), store.raw.get(keys.final(1, 0)))
    for _ in range(3):  # readers poll: still one line per key
        assert not store.exists(keys.ABORT)
        assert store.get_json_or(keys.plan(3), "absent") == "absent"
        assert store.get_json_or(keys.final(1, 1)) is None
        assert not store.wait_for(keys.final(1, 1), timeout_s=0.05)
    with pytest.raises(KeyError, match="ctl/plan/3"):
        store.get_json(keys.plan(3))
    assert store.get_json(keys.final(1, 0))["step"] == 12  # the real one still reads
    err = capfd.readouterr().err.splitlines()
    refused = [line for line in err if line.startswith("[store]")]
    assert sorted(refused) == [
        "[store] ctl/abort: refused: unsigned",
        "[store] ctl/plan/3: refused: bad signature",
        "[store] final/1/1: refused: bad signature",
    ]


def test_forged_queue_records_and_metric_lines_are_skipped(store: Store) -> None:
    bad = intruder(store)
    store.push(keys.SPAWN, {"node": 1})
    n = int(bad.add(keys.queue_length(keys.SPAWN), 1))
    bad.set(keys.queue_item(keys.SPAWN, n), json.dumps({"node": 0}))
    store.push(keys.SPAWN, {"node": 2})
    assert store.items(keys.SPAWN) == [(1, {"node": 1}), (3, {"node": 2})]
    store.append_json(keys.metrics(1), {"step": 1})
    bad.append(keys.metrics(1), '{"step": 99}\n')
    store.append_json(keys.metrics(1), {"step": 2})
    assert store.read_lines(keys.metrics(1)) == [{"step": 1}, {"step": 2}]


def test_counters_stay_unsigned_and_a_signed_key_is_no_counter(store: Store) -> None:
    assert store.counter(keys.HB_ROOT) == 0
    assert store.incr(keys.HB_ROOT) == 1
    assert not keys.is_signed(keys.HB_ROOT)
    with pytest.raises(ValueError, match="signed"):
        store.incr(keys.GEN)


def listening(port: int) -> list[str]:
    return [
        c.laddr.ip
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2"])
def test_the_store_listens_on_the_cluster_host_only(host: str) -> None:
    s = Store(host, 0, STORE_SECRET, timeout_s=5.0, master=True)
    try:
        assert listening(s.port) == [host]
        client = Store.from_address(s.address, STORE_SECRET, timeout_s=5.0)
        client.set_json(keys.ROOT_STATE, {"gen": 1})
        assert s.get_json(keys.ROOT_STATE) == {"gen": 1}
    finally:
        s.raw = None  # type: ignore[assignment]
    assert listening(s.port) == []
