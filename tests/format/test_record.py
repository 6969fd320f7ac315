"""The commit record: JSON round trip, version and garbage rejection, and the conversion
of metrics/metadata to strict JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xxhash

from checkpointing import CheckpointManager, CheckpointManagerOptions
from checkpointing.errors import (
    CorruptCheckpointError,
    InvalidOptionError,
    UnsupportedFormatError,
)
from checkpointing.format.record import (
    FORMAT_NAME,
    FORMAT_VERSION,
    PLAIN_VERSION,
    RECORD_NAME,
    FileInfo,
    Record,
    from_json_value,
    to_json_value,
)

WHERE = "/ckpt/step_00000007/checkpoint.json"


DIGEST = "0123456789abcdef"


def sample_record(**overrides: Any) -> Record:
    tensor = {"dtype": "float32", "shape": [2, 3], "file": "model.safetensors", "key": "w"}
    fields: dict[str, Any] = {
        "step": 7,
        "created_at": 1_700_000_000.25,
        "committed_at": 1_700_000_003.5,
        "items": {
            "model": {"dict": [["w", {"tensor": {**tensor, "checksum": DIGEST}}]]},
            "extra": {"dict": [[1, {"tuple": [1, "a", None, {"float": "nan"}]}]]},
            "epoch": 3,
        },
        "files": {"model.safetensors": FileInfo(128, header_checksum=DIGEST, checksum=DIGEST)},
        "metrics": {"loss": 0.5, "acc": "nan"},
        "metadata": {"run": "exp1", "tags": ["a", "b"]},
    }
    return Record(**{**fields, **overrides})


def signed(body: dict[str, Any]) -> bytes:
    """A record's bytes with a correct checksum, whatever its body holds."""
    rest = json.dumps(body, separators=(",", ":")).encode()
    return b'{"checksum":"%s",%s' % (xxhash.xxh3_64_hexdigest(rest).encode(), rest[1:])


def record_body(**overrides: Any) -> bytes:
    """A valid serialized record with top-level fields replaced, checksum included."""
    body = json.loads(sample_record().to_json())
    del body["checksum"]
    return signed({**body, **overrides})


def strict_loads(data: bytes) -> Any:
    def reject(constant: str) -> None:
        raise AssertionError(f"record is not strict JSON: contains {constant}")

    return json.loads(data, parse_constant=reject)


# ------------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    "record",
    [sample_record(), sample_record(metrics=None, metadata=None, items={}, files={})],
    ids=["full", "empty"],
)
def test_record_json_round_trip(record: Record) -> None:
    data = record.to_json()
    assert Record.from_json(data, WHERE) == record


def test_record_json_is_strict_and_self_describing() -> None:
    body = strict_loads(sample_record().to_json())
    assert body["format"] == FORMAT_NAME
    assert body["version"] == PLAIN_VERSION  # readers of version 2 read what has no references
    assert "references" not in body
    assert body["checksum_algorithm"] == "xxh3_64"
    assert body["torch_version"] == torch.__version__
    assert body["files"]["model.safetensors"] == {
        "size": 128,
        "header_checksum": DIGEST,
        "checksum": DIGEST,
    }


def incremental_record(**overrides: Any) -> Record:
    """Step 7 reads tensor ``b`` from step 3's ``model.safetensors`` (an incremental save)."""
    old = {"dtype": "float32", "shape": [4], "file": "model.safetensors", "key": "b",
           "checksum": DIGEST, "step": 3}
    record = sample_record()
    items = {**record.items, "frozen": {"dict": [["b", {"tensor": old}]]}}
    info = FileInfo(256, header_checksum=DIGEST, checksum=DIGEST)
    return sample_record(items=items, references={3: {"model.safetensors": info}}, **overrides)


def test_references_round_trip_as_version_3() -> None:
    record = incremental_record()
    body = strict_loads(record.to_json())
    assert body["version"] == FORMAT_VERSION == 3
    assert body["references"] == {"3": {"model.safetensors": {
        "size": 256, "header_checksum": DIGEST, "checksum": DIGEST}}}
    again = Record.from_json(record.to_json(), WHERE)
    assert again.references == record.references and again.items == record.items


def test_crafted_references_are_refused() -> None:
    body = json.loads(incremental_record().to_json())
    del body["checksum"]

    def parsed(**changes: Any) -> Record:
        return Record.from_json(signed({**body, **changes}), WHERE)

    parsed()  # the unchanged body is fine
    refs = body["references"]
    frozen = body["items"]["frozen"]
    node = frozen["dict"][0][1]["tensor"]
    for changes, where in [
        ({"references": {"7": refs["3"]}}, "references/7"),  # not earlier than the step
        ({"references": {"9": refs["3"]}}, "references/9"),  # later
        ({"references": {"03": refs["3"]}}, "references/03"),
        ({"references": {"-1": refs["3"]}}, "references/-1"),
        ({"references": {"3": {}}}, "references/3"),
        ({"references": {"3": {"../x.safetensors": refs["3"]["model.safetensors"]}}},
         "references/3/../x.safetensors"),
        ({"references": []}, "references"),
        ({"version": 2}, "references"),  # a version-2 record has none
        ({"items": {"frozen": {"dict": [["b", {"tensor": {**node, "step": 4}}]]}}},
         "items/frozen"),  # a step it does not list
        ({"items": {"frozen": {"dict": [["b", {"tensor": {**node, "step": "3"}}]]}}},
         "items/frozen"),
        ({"items": {"frozen": {"dict": [["b", {"tensor": {**node, "file": "o.safetensors"}}]]}}},
         "items/frozen"),  # a file of step 3 it does not list
    ]:
        with pytest.raises(CorruptCheckpointError, match="malformed") as info:
            parsed(**changes)
        assert where in str(info.value), (changes, str(info.value))


