"""Nested state <-> JSON tree + tensor blobs: leaves, containers, keys, stateful objects,
shared storage, and rejection of what cannot be stored without pickle."""

from __future__ import annotations

import collections
import json
import math
import struct
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from checkpointing import CheckpointManager, CheckpointManagerOptions
from checkpointing.errors import UnsupportedTypeError
from checkpointing.format import tree

SYNC = CheckpointManagerOptions(enable_async_checkpointing=False)


def no_arrays(tag: str, body: dict[str, Any], dest: torch.Tensor | None) -> Any:
    raise AssertionError(f"unexpected array node {tag}: {body}")


def json_round_trip(state: Mapping[str, Any]) -> dict[str, Any]:
    """flatten -> strict JSON text -> unflatten, for states without arrays."""
    flat = tree.flatten(state)
    assert flat.blobs == [], "no tensors expected"
    items = json.loads(json.dumps(flat.items, allow_nan=False))
    return {name: tree.unflatten(node, no_arrays) for name, node in items.items()}


def float_bits(x: float) -> bytes:
    return struct.pack("<d", x)


class Counter:
    """A user object restored in place through state_dict()/load_state_dict()."""

    def __init__(self, count: int = 0) -> None:
        self.count = count
        self.loaded: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "history": (1, 2)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded.append(state)
        self.count = state["count"]


class OnlyStateDict:
    def state_dict(self) -> dict[str, Any]:
        return {}


class MyTensor(torch.Tensor):
    pass


# ------------------------------------------------------------------------ leaves


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -1,
        2**64,
        -(2**200),
        10**1000,
        1.5,
        -2.5e-308,
        5e-324,
        1.7976931348623157e308,
        "",
        "plain",
        "\u00fcn\u00efc\u00f8d\u00e9 \u2713 \U0001f389 \u65e5\u672c \x00 \n",
        b"",
        b"\x00\xff\x80 raw bytes",
    ],
    ids=repr,
)
def test_python_leaves_round_trip_exactly(value: Any) -> None:
    restored = json_round_trip({"item": {"leaf": value}, "top": value})
    for got in (restored["item"]["leaf"], restored["top"]):
        assert type(got) is type(value)
        assert got == value


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -0.0, 0.0], ids=repr)
def test_special_floats_round_trip(value: float) -> None:
    flat = tree.flatten({"x": [value]})
    json.dumps(flat.items, allow_nan=False)  # non-finite floats are encoded, not NaN literals
    (got,) = json_round_trip({"x": [value]})["x"]
    assert type(got) is float
    if math.isnan(value):
        assert math.isnan(got)
    else:
        assert float_bits(got) == float_bits(value), f"{got!r} != {value!r} (sign of zero)"


def test_non_finite_floats_are_tagged_nodes() -> None:
    flat = tree.flatten({"x": [math.inf, -math.inf, 1.0]})
    assert flat.items["x"][:2] == [{"float": "inf"}, {"float": "-inf"}]
    assert flat.items["x"][2] == 1.0


NUMPY_SCALARS = [
    np.bool_(True),
    np.int8(-128),
    np.int16(-3),
    np.int32(2**31 - 1),
    np.int64(-(2**63)),
    np.uint8(255),
    np.uint16(65535),
    np.uint32(2**32 - 1),
    np.uint64(2**64 - 1),
    np.float16(-0.0),
    np.float16(np.inf),
    np.float32(np.nan),
    np.float32(1 / 3),
    np.longdouble(1) / 3,
    np.complex64(1 - 2j),
    np.complex128(complex(np.nan, -np.inf)),
]


@pytest.mark.parametrize("value", NUMPY_SCALARS, ids=lambda v: f"{v.dtype}:{v!r}")
def test_numpy_scalars_keep_type_dtype_and_bits(value: np.generic) -> None:
    got = json_round_trip({"x": {"v": value}})["x"]["v"]
    assert type(got) is type(value)
    assert got.dtype == value.dtype
    assert got.tobytes() == value.tobytes(), f"{got!r} != {value!r}"


@pytest.mark.parametrize("value", [np.float64(0.5), np.float64(np.nan), np.float64(-np.inf)])
def test_numpy_float64_scalars_are_not_taken_for_floats(value: np.float64) -> None:
    """np.float64 subclasses float; it must still come back as np.float64, non-finite too."""
    got = json_round_trip({"x": [value]})["x"][0]
    assert type(got) is np.float64
    assert got.tobytes() == value.tobytes()


# -------------------------------------------------------------------- containers


def test_int_and_str_dict_keys_are_kept_distinct_and_in_order() -> None:
    value = {1: "int one", "1": "str one", -5: "neg", 2**70: "huge", "": "empty", 0: "zero"}
    got = json_round_trip({"x": value})["x"]
    assert list(got.items()) == list(value.items())
    assert [type(k) for k in got] == [type(k) for k in value], "int keys must stay int"


