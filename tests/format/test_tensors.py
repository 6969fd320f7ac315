"""Data files: writing snapshot arenas in one piece; one-pass checked copies (downloads,
uploads, sync)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import given, strategies as st

from checkpointing.errors import CorruptCheckpointError
from checkpointing.fastio import writes
from checkpointing.format import tensors, tree, verify
from checkpointing.snapshot import SnapshotBuffers


def data_file(*sizes: int) -> tuple[bytes, tuple[int, str, str]]:
    """A safetensors file of our writer, and its (size, header checksum, checksum)."""
    state = {"x": {f"t{i}": torch.arange(n, dtype=torch.float32) for i, n in enumerate(sizes)}}
    buf = io.BytesIO()
    written = tensors.write_file(buf, tree.flatten(state).blobs, "x.safetensors")
    data = buf.getvalue()
    return data, (written.size, written.header_checksum, written.checksum)


def copy(data: bytes, expected: tuple[int, str, str]) -> bytes:
    out = io.BytesIO()
    seen: list[int] = []
    verify.copy_checked(io.BytesIO(data), out, expected, "f", seen.append)
    assert sum(seen) == len(data)
    return out.getvalue()


@given(st.lists(st.integers(0, 3000), max_size=5))
def test_copy_of_a_data_file_is_exact_and_checked(sizes: list[int]) -> None:
    data, expected = data_file(*sizes)
    assert verify.file_checksums(io.BytesIO(data), "f") == expected[1:]
    assert copy(data, expected) == data


def test_copy_of_a_foreign_file_checks_the_whole() -> None:
    data = bytes(range(256)) * 1000
    size, checksum = verify.stream_checksum(io.BytesIO(data))
    assert copy(data, (size, "", checksum)) == data
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        copy(data[:-1] + b"x", (size, "", checksum))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: d[:-3], "the record says"),  # truncated
        (lambda d: d + b"\0", "longer than"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum mismatch"),  # a flipped bit
        (lambda d: d[:12] + bytes([d[12] ^ 1]) + d[13:], "checksum mismatch|header"),
    ],
)
def test_copy_refuses_a_damaged_file(damage: object, message: str) -> None:
    data, expected = data_file(10, 20)
    with pytest.raises(CorruptCheckpointError, match=message):
        copy(damage(data), expected)  # type: ignore[operator]


class CountingFile(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: object) -> int:
        self.writes += 1
        return super().write(data)  # type: ignore[arg-type]


def odd_state(n: int) -> dict[str, torch.Tensor]:
    """40 tensors of ``n`` floats, each after a 1-element one: padding between all."""
    torch.manual_seed(0)
    return {f"{k}{i}": torch.randn(size) for i in range(40) for k, size in (("w", n), ("step", 1))}


def written(blobs: list[tree.Blob]) -> tuple[bytes, int, str]:
    f = CountingFile()
    result = tensors.write_file(f, blobs, "x.safetensors")
    return f.getvalue(), f.writes, result.checksum


@pytest.mark.parametrize("n", [20_000, 250_000], ids=["3MB", "40MB"])
def test_a_snapshot_arena_is_written_as_one_run_of_large_writes(n: int) -> None:
    blobs = tree.flatten({"x": odd_state(n)}).blobs
    snapshot = SnapshotBuffers().snapshot(blobs)
    from_arena, writes, checksum = written(snapshot)
    from_sources, writes_sources, checksum_sources = written(blobs)
    assert from_arena == from_sources and checksum == checksum_sources
    assert writes == 2 + len(from_arena) // (16 << 20), "the header, then 16 MiB pieces"
    assert writes_sources > 80  # tensors and padding, one by one


def test_memory_laid_out_like_the_file_but_not_zero_between_is_written_tensor_by_tensor() -> None:
    blobs = tree.flatten({"x": odd_state(20_000)}).blobs
    buffers = SnapshotBuffers()
    arena = buffers.snapshot(blobs)[0].tensor.untyped_storage()
    torch.empty(0, dtype=torch.uint8).set_(arena, 0, (arena.nbytes(),), (1,)).fill_(7)
    snapshot = buffers.snapshot(blobs)  # the tensors again, over a background of 7s
    from_arena, writes, _ = written(snapshot)
    assert from_arena == written(blobs)[0], "padding written as zeros"
    assert writes > 80


def test_large_tensors_go_to_disk_from_their_own_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tensors of 1 MiB and more start at their memory's page offset in the file, so
    direct I/O writes all but their first and last page from the tensor itself."""
    state = {
        "a": torch.randn(3 << 20)[3:],  # 12 bytes into a page
        "step": torch.tensor(1.0),
        "b": torch.randn(1 << 20, dtype=torch.float64)[1:],
    }
    sent: list[tuple[int, int]] = []  # (address, bytes) of each write
    real = writes.DirectFile._write_all

    def spy(self: writes.DirectFile, views: list[memoryview]) -> None:
        sent.extend((np.frombuffer(v, dtype=np.uint8).ctypes.data, len(v)) for v in views)
        real(self, views)

    monkeypatch.setattr(writes.DirectFile, "_write_all", spy)
    path = tmp_path / "x.safetensors"
    with writes.create_durable(path) as f:
        assert isinstance(f, writes.DirectFile), "this filesystem has O_DIRECT"
        tensors.write_file(f, tree.flatten({"x": state}).blobs, "x.safetensors")
    for key in ("a", "b"):
        start, stop = state[key].data_ptr(), state[key].data_ptr() + state[key].nbytes
        as_is = sum(n for address, n in sent if start <= address and address + n <= stop)
        assert as_is > state[key].nbytes - 2 * 4096, key
    loaded = safetensors.torch.load_file(path)
    assert all(torch.equal(loaded[key], value) for key, value in state.items())


def small_and_large(n_small: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = {f"b{i}": torch.randn(1 + i % 50) for i in range(n_small)}
    return state | {"big": torch.randn(300_000), "step": torch.tensor(3.0)}


def test_small_tensors_are_hashed_and_written_in_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    blobs = tree.flatten({"x": small_and_large(300)}).blobs
    batched, writes, checksum = written(blobs)
    nodes = [dict(node) for blob in blobs for node in blob.nodes]
    monkeypatch.setattr(tensors, "SMALL", 0)  # every tensor on its own
    one_by_one, writes_one_by_one, checksum_one_by_one = written(blobs)
    assert batched == one_by_one and checksum == checksum_one_by_one
    assert nodes == [dict(node) for blob in blobs for node in blob.nodes], "same digests"
    assert writes_one_by_one > 300 and writes <= 5, "header, small ones, big, small ones"
    assert verify.file_checksums(io.BytesIO(batched), "f")[1] == checksum


@given(st.lists(st.integers(0, 200_000), max_size=40))
def test_coalesced_pieces_keep_the_bytes_and_their_order(sizes: list[int]) -> None:
    pieces = [memoryview(bytes([i % 251]) * n) for i, n in enumerate(sizes)]
    out = list(tensors.coalesced(pieces))
    assert b"".join(out) == b"".join(pieces)
    assert all(len(p) < tensors.BATCH + tensors.SMALL for p in out)
    large = [p for p in pieces if len(p) >= tensors.SMALL]
    assert [p for p in out if any(p is q for q in large)] == large, "large ones as they are"
