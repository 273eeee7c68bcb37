"""Two-slot shared-memory checkpoints: cross-process use, alternation, crash safety, teardown."""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator

import pytest
import torch

from gemini.checkpoint import format as fmt
from gemini.checkpoint import slot as sl


def make_state(step: int) -> dict[str, torch.Tensor]:
    """A deterministic state that differs per step (rebuilt identically in child processes)."""
    g = torch.Generator().manual_seed(step)
    return {
        "w": torch.randn(128, 256, generator=g),
        "b": torch.randn(256, generator=g).to(torch.bfloat16),
        "step": torch.tensor(step, dtype=torch.int64),
        "mask": torch.arange(300) % (step + 2) == 0,
    }


_NBYTES = fmt.layout(make_state(0))[1]
_CHUNK = 16 << 10  # small chunks so corruption tests point at one chunk


def write_step(ss: sl.SlotSet, step: int) -> int:
    state = make_state(step)
    entries, nbytes = fmt.layout(state)
    idx = ss.begin_write(step, nbytes)
    fmt.write_state(state, entries, ss.data_tensor(idx))
    manifest = fmt.make_manifest(
        state,
        step=step,
        rank=3,
        world_size=4,
        config_hash="cfg",
        extra={"data_position": step * 10},
        buf=ss.data_view(idx),
        chunk_bytes=_CHUNK,
    )
    ss.commit(idx, manifest)
    return idx


def assert_state_is_step(ss: sl.SlotSet, idx: int, step: int) -> None:
    manifest, state = ss.read_state(idx)
    assert manifest.step == step and manifest.extra == {"data_position": step * 10}
    expected = make_state(step)
    assert list(state) == list(expected)
    for k, v in expected.items():
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), k


# Child processes run this prelude: the same helpers, from this file's source.
_PRELUDE = "\n".join(
    [
        "import os, sys, time, torch",
        "from gemini.checkpoint import format as fmt",
        "from gemini.checkpoint import slot as sl",
        f"_CHUNK = {_CHUNK}",
        inspect.getsource(make_state),
        inspect.getsource(write_step),
    ]
)


def child(body: str, *args: str) -> subprocess.Popen[str]:
    code = _PRELUDE + "\n" + textwrap.dedent(body)
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)


@pytest.fixture
def prefix() -> Iterator[str]:
    p = f"gemini-test-{os.getpid()}-{uuid.uuid4().hex[:8]}-"
    yield p
    sl.unlink_prefix(p)
    assert sl.list_segments(p) == []


@pytest.fixture
def slots(prefix: str) -> Iterator[sl.SlotSet]:
    cap = sl.manifest_capacity_for(8, _NBYTES, _CHUNK)
    with sl.SlotSet.create(prefix + "r3", _NBYTES + 4096, cap) as ss:
        yield ss


def test_writer_in_another_process_is_read_back_bitwise(slots: sl.SlotSet) -> None:
    p = child(
        """
        with sl.SlotSet.open(sys.argv[1], populate=True) as ss:
            write_step(ss, 5)
        """,
        slots.name,
    )
    assert p.wait(timeout=60) == 0
    assert slots.complete_steps() == [(5, 0)]
    slots.verify(0)
    assert_state_is_step(slots, 0, 5)


def test_process_that_only_opened_the_segment_does_not_unlink_it(slots: sl.SlotSet) -> None:
    write_step(slots, 1)
    p = child("sl.SlotSet.open(sys.argv[1]).close()", slots.name)
    assert p.wait(timeout=60) == 0
    assert slots.name in sl.list_segments(slots.name)
    with sl.SlotSet.open(slots.name) as again:
        assert again.newest_complete() == (1, 0)
        again.verify(0)


def test_sigkill_mid_write_leaves_previous_slot_complete_and_verifiable(
    slots: sl.SlotSet,
) -> None:
    p = child(
        """
        ss = sl.SlotSet.open(sys.argv[1], populate=True)
        write_step(ss, 1)
        idx = ss.begin_write(2)
        data = ss.data_tensor(idx)
        data[: data.numel() // 2].fill_(0xAB)
        print(idx, flush=True)
        time.sleep(60)
        """,
        slots.name,
    )
    assert p.stdout is not None
    writing = int(p.stdout.readline())
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=30) == -signal.SIGKILL

    assert slots.name in sl.list_segments(slots.name)  # no resource_tracker cleanup
    done = 1 - writing
    assert slots.complete_steps() == [(1, done)]
    assert slots.header(writing).state == sl.WRITING
    with pytest.raises(sl.SlotError, match="WRITING"):
        slots.read_manifest(writing)
    slots.verify(done)
    assert_state_is_step(slots, done, 1)
    # The next writer reuses the half-written slot, never the complete one.
    assert slots.begin_write(2) == writing