def test_optimizer_style_int_keys_survive_json() -> None:
    state = {"state": {0: {"step": 3}, 1: {"step": 3}}, "param_groups": [{"params": [0, 1]}]}
    assert json_round_trip({"opt": state})["opt"] == state


@pytest.mark.parametrize(
    ("key", "type_name"),
    [
        (True, "bool"),
        (False, "bool"),
        (1.5, "float"),
        (None, "NoneType"),
        ((1, 2), "tuple"),
        (b"k", "bytes"),
        (np.int64(1), "int64"),
    ],
)
def test_unsupported_dict_keys_are_rejected_with_path(key: Any, type_name: str) -> None:
    with pytest.raises(UnsupportedTypeError) as info:
        tree.flatten({"extra": {"flags": [{"ok": 1, key: 2}]}})
    message = str(info.value)
    assert "extra/flags/0" in message, message
    assert type_name in message, message


def test_tuples_stay_tuples_and_lists_stay_lists() -> None:
    value: tuple[Any, ...] = ([1, (2, [3, ()], [])], (), [()], ([],), {"t": (None,)})
    got = json_round_trip({"x": value})["x"]
    assert got == value

    def types(v: Any) -> Any:
        if isinstance(v, list | tuple):
            return (type(v).__name__, [types(c) for c in v])
        if isinstance(v, dict):
            return {k: types(c) for k, c in v.items()}
        return type(v).__name__

    assert types(got) == types(value)


def test_mappings_come_back_as_plain_dicts() -> None:
    value = collections.OrderedDict([("b", 1), ("a", 2)])
    got = json_round_trip({"x": value})["x"]
    assert type(got) is dict and list(got.items()) == [("b", 1), ("a", 2)]


# ----------------------------------------------------------------- unsupported


Point = collections.namedtuple("Point", "x y")


UNSUPPORTED_LEAVES: dict[str, Callable[[], Any]] = {
    "object": object,
    "set": lambda: {1, 2},
    "frozenset": lambda: frozenset({1}),
    "complex": lambda: 1 + 2j,
    "Decimal": lambda: Decimal("1.5"),
    "function": lambda: lambda: None,
    "namedtuple": lambda: Point(1, 2),
    "bytearray": lambda: bytearray(b"x"),
    "object-ndarray": lambda: np.array([object()], dtype=object),
    "datetime64-scalar": lambda: np.datetime64("2024-01-01"),
    "only-state_dict": OnlyStateDict,
    "dtype": lambda: torch.float32,
    "sparse-tensor": lambda: torch.ones(2, 2).to_sparse(),
    "meta-tensor": lambda: torch.empty(2, device="meta"),
    "quantized-tensor": lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8),
    "tensor-subclass": lambda: torch.ones(2).as_subclass(MyTensor),
    "unitless-datetime-array": lambda: np.zeros(2, dtype="M8"),
    "text-of-no-code-point": lambda: np.frombuffer(b"\xff" * 4, dtype="<U1"),
}


@pytest.mark.filterwarnings("ignore:.*quantize_per_tensor:UserWarning")
@pytest.mark.parametrize("make_leaf", UNSUPPORTED_LEAVES.values(), ids=UNSUPPORTED_LEAVES.keys())
def test_unsupported_leaves_raise_naming_their_path(make_leaf: Callable[[], Any]) -> None:
    state = {"model": {"w": torch.ones(2)}, "extra": {"callbacks": [make_leaf()]}}
    with pytest.raises(UnsupportedTypeError, match="extra/callbacks/0"):
        tree.flatten(state)


def test_unsupported_error_says_what_is_supported() -> None:
    with pytest.raises(UnsupportedTypeError) as info:
        tree.flatten({"extra": {"callbacks": [object()]}})
    message = str(info.value)
    assert "builtins.object" in message, message
    assert "state_dict()" in message, "the error tells how to make it saveable"


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(
    ("bad_state", "path"),
    [
        ({"extra": {"callbacks": [object()]}}, "extra/callbacks/0"),
        ({"extra": {"flags": {True: 1}}}, "extra/flags"),
        ({"tail": [torch.ones(2), {"s": {1, 2}}]}, "tail/1/s"),
    ],
    ids=["leaf", "bool-key", "after-tensors"],
)
def test_unsupported_state_writes_nothing(
    tmp_path: Path, bad_state: dict[str, Any], path: str, async_save: bool
) -> None:
    options = CheckpointManagerOptions(enable_async_checkpointing=async_save)
    with CheckpointManager(tmp_path, options) as mgr:
        mgr.save(1, {"model": {"w": torch.ones(3)}})
        mgr.wait_until_finished()
        before = sorted(p.name for p in tmp_path.iterdir())
        with pytest.raises(UnsupportedTypeError, match=path):
            mgr.save(2, {"model": {"w": torch.zeros(3)}, **bad_state})
        mgr.wait_until_finished()
        after = sorted(p.name for p in tmp_path.iterdir())
        assert after == before, "a rejected state must leave no step and no .tmp-* leftovers"
        assert not [n for n in after if n.startswith(".tmp")]
        assert mgr.all_steps() == [1]
        assert mgr.save(2, {"model": {"w": torch.zeros(3)}}), "the manager stays usable"
    assert (tmp_path / "step_00000002").is_dir()


