"""The flat checkpoint format: layout, bitwise round trips, checksums, manifest validation."""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gemini.checkpoint import format as fmt


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes of ``t``: compares NaNs and -0.0 bitwise, any dtype, any rank."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(_bits(a[k]), _bits(b[k])), k


def realistic_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g)
    return {
        "model.layer0.weight": w,
        "model.layer0.bias": torch.randn(48, generator=g),
        "model.emb.weight": torch.randn(100, 32, generator=g).to(torch.bfloat16),
        "model.head.weight_t": w.t(),  # non-contiguous
        "model.every_other": torch.arange(40, dtype=torch.int64)[::3],  # non-contiguous
        "optim.state.0.step": torch.tensor(17.0),  # 0-dim
        "optim.state.0.exp_avg": torch.randn(64, 48, generator=g),
        "model.mask": torch.rand(33, generator=g) > 0.5,
        "data.position": torch.tensor(123456789012, dtype=torch.int64),
        "rng.cpu": torch.get_rng_state(),
        "model.empty": torch.zeros(0, 5),
        "special": torch.tensor([float("nan"), float("inf"), -0.0, 1e-45]),
    }


def snapshot(
    state: dict[str, torch.Tensor], chunk_bytes: int = fmt.DEFAULT_CHUNK_BYTES
) -> tuple[bytearray, fmt.Manifest]:
    entries, nbytes = fmt.layout(state)
    buf = bytearray(nbytes)
    fmt.write_state(state, entries, memoryview(buf))
    manifest = fmt.make_manifest(
        state,
        step=7,
        rank=1,
        world_size=4,
        config_hash="cafe",
        extra={"data": {"epoch": 2, "index": [3, 4]}, "lr": 0.25, "name": "gpt2-mini"},
        buf=buf,
        chunk_bytes=chunk_bytes,
    )
    return buf, manifest


def test_realistic_state_round_trips_bitwise() -> None:
    state = realistic_state()
    buf, manifest = snapshot(state)
    fmt.verify(buf, manifest)
    assert_bitwise_equal(fmt.read_state(bytes(buf), manifest), state)


def test_round_trip_through_uint8_tensor_buffer_and_views() -> None:
    state = realistic_state()
    entries, nbytes = fmt.layout(state)
    buf = torch.zeros(nbytes + 100, dtype=torch.uint8)
    fmt.write_state(state, entries, buf)
    manifest = fmt.make_manifest(
        state, step=1, rank=0, world_size=1, config_hash="", extra={}, buf=buf
    )
    views = fmt.read_state(buf, manifest, copy=False)
    assert_bitwise_equal(views, state)
    # copy=False returns views aliasing the buffer.
    buf.zero_()
    assert not views["model.layer0.weight"].any()


def test_layout_is_aligned_in_insertion_order() -> None:
    state = realistic_state()
    entries, nbytes = fmt.layout(state, align=128)
    assert [e.name for e in entries] == list(state)
    assert all(e.offset % 128 == 0 for e in entries)
    assert nbytes == entries[-1].offset + entries[-1].nbytes
    for a, b in itertools.pairwise(entries):
        assert a.offset + a.nbytes <= b.offset


def test_manifest_json_round_trip() -> None:
    _, manifest = snapshot(realistic_state(), chunk_bytes=1024)
    again = fmt.Manifest.from_json(manifest.to_json())
    assert again == manifest
    assert isinstance(again.tensors[0].shape, tuple)


def test_manifest_with_unserialisable_extra_is_refused() -> None:
    _, manifest = snapshot({"x": torch.ones(2)})
    manifest.extra = {"obj": object()}
    with pytest.raises(fmt.FormatError, match="extra"):
        manifest.to_json()


def test_flipped_byte_names_chunk_range_and_tensor() -> None:
    state = {"a": torch.zeros(256), "b": torch.ones(256), "c": torch.full((256,), 2.0)}
    buf, manifest = snapshot(state, chunk_bytes=512)
    b = next(e for e in manifest.tensors if e.name == "b")
    pos = b.offset + 700
    buf[pos] ^= 0x40
    with pytest.raises(fmt.ChecksumError) as info:
        fmt.verify(buf, manifest)
    err = info.value
    chunk = pos // 512
    assert err.chunk == chunk and err.bad_chunks == [chunk]
    assert (err.start, err.end) == (chunk * 512, chunk * 512 + 512)
    assert err.tensors == ["b"]
    assert err.expected == manifest.checksums[chunk] != err.actual
    msg = str(err)
    assert f"chunk {chunk} bytes [{chunk * 512}, {chunk * 512 + 512})" in msg
    assert "tensors: b" in msg and err.expected in msg and err.actual in msg


def test_corruption_spanning_tensors_lists_all_of_them() -> None:
    state = {"a": torch.zeros(10), "b": torch.ones(10)}
    buf, manifest = snapshot(state, chunk_bytes=1 << 20)
    buf[0] ^= 1
    with pytest.raises(fmt.ChecksumError) as info:
        fmt.verify(buf, manifest)
    assert info.value.tensors == ["a", "b"]