def test_a_sharded_tensors_chunks_may_read_earlier_steps() -> None:
    """An incremental save of DTensors: each stored chunk may live in an earlier step's
    file of that process; the same checks as for tensors hold."""
    info = FileInfo(256, header_checksum=DIGEST, checksum=DIGEST)
    shard = "sharded/rank0.safetensors"

    def chunk(row: int, **extra: Any) -> dict[str, Any]:
        return {"offsets": [row, 0], "sizes": [2, 4], "file": shard, "key": f"w@{row}",
                "checksum": DIGEST, **extra}

    def record(*chunks: dict[str, Any], **overrides: Any) -> bytes:
        base = sample_record()
        dtensor = {"dtensor": {"dtype": "float32", "shape": [4, 4], "key": "w",
                               "chunks": list(chunks)}}
        items = {**base.items, "sharded": {"dict": [["w", dtensor]]}}
        files = {**base.files, shard: info}
        out = sample_record(items=items, files=files, references={3: {shard: info}})
        body = json.loads(out.to_json())
        del body["checksum"]
        return signed({**body, **overrides})

    again = Record.from_json(record(chunk(0, step=3), chunk(2)), WHERE)
    chunks = again.items["sharded"]["dict"][0][1]["dtensor"]["chunks"]
    assert [c.get("step") for c in chunks] == [3, None]
    for bad in (
        record(chunk(0, step=5), chunk(2)),  # a step the record does not list
        record(chunk(0, step=3, file="sharded/rank1.safetensors"), chunk(2)),  # nor file
        record(chunk(0, step=3), chunk(2, step=3, key="w@0")),  # one entry, two places
    ):
        with pytest.raises(CorruptCheckpointError, match="malformed"):
            Record.from_json(bad, WHERE)


def test_int_dict_keys_in_items_survive_as_pairs() -> None:
    restored = Record.from_json(sample_record().to_json(), WHERE)
    ((key, _),) = restored.items["extra"]["dict"]
    assert key == 1 and type(key) is int, "dict pairs keep int keys through JSON"


def test_older_or_equal_version_is_read() -> None:
    for version in range(1, FORMAT_VERSION + 1):
        assert Record.from_json(record_body(version=version), WHERE).version == version


def test_version_1_records_are_read_without_a_checksum() -> None:
    body = json.loads(record_body(version=1))
    del body["checksum"]
    assert Record.from_json(json.dumps(body).encode(), WHERE).step == 7


def test_a_record_checks_itself() -> None:
    data = sample_record().to_json()
    assert data.startswith(b'{"checksum":"')
    assert json.loads(data)["checksum"] == xxhash.xxh3_64_hexdigest(b"{" + data[31:])
    damaged = data.replace(b'"epoch":3', b'"epoch":2')
    with pytest.raises(CorruptCheckpointError, match="fails its checksum"):
        Record.from_json(damaged, WHERE)
    unsigned = json.loads(data)
    del unsigned["checksum"]
    with pytest.raises(CorruptCheckpointError, match="without its checksum"):
        Record.from_json(json.dumps(unsigned).encode(), WHERE)


# -------------------------------------------------------------------- rejection


def test_newer_version_is_rejected_with_upgrade_hint() -> None:
    newer = record_body(version=FORMAT_VERSION + 1)
    with pytest.raises(UnsupportedFormatError, match="newer") as info:
        Record.from_json(newer, WHERE)
    assert WHERE in str(info.value), "the error names the record's location"
    assert "upgrade" in str(info.value)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe\x00",
        b"{",
        b"not json",
        b'{"format": "checkpointing"}',
        record_body(format="orbax"),
        json.dumps({k: v for k, v in json.loads(record_body()).items() if k != "items"}).encode(),
        record_body(version="2"),
        record_body(step="seven"),
        record_body(created_at=None),
        record_body(files={"a.safetensors": {"size": 1}}),
        record_body(files={"a.safetensors": [1, 2, 3]}),
        record_body(files={"a.safetensors": {"size": 1, "header_checksum": "a", "x": "b"}}),
    ],
    ids=[
        "empty",
        "binary",
        "truncated",
        "text",
        "only-format",
        "foreign-format",
        "missing-items",
        "version-str",
        "step-str",
        "created-null",
        "fileinfo-missing-fields",
        "fileinfo-list",
        "fileinfo-extra-field",
    ],
)
def test_garbage_is_rejected_as_corrupt(data: bytes) -> None:
    with pytest.raises(CorruptCheckpointError, match=WHERE):
        Record.from_json(data, WHERE)


