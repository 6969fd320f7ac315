"""Data files: one-pass checked copies (downloads, uploads, sync)."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from checkpointing.errors import CorruptCheckpointError
from checkpointing.format import tensors, tree


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
    tensors.copy_checked(io.BytesIO(data), out, expected, "f", seen.append)
    assert sum(seen) == len(data)
    return out.getvalue()


@given(st.lists(st.integers(0, 3000), max_size=5))
def test_copy_of_a_data_file_is_exact_and_checked(sizes: list[int]) -> None:
    data, expected = data_file(*sizes)
    assert tensors.file_checksums(io.BytesIO(data), "f") == expected[1:]
    assert copy(data, expected) == data


def test_copy_of_a_foreign_file_checks_the_whole() -> None:
    data = bytes(range(256)) * 1000
    size, checksum = tensors.stream_checksum(io.BytesIO(data))
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