def _tamper(doc: dict[str, Any], path: str, value: Any) -> None:
    if path.startswith("tensors"):
        doc["tensors"][0][int(path.split(".")[1])] = value
    else:
        doc[path] = value


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        ("step", -1, "'step'"),
        ("step", "7", "'step'"),
        ("rank", 9, "'rank'"),
        ("world_size", True, "'world_size'"),
        ("config_hash", None, "'config_hash'"),
        ("chunk_bytes", 0, "'chunk_bytes'"),
        ("data_nbytes", 3, "data_nbytes 3"),
        ("checksums", ["00" * 8, "00" * 8], "'checksums'"),
        ("checksums", ["xyz"], "'checksums[0]'"),
        ("extra", [], "'extra'"),
        ("version", 99, "'version'"),
        ("generation", -1, "'generation'"),
        ("generation", "2", "'generation'"),
        ("format", "pickle", "'format'"),
        ("tensors.1", "float99", "tensors[0] ('x').dtype"),
        ("tensors.2", [3, -1], "tensors[0] ('x').shape"),
        ("tensors.3", 2, "tensors[0] ('x').offset"),
        ("tensors.4", 8, "tensors[0] ('x').nbytes"),
    ],
)
def test_tampered_manifest_field_is_named(path: str, value: Any, named: str) -> None:
    _, manifest = snapshot({"x": torch.ones(4, 4), "y": torch.ones(3)})
    doc = json.loads(manifest.to_json())
    _tamper(doc, path, value)
    with pytest.raises(fmt.FormatError) as info:
        fmt.Manifest.from_json(json.dumps(doc).encode())
    assert named in str(info.value)


def test_the_writing_generation_round_trips_and_version_1_reads_as_generation_0() -> None:
    state = {"x": torch.ones(4, 4)}
    entries, nbytes = fmt.layout(state)
    buf = bytearray(nbytes)
    fmt.write_state(state, entries, memoryview(buf))
    manifest = fmt.make_manifest(
        state, step=3, rank=0, world_size=1, config_hash="h", extra={}, buf=buf, generation=5
    )
    assert fmt.Manifest.from_json(manifest.to_json()).generation == 5
    # A checkpoint written before generations were recorded: of unknown origin.
    doc = json.loads(manifest.to_json())
    doc["version"] = 1
    del doc["generation"]
    old = fmt.Manifest.from_json(json.dumps(doc).encode())
    assert old.generation == 0 and old.step == 3


def test_missing_field_and_overlapping_tensors_are_refused() -> None:
    _, manifest = snapshot({"x": torch.ones(16), "y": torch.ones(16)})
    doc = json.loads(manifest.to_json())
    del doc["rank"]
    with pytest.raises(fmt.FormatError, match="'rank' is missing"):
        fmt.Manifest.from_json(json.dumps(doc).encode())
    doc = json.loads(manifest.to_json())
    doc["tensors"][1][3] = 32
    with pytest.raises(fmt.FormatError, match="'x' overlaps 'y'"):
        fmt.Manifest.from_json(json.dumps(doc).encode())
    with pytest.raises(fmt.FormatError, match="not valid JSON"):
        fmt.Manifest.from_json(b"\x80garbage")


def test_read_into_preallocated_out_copies_in_place() -> None:
    state = realistic_state()
    buf, manifest = snapshot(state)
    out = {k: torch.empty_like(v) for k, v in state.items() if k.startswith("model.")}
    ids = {k: id(v) for k, v in out.items()}
    got = fmt.read_state(buf, manifest, out=out)
    assert_bitwise_equal(got, state)
    assert all(id(got[k]) == i for k, i in ids.items())


@pytest.mark.parametrize(
    "bad", [torch.empty(48, 64), torch.empty(64, 48, dtype=torch.float64)], ids=["shape", "dtype"]
)
def test_read_into_out_with_wrong_shape_or_dtype_names_the_tensor(bad: torch.Tensor) -> None:
    state = realistic_state()
    buf, manifest = snapshot(state)
    with pytest.raises(fmt.FormatError, match=r"out\['model.layer0.weight'\]"):
        fmt.read_state(buf, manifest, out={"model.layer0.weight": bad})


def test_read_into_out_naming_an_absent_tensor_raises() -> None:
    buf, manifest = snapshot({"x": torch.ones(2)})
    with pytest.raises(fmt.FormatError, match="'nope'"):
        fmt.read_state(buf, manifest, out={"nope": torch.ones(2)})


def test_write_state_refuses_state_that_does_not_match_layout() -> None:
    entries, nbytes = fmt.layout({"x": torch.ones(4)})
    with pytest.raises(fmt.FormatError, match="'x'"):
        fmt.write_state({"x": torch.ones(5)}, entries, bytearray(nbytes + 64))
    with pytest.raises(fmt.FormatError, match="buffer holds"):
        fmt.write_state({"x": torch.ones(4)}, entries, bytearray(nbytes - 1))


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_quantized_and_sparse_tensors_are_refused() -> None:
    with pytest.raises(fmt.FormatError, match="dense"):
        fmt.layout({"s": torch.eye(3).to_sparse()})
    q = torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8)
    with pytest.raises(fmt.FormatError, match="qint8"):
        fmt.layout({"q": q})