def test_alternation_keeps_previous_complete_step(slots: sl.SlotSet) -> None:
    assert slots.newest_complete() is None
    first = write_step(slots, 1)
    second = write_step(slots, 2)
    assert second == 1 - first
    assert slots.complete_steps() == [(2, second), (1, first)]
    third = write_step(slots, 3)
    assert third == first
    assert slots.complete_steps() == [(3, third), (2, second)]
    # Beginning step 4 invalidates the older slot only.
    idx = slots.begin_write(4)
    assert idx == second
    assert slots.complete_steps() == [(3, third)]
    assert_state_is_step(slots, third, 3)


def test_rollback_invalidates_newer_steps_so_the_restored_slot_survives(
    slots: sl.SlotSet,
) -> None:
    old = write_step(slots, 10)
    write_step(slots, 11)
    assert slots.invalidate_newer_than(10) == [1 - old]
    assert slots.begin_write(11) == 1 - old
    assert slots.complete_steps() == [(10, old)]


def test_corrupted_byte_in_slot_raises_checksum_error_naming_the_tensor(
    slots: sl.SlotSet,
) -> None:
    idx = write_step(slots, 1)
    manifest = slots.read_manifest(idx)
    b = next(e for e in manifest.tensors if e.name == "b")
    view = slots.data_view(idx)
    view[b.offset + 3] ^= 0xFF
    with pytest.raises(fmt.ChecksumError) as info:
        slots.verify(idx)
    assert "b" in info.value.tensors and "w" not in info.value.tensors
    assert f"chunk {(b.offset + 3) // _CHUNK}" in str(info.value)


def test_damaged_manifest_is_never_trusted(slots: sl.SlotSet) -> None:
    idx = write_step(slots, 1)
    # Damage through an independent mapping, as a stray writer would.
    fd = os.open(sl.SHM_DIR / slots.name, os.O_RDWR)
    try:
        # Layout: header page, then per slot a header page, manifest, data.
        stride = (sl.slot_bytes(slots.data_capacity, slots.manifest_capacity) - sl.PAGE) // 2
        moff = sl.PAGE + idx * stride + sl.PAGE
        os.pwrite(fd, b"}", moff + 5)
    finally:
        os.close(fd)
    with pytest.raises(sl.SlotError, match="manifest digest mismatch"):
        slots.read_manifest(idx)


def test_capacity_overflow_names_the_sizes(prefix: str) -> None:
    with sl.SlotSet.create(prefix + "small", 1000, 4096, touch=False) as ss:
        with pytest.raises(sl.SlotError, match=r"2000 bytes.*hold 1000"):
            ss.begin_write(1, nbytes=2000)
        idx = ss.begin_write(1)
        state = {"x": torch.ones(1000)}
        manifest = fmt.make_manifest(
            state, step=1, rank=0, world_size=1, config_hash="", extra={}, buf=bytes(4000)
        )
        with pytest.raises(sl.SlotError, match="data is 4000 bytes, capacity 1000"):
            ss.commit(idx, manifest)
        manifest = fmt.make_manifest(
            {}, step=1, rank=0, world_size=1, config_hash="", extra={"pad": "x" * 5000}, buf=b""
        )
        with pytest.raises(sl.SlotError, match=r"manifest is .* capacity 4096"):
            ss.commit(idx, manifest)
        assert ss.complete_steps() == []


def test_received_slot_commits_only_after_validation(slots: sl.SlotSet, prefix: str) -> None:
    src_idx = write_step(slots, 4)
    raw, data = slots.raw_slot_view(src_idx)
    cap = slots.manifest_capacity
    with sl.SlotSet.create(prefix + "peer", slots.data_capacity, cap, touch=False) as peer:
        idx = peer.receive_begin(4, len(data))
        peer.data_view(idx)[: len(data)] = data
        with pytest.raises(sl.SlotError, match="not valid JSON"):
            peer.commit_raw(idx, raw[:-3])
        peer.data_view(idx)[0] ^= 1
        with pytest.raises(fmt.ChecksumError):
            peer.commit_raw(idx, raw, verify=True)
        assert peer.complete_steps() == []
        peer.data_view(idx)[0] ^= 1
        peer.commit_raw(idx, raw, verify=True)
        assert_state_is_step(peer, idx, 4)


def test_commit_requires_begin_write_for_the_same_step(slots: sl.SlotSet) -> None:
    idx = write_step(slots, 1)
    manifest = slots.read_manifest(idx)
    with pytest.raises(sl.SlotError, match="COMPLETE; begin_write"):
        slots.commit(idx, manifest)
    other = slots.begin_write(2)
    with pytest.raises(sl.SlotError, match="begun for step 2, manifest is step 1"):
        slots.commit(other, manifest)