@pytest.mark.parametrize(
    "data",
    [b"[]", b"null", b"42", b'"checkpointing"', record_body(files=[])],
    ids=["list", "null", "number", "string", "files-list"],
)
def test_non_object_json_is_rejected_as_corrupt(data: bytes) -> None:
    with pytest.raises(CorruptCheckpointError):
        Record.from_json(data, WHERE)


# ---------------------------------------------------------------------- metrics


def test_metrics_numbers_from_tensors_and_numpy_become_python_numbers() -> None:
    converted = to_json_value(
        {
            "loss": torch.tensor(0.5),
            "bf16": torch.tensor(1.5, dtype=torch.bfloat16),
            "one_elem": torch.tensor([[2.0]]),
            "count": torch.tensor(7),
            "flag": torch.tensor(True),
            "np_f32": np.float32(0.25),
            "np_f64": np.float64(0.125),
            "np_i64": np.int64(3),
            "np_u8": np.uint8(255),
            "np_bool": np.bool_(False),
            "np_arr": np.array([4.0]),
            "np_0d": np.array(5),
            "py": [1, 2.5, True, None, "s"],
            "nested": {"t": (torch.tensor(1.0), np.int32(2))},
        },
        "metrics",
    )
    expected = {
        "loss": 0.5,
        "bf16": 1.5,
        "one_elem": 2.0,
        "count": 7,
        "flag": True,
        "np_f32": 0.25,
        "np_f64": 0.125,
        "np_i64": 3,
        "np_u8": 255,
        "np_bool": False,
        "np_arr": 4.0,
        "np_0d": 5,
        "py": [1, 2.5, True, None, "s"],
        "nested": {"t": [1.0, 2]},
    }
    assert converted == expected
    for key, value in expected.items():
        assert type(converted[key]) is type(value), f"{key}: {type(converted[key])}"
    assert type(converted["nested"]["t"][1]) is int
    json.dumps(converted, allow_nan=False)  # plain JSON, nothing numpy or torch left


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (math.nan, "nan"),
        (math.inf, "inf"),
        (-math.inf, "-inf"),
        (torch.tensor(math.nan), "nan"),
        (torch.tensor(-math.inf, dtype=torch.float16), "-inf"),
        (np.float32(math.inf), "inf"),
        (np.float64(-math.inf), "-inf"),
        (np.array([math.nan]), "nan"),
    ],
)
def test_non_finite_metrics_are_tagged_and_come_back(value: Any, expected: str) -> None:
    stored = to_json_value({"m": value}, "metrics")
    assert stored == {"m": {"$float": expected}}
    back = from_json_value(stored)["m"]
    assert isinstance(back, float) and repr(back) == expected
    # A user's own strings and dicts are left alone
    assert from_json_value({"m": "nan", "d": {"$float": "x"}}) == {"m": "nan", "d": {"$float": "x"}}


@pytest.mark.parametrize(
    "value",
    [
        {1: 0.5},
        {"nested": {("a",): 1}},
        {"t": torch.ones(2)},
        {"a": np.zeros(3)},
        {"t": torch.ones(0)},
        {"o": object()},
        {"c": 1 + 2j},
        {"b": b"bytes"},
    ],
    ids=["int-key", "tuple-key", "tensor", "ndarray", "empty-tensor", "object", "complex", "bytes"],
)
def test_metrics_that_are_not_json_numbers_are_rejected(value: dict[Any, Any]) -> None:
    with pytest.raises(InvalidOptionError, match="metrics"):
        to_json_value(value, "metrics")


def test_manager_stores_converted_metrics_and_metadata_as_strict_json(tmp_path: Path) -> None:
    opts = CheckpointManagerOptions(enable_async_checkpointing=False)
    metrics = {"loss": torch.tensor(math.nan), "acc": np.float32(0.75), "n": np.int64(4)}
    with CheckpointManager(tmp_path, opts) as mgr:
        mgr.save(3, {"x": torch.ones(1)}, metrics=metrics, metadata={"inf": math.inf})
        got = mgr.metrics(3)
        assert got is not None and math.isnan(got.pop("loss")) and got == {"acc": 0.75, "n": 4}
    on_disk = strict_loads((tmp_path / "step_00000003" / RECORD_NAME).read_bytes())
    assert on_disk["metrics"] == {"loss": {"$float": "nan"}, "acc": 0.75, "n": 4}
    assert on_disk["metadata"] == {"inf": {"$float": "inf"}}
    with CheckpointManager(tmp_path, CheckpointManagerOptions(read_only=True)) as reader:
        got = reader.metrics(3)
        assert got is not None and math.isnan(got.pop("loss")) and got == {"acc": 0.75, "n": 4}
        assert reader.metadata(3) == {"inf": math.inf}