_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
]


@st.composite
def states(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    n = draw(st.integers(0, 6))
    out: dict[str, torch.Tensor] = {}
    for i in range(n):
        dtype = draw(st.sampled_from(_DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
        seed = draw(st.integers(0, 2**31))
        g = torch.Generator().manual_seed(seed)
        numel = 1
        for d in shape:
            numel *= d
        if dtype == torch.bool:
            t = torch.randint(0, 2, shape, generator=g).bool()
        else:
            # Random bytes reinterpreted: NaN payloads, denormals, all of it.
            raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=g)
            t = raw.view(dtype).reshape(shape)
        if draw(st.booleans()) and t.dim() >= 2:
            t = t.transpose(0, -1)
        out[f"t{i}.{dtype}"] = t
    return out


@settings(max_examples=60, deadline=None)
@given(state=states(), chunk_bytes=st.integers(1, 300), align=st.sampled_from([1, 16, 64]))
def test_any_state_round_trips_bitwise(
    state: dict[str, torch.Tensor], chunk_bytes: int, align: int
) -> None:
    entries, nbytes = fmt.layout(state, align=align)
    buf = bytearray(nbytes)
    fmt.write_state(state, entries, buf)
    manifest = fmt.Manifest(
        step=0,
        rank=0,
        world_size=1,
        config_hash="",
        tensors=entries,
        data_nbytes=nbytes,
        chunk_bytes=chunk_bytes,
        checksums=fmt.checksum(buf, nbytes, chunk_bytes),
        extra={},
    )
    manifest = fmt.Manifest.from_json(manifest.to_json())
    fmt.verify(buf, manifest)
    assert_bitwise_equal(fmt.read_state(buf, manifest), state)


def _garbage(nbytes: int, seed: int = 1) -> bytearray:
    """A buffer full of stale bytes, as a reused slot is: padding must hash as it lies."""
    g = torch.Generator().manual_seed(seed)
    return bytearray(torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g).numpy())


@settings(max_examples=60, deadline=None)
@given(
    state=states(),
    chunk_bytes=st.integers(1, 300),
    piece_bytes=st.integers(1, 200),
    align=st.sampled_from([1, 16, 64]),
)
def test_write_checksummed_equals_write_then_checksum(
    state: dict[str, torch.Tensor], chunk_bytes: int, piece_bytes: int, align: int
) -> None:
    entries, nbytes = fmt.layout(state, align=align)
    expected = _garbage(nbytes)
    fmt.write_state(state, entries, expected)
    fused = _garbage(nbytes)
    sums = fmt.write_checksummed(state, entries, fused, chunk_bytes, piece_bytes)
    assert fused == expected
    assert sums == fmt.checksum(expected, nbytes, chunk_bytes)


def test_write_checksummed_at_default_sizes_across_many_chunks() -> None:
    # A few MiB of mixed tensors (some non-contiguous, one bf16) spanning
    # several default pieces and chunk boundaries, into a uint8 tensor buffer.
    g = torch.Generator().manual_seed(3)
    state = {
        "big": torch.randn(700_000, generator=g),
        "odd": torch.randn(333, 77, generator=g).t(),
        "half": torch.randn(123_457, generator=g).to(torch.bfloat16),
        "step": torch.tensor(5),
        **realistic_state(),
    }
    entries, nbytes = fmt.layout(state)
    buf = torch.from_numpy(np.frombuffer(_garbage(nbytes + 10), dtype=np.uint8))
    sums = fmt.write_checksummed(state, entries, buf, chunk_bytes=1 << 20)
    manifest = fmt.make_manifest(
        state,
        step=1,
        rank=0,
        world_size=1,
        config_hash="",
        extra={},
        buf=buf,
        chunk_bytes=1 << 20,
        checksums=sums,
    )
    assert len(sums) == -(-nbytes // (1 << 20)) > 3
    fmt.verify(buf, manifest)
    assert_bitwise_equal(fmt.read_state(buf, manifest), state)


def test_write_checksummed_refuses_what_write_state_refuses() -> None:
    entries, nbytes = fmt.layout({"x": torch.ones(4)})
    with pytest.raises(fmt.FormatError, match="'x'"):
        fmt.write_checksummed({"x": torch.ones(5)}, entries, bytearray(nbytes + 64))
    with pytest.raises(fmt.FormatError, match="buffer holds"):
        fmt.write_checksummed({"x": torch.ones(4)}, entries, bytearray(nbytes - 1))
    with pytest.raises(fmt.FormatError, match="chunk_bytes"):
        fmt.write_checksummed({"x": torch.ones(4)}, entries, bytearray(nbytes), chunk_bytes=0)
    with pytest.raises(fmt.FormatError, match="checksums given"):
        fmt.make_manifest(
            {"x": torch.ones(4)},
            step=0,
            rank=0,
            world_size=1,
            config_hash="",
            extra={},
            buf=bytearray(nbytes),
            checksums=[],
        )