def test_open_refuses_absent_or_foreign_segments(prefix: str) -> None:
    with pytest.raises(sl.SlotError, match="does not exist"):
        sl.SlotSet.open(prefix + "absent")
    (sl.SHM_DIR / (prefix + "junk")).write_bytes(b"x" * 8192)
    with pytest.raises(sl.SlotError, match="bad magic"):
        sl.SlotSet.open(prefix + "junk")
    with pytest.raises(sl.SlotError, match="bad segment name"):
        sl.SlotSet.open("../etc/passwd")


def test_create_refuses_existing_name(slots: sl.SlotSet) -> None:
    with pytest.raises(sl.SlotError, match="already exists"):
        sl.SlotSet.create(slots.name, 10, 4096)


def test_create_touch_records_its_cost_and_fills_the_file(prefix: str) -> None:
    with sl.SlotSet.create(prefix + "t", 1 << 20, 4096, touch=True) as ss:
        assert ss.touch_s > 0
        st = os.stat(sl.SHM_DIR / ss.name)
        assert st.st_blocks * 512 >= sl.slot_bytes(1 << 20, 4096)


def test_data_tensor_aliases_shared_memory_and_survives_close(prefix: str) -> None:
    ss = sl.SlotSet.create(prefix + "alias", 64, 4096, touch=False)
    t = ss.data_tensor(1)
    t.fill_(7)
    assert bytes(ss.data_view(1)) == b"\x07" * 64
    ss.close()  # views still alive: the mapping stays until they go
    assert int(t.sum()) == 7 * 64
    with pytest.raises(sl.SlotError, match="closed"):
        ss.complete_steps()


def test_unlink_prefix_leaves_nothing_in_shm(prefix: str) -> None:
    run_id = prefix.removeprefix("gemini-") + "run"
    for i in range(3):
        name = sl.shm_name(run_id, 0, i, "local")
        assert name.startswith(prefix)
        sl.SlotSet.create(name, 128, 4096).close()
    assert len(sl.list_segments(prefix)) == 3
    assert sl.unlink_prefix(prefix) == 3
    assert sl.list_segments(prefix) == []
    with pytest.raises(ValueError):
        sl.unlink_prefix("")


def test_sizes_helpers_are_consistent() -> None:
    assert sl.slot_bytes(0, 1) == 5 * sl.PAGE
    assert sl.slot_bytes(10, 4097) == sl.PAGE + 2 * (sl.PAGE + 2 * sl.PAGE + sl.PAGE)
    assert sl.manifest_capacity_for(1000, 100 << 30) > 1000 * 100 + 25600 * 18
    assert sl.shm_available_bytes() > 0


def test_view_state_is_verified_and_zero_copy(slots: sl.SlotSet) -> None:
    idx = write_step(slots, 4)
    manifest, views = slots.view_state(idx)
    expected = make_state(4)
    assert manifest.step == 4 and list(views) == list(expected)
    for k, v in expected.items():
        assert torch.equal(views[k], v), k
    # The views are the slot's memory: a restore copies out of them, nothing else.
    w = manifest.tensors[0]
    slots.data_view(idx)[w.offset] ^= 0xFF
    assert not torch.equal(views[w.name], expected[w.name])
    with pytest.raises(fmt.ChecksumError):
        slots.view_state(idx)


def test_a_renamed_segment_keeps_its_memory_and_a_bigger_slot_holds_a_smaller_state(
    prefix: str,
) -> None:
    # A standby node allocates its slots before it knows which ranks they are
    # for, each as large as the largest rank's; its takeover renames them.
    cap = sl.manifest_capacity_for(8, _NBYTES, _CHUNK)
    ss = sl.SlotSet.create(prefix + "pool0", 2 * _NBYTES, cap, touch=True)
    try:
        ss.rename(prefix + "r1")
        assert sl.list_segments(prefix) == [prefix + "r1"]
        idx = write_step(ss, 5)
        # Another process opening the new name reads the same memory.
        reader = child(
            """
            ss = sl.SlotSet.open(sys.argv[1])
            print(ss.newest_complete()[0], ss.verify(ss.newest_complete()[1]).data_nbytes)
            """,
            prefix + "r1",
        )
        out, _ = reader.communicate(timeout=120)
        assert out.split() == ["5", str(_NBYTES)]
        assert_state_is_step(ss, idx, 5)
        # Never over an existing segment: that name is someone's slots.
        sl.SlotSet.create(prefix + "taken", 64, 4096).close()
        with pytest.raises(sl.SlotError, match="already exists"):
            ss.rename(prefix + "taken")
        assert ss.name == prefix + "r1"
    finally:
        ss.close()
