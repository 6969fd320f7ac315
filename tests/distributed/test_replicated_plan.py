"""Which process reads which replicated tensor: a pure function of the record's nodes."""

from __future__ import annotations

from typing import Any

from hypothesis import given, strategies as st

from checkpointing.distributed.replicated import SHARED_MIN_BYTES, plan


def tensor(key: str, numel: int, dtype: str = "float32", **extra: Any) -> dict[str, Any]:
    body = {"dtype": dtype, "shape": [numel], "file": "model.safetensors", "key": key,
            "checksum": "0" * 16, **extra}
    return {"tensor": body}


def item(*nodes: dict[str, Any]) -> dict[str, Any]:
    return {"dict": [[f"k{i}", node] for i, node in enumerate(nodes)]}


def test_large_tensors_split_in_contiguous_runs_of_equal_bytes() -> None:
    big = SHARED_MIN_BYTES // 4
    nodes = [item(*(tensor(f"w{i}", big) for i in range(8)))]
    owners = plan(nodes, 5, 4)
    assert list(owners.values()) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert next(iter(owners)) == (5, "model.safetensors", "w0")


def test_small_tensors_views_and_arrays_are_read_by_everyone() -> None:
    big = SHARED_MIN_BYTES // 4
    nodes = [item(
        tensor("small", big - 1),
        tensor("view", big, stride=[1], offset=0),
        {"ndarray": {"dtype": "<f4", "shape": [big], "file": "a", "key": "a", "checksum": ""}},
        tensor("bf16", big * 2, dtype="bfloat16"),
    )]
    assert plan(nodes, 1, 2) == {(1, "model.safetensors", "bf16"): 1}  # its middle in 2nd half


def test_tied_and_referenced_tensors_are_planned_once_by_where_they_are_stored() -> None:
    big = SHARED_MIN_BYTES // 4
    nodes = [item(tensor("w", big), tensor("w", big), tensor("w", big, step=3))]
    assert plan(nodes, 7, 2) == {(7, "model.safetensors", "w"): 0,
                                 (3, "model.safetensors", "w"): 1}


@given(
    st.lists(st.integers(SHARED_MIN_BYTES // 4, 40 * SHARED_MIN_BYTES), max_size=40),
    st.integers(2, 9),
)
def test_every_share_is_contiguous_and_about_a_world_th(sizes: list[int], world: int) -> None:
    nodes = [item(*(tensor(f"t{i}", n) for i, n in enumerate(sizes)))]
    owners = list(plan(nodes, 0, world).values())
    assert owners == sorted(owners)
    assert all(0 <= o < world for o in owners)
    total, largest = sum(sizes) * 4, max(sizes, default=0) * 4
    for rank in range(world):
        share = sum(n * 4 for n, o in zip(sizes, owners, strict=True) if o == rank)
        assert share <= total / world + largest