# --------------------------------------------------------------------- stateful


def test_stateful_objects_are_saved_through_state_dict() -> None:
    counter = Counter(4)
    as_object = tree.flatten({"c": counter, "nested": {"list": [counter]}})
    as_dict = tree.flatten({"c": counter.state_dict(), "nested": {"list": [counter.state_dict()]}})
    assert as_object.items == as_dict.items


def test_is_stateful() -> None:
    assert tree.is_stateful(Counter())
    assert tree.is_stateful(torch.nn.Linear(2, 2))
    assert tree.is_stateful(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1))
    assert not tree.is_stateful(OnlyStateDict()), "needs load_state_dict too"
    assert not tree.is_stateful({"state_dict": 1, "load_state_dict": 2})

    class MappingWithStateDict(dict[str, Any]):
        def state_dict(self) -> dict[str, Any]:
            return {}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            pass

    assert not tree.is_stateful(MappingWithStateDict(a=1)), "mappings are containers"


def test_stateful_restore_loads_in_place_and_returns_the_target(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, SYNC) as mgr:
        mgr.save(1, {"counter": Counter(4), "nested": {"counters": [Counter(5)]}})
        plain = mgr.restore()
        target_counter, nested_counter = Counter(0), Counter(0)
        target = {"counter": target_counter, "nested": {"counters": [nested_counter]}}
        restored = mgr.restore(target)
    assert plain == {
        "counter": {"count": 4, "history": (1, 2)},
        "nested": {"counters": [{"count": 5, "history": (1, 2)}]},
    }, "without a target, the saved state_dict comes back"
    assert restored is not None
    assert restored["counter"] is target_counter and target_counter.count == 4
    assert target_counter.loaded == [{"count": 4, "history": (1, 2)}]
    assert restored["nested"]["counters"][0] is nested_counter and nested_counter.count == 5


# ---------------------------------------------------------------------- tensors


def test_tensor_nodes_describe_dtype_and_shape() -> None:
    param = torch.nn.Parameter(torch.ones(2, 3, dtype=torch.bfloat16))
    flat = tree.flatten({"m": {"p": param, "z": torch.zeros(0, 4), "s": torch.tensor(1)}})
    described = [(tag, body["dtype"], body["shape"]) for tag, body, _ in tree.walk(flat.items["m"])]
    assert described == [
        ("tensor", "bfloat16", [2, 3]),
        ("tensor", "float32", [0, 4]),
        ("tensor", "int64", []),
    ]
    assert len(flat.blobs) == 3


def test_tied_tensors_are_stored_once() -> None:
    weight = torch.randn(4, 3)
    flat = tree.flatten({"model": {"emb": weight, "head": weight}, "other": {"w": weight}})
    assert len(flat.blobs) == 1, "one tensor referenced three times is one blob"
    assert len(flat.blobs[0].nodes) == 3
    assert flat.blobs[0].nbytes == weight.numel() * 4


def test_overlapping_views_store_their_storage_once_with_view_geometry() -> None:
    base = torch.arange(12, dtype=torch.float32)
    a, b = base[2:8], base.view(3, 4).t()
    flat = tree.flatten({"x": {"a": a, "b": b}})
    assert len(flat.blobs) == 1
    (blob,) = flat.blobs
    assert blob.nbytes == 12 * 4, "the whole storage is stored once"
    views = {tuple(n["shape"]): (n["offset"], n["stride"]) for n in blob.nodes}
    assert views == {(6,): (2, [1]), (4, 3): (0, [1, 4])}


def test_numpy_arrays_are_blobs_with_their_dtype() -> None:
    array = np.arange(6, dtype=">i4").reshape(2, 3).T
    flat = tree.flatten({"x": array})
    assert flat.items["x"] == {"ndarray": {"dtype": ">i4", "shape": [3, 2]}}
    (blob,) = flat.blobs
    assert blob.nbytes == 24
    assert bytes(blob.tensor.numpy()) == np.ascontiguousarray(array).tobytes()


def test_flat_tree_is_strict_json() -> None:
    state = {
        "model": torch.nn.Linear(2, 2),
        "optimizer": {"state": {0: {"step": torch.tensor(1.0)}}, "lr": math.nan},
        "arrays": (np.zeros(2), np.float32(1.0), b"x"),
    }
    json.dumps(tree.flatten(state).items, allow_nan=False)
