"""Crafted and damaged checkpoints: what an attacker (or a bad disk) hands the library.

Every attack takes a directory holding the steps `save_victim` wrote and changes it the
way an attacker who controls the directory would: commit records are re-signed (the
record checksum finds damage, not forgery), data files get sizes and checksums that
match what was planted. `exercise` then runs every reading entry point against it and
reports how each ended.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import socket
import stat
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from checkpointing import CheckpointError, CheckpointManager, CheckpointManagerOptions
from checkpointing.format import verify

RECORD = "checkpoint.json"
READ_ONLY = CheckpointManagerOptions(read_only=True, enable_async_checkpointing=False)
SYNC = CheckpointManagerOptions(enable_async_checkpointing=False)
SECRET = b"the contents of a file outside the checkpoint directory\n" * 64


def victim_state() -> dict[str, Any]:
    """Every kind of tree node, a padded file (1 MiB or more) and shared storage."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 8, generator=g)
    return {
        "model": {"w": weight, "tied": weight, "row": weight[3], "b": torch.arange(5.0)},
        "big": {"x": torch.randn(300_000, generator=g)},
        "extra": {
            "epoch": 3,
            "name": "run",
            "raw": b"\x00\x01bytes",
            "np": np.arange(6, dtype=np.int16).reshape(2, 3),
            "scalar": np.float32(1.5),
            "pair": (1, None),
            "inf": float("inf"),
        },
        "loose": torch.ones(3),
    }


def save_victim(directory: Path) -> None:
    with CheckpointManager(directory, SYNC) as mgr:
        mgr.save(1, victim_state())
        mgr.save(2, victim_state())


def step(directory: Path, n: int = 2) -> Path:
    return directory / f"step_{n:08d}"


def sign(body: dict[str, Any]) -> bytes:
    """A record's bytes as the library writes them: checksum first, then the body."""
    rest = json.dumps(body, separators=(",", ":")).encode()
    return b'{"checksum":"%s",%s' % (xxhash.xxh3_64_hexdigest(rest).encode(), rest[1:])


def read_body(folder: Path) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((folder / RECORD).read_bytes())
    body.pop("checksum", None)
    return body


def write_body(folder: Path, body: dict[str, Any]) -> None:
    (folder / RECORD).write_bytes(sign(body))


def rewrite_record(folder: Path, change: Callable[[dict[str, Any]], object]) -> None:
    body = read_body(folder)
    change(body)
    write_body(folder, body)


def file_info(path: Path, *, opaque: bool = False) -> dict[str, Any]:
    """What a record would say of ``path`` for its checksums to match."""
    with open(path, "rb") as f:
        header, checksum = verify.file_checksums(f, str(path), opaque=opaque)
    return {"size": path.stat().st_size, "header_checksum": header, "checksum": checksum}


def tensor_digest(data: bytes) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def safetensors_bytes(header: dict[str, Any], data: bytes) -> bytes:
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + data


# ------------------------------------------------------------------ the attacks


def pickle_in_legacy_sharded_metadata(directory: Path, outside: Path) -> None:
    """A version-1 step whose sharded tensors are DCP's: a ``.metadata`` pickle that
    would create ``outside/PWNED`` when unpickled."""
    folder = step(directory)
    marker = outside / "PWNED"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    (folder / "sharded").mkdir()
    (folder / "sharded" / ".metadata").write_bytes(pickle.dumps(Payload(), protocol=4))
    (folder / "sharded" / "__0_0.distcp").write_bytes(pickle.dumps(Payload()))

    def change(body: dict[str, Any]) -> None:
        body["version"] = 1
        for name in (".metadata", "__0_0.distcp"):
            body["files"][f"sharded/{name}"] = file_info(folder / "sharded" / name, opaque=True)
        node = {"dtensor": {"key": "model/s", "dtype": "float32", "shape": [4]}}
        body["items"]["model"]["dict"].append(["s", node])

    body = read_body(folder)
    change(body)
    (folder / RECORD).write_bytes(json.dumps(body).encode())  # version 1: no checksum


def escape_attack(name: str) -> Callable[[Path, Path], None]:
    def attack(directory: Path, outside: Path) -> None:
        """A record naming a file outside the step, with the secret's checksums."""
        folder = step(directory)
        secret = outside / "secret.safetensors"
        secret.write_bytes(safetensors_bytes({"x": _entry("U8", len(SECRET))}, SECRET))

        def change(body: dict[str, Any]) -> None:
            body["files"][name] = file_info(secret)
            body["items"]["stolen"] = {
                "tensor": {
                    "dtype": "uint8",
                    "shape": [len(SECRET)],
                    "file": name,
                    "key": "x",
                    "checksum": tensor_digest(SECRET),
                }
            }

        rewrite_record(folder, change)

    attack.__name__ = f"file_named_{name!r}"
    return attack


ESCAPES = ["../../secret.safetensors", "/etc/passwd", "..", "a/../../x", "C:\\x", "a\x00b", "a/b/c"]


def _entry(dtype: str, n: int, start: int = 0) -> dict[str, Any]:
    return {"dtype": dtype, "shape": [n], "data_offsets": [start, start + n]}


def symlinked_data_file(directory: Path, outside: Path) -> None:
    """A data file replaced by a link to a planted file, whose checksums the record has."""
    folder = step(directory)
    secret = outside / "planted.safetensors"
    shutil.copy(folder / "model.safetensors", secret)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(secret)


def symlinked_step_folder(directory: Path, outside: Path) -> None:
    """A whole step folder that is a link to a copy elsewhere."""
    folder = step(directory)
    shutil.copytree(folder, outside / "elsewhere")
    shutil.rmtree(folder)
    folder.symlink_to(outside / "elsewhere")


def symlinked_subfolder(directory: Path, outside: Path) -> None:
    """A sharded step whose ``sharded`` folder is a link to a copy elsewhere."""
    folder = step(directory)
    (outside / "shards").mkdir()
    shard = outside / "shards" / "rank0.safetensors"
    data = torch.arange(4.0).numpy().tobytes()
    shard.write_bytes(safetensors_bytes({"s": _entry("F32", len(data))}, data))
    (folder / "sharded").symlink_to(outside / "shards")

    def change(body: dict[str, Any]) -> None:
        body["files"]["sharded/rank0.safetensors"] = file_info(shard)
        chunk = {
            "offsets": [0],
            "sizes": [4],
            "file": "sharded/rank0.safetensors",
            "key": "s",
            "checksum": tensor_digest(data),
        }
        node = {"key": "model/s", "dtype": "float32", "shape": [4], "chunks": [chunk]}
        body["items"]["model"]["dict"].append(["s", {"dtensor": node}])

    rewrite_record(folder, change)


def fifo_data_file(directory: Path, outside: Path) -> None:
    """A data file that is a FIFO: opening it to read would wait for a writer forever."""
    target = step(directory) / "model.safetensors"
    target.unlink()
    os.mkfifo(target)


def huge_header_length(directory: Path, outside: Path) -> None:
    """A header claiming 2**62 bytes, the record re-signed to match the file."""
    folder = step(directory)
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 1 << 62)
    path.write_bytes(data)
    rewrite_record(folder, lambda body: refresh_checksums(body, folder, "model.safetensors"))


def refresh_checksums(body: dict[str, Any], folder: Path, name: str) -> None:
    """Make the record's size and checksums of ``name`` match the file; a file whose
    header cannot be parsed gets its size only (what an attacker can match)."""
    try:
        body["files"][name] = file_info(folder / name)
    except CheckpointError:
        body["files"][name]["size"] = (folder / name).stat().st_size


def entry_past_the_end(directory: Path, outside: Path) -> None:
    """A header entry whose data lies far beyond the end of the file (2 GiB)."""
    folder = step(directory)
    path = folder / "extra.safetensors"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"] = [0, 2 << 30]
    path.write_bytes(safetensors_bytes(header, data[8 + length :]))
    rewrite_record(folder, lambda body: refresh_checksums(body, folder, "extra.safetensors"))


def huge_shape(directory: Path, outside: Path) -> None:
    """A tensor whose record claims 2**40 elements."""

    def change(body: dict[str, Any]) -> None:
        (node,) = [n for k, n in body["items"]["model"]["dict"] if k == "b"]
        node["tensor"]["shape"] = [1 << 40]

    rewrite_record(step(directory), change)


def huge_view(directory: Path, outside: Path) -> None:
    """A view into shared storage whose offset and strides reach far past it."""

    def change(body: dict[str, Any]) -> None:
        (node,) = [n for k, n in body["items"]["model"]["dict"] if k == "row"]
        node["tensor"]["offset"] = 1 << 40
        node["tensor"]["stride"] = [1 << 30]

    rewrite_record(step(directory), change)


def deep_record(directory: Path, outside: Path) -> None:
    """A record nested 100,000 levels deep (json.loads recursion)."""
    (step(directory) / RECORD).write_bytes(b'{"checksum":"0000000000000000",' + b"[" * 100_000)


def deep_tree(directory: Path, outside: Path) -> None:
    """A valid record whose tree nests 500 lists deep."""
    deep: Any = 0
    for _ in range(500):
        deep = [deep]
    rewrite_record(step(directory), lambda body: body["items"].__setitem__("deep", deep))


def object_dtypes(directory: Path, outside: Path) -> None:
    """numpy scalars and arrays of Python objects: their bytes would be pointers."""

    def change(body: dict[str, Any]) -> None:
        pairs = body["items"]["extra"]["dict"]
        for key, node in pairs:
            if key == "scalar":
                node["npscalar"] = ["|O", base64.b64encode(b"\x41" * 8).decode()]
            if key == "np":
                node["ndarray"]["dtype"] = "|O"
                node["ndarray"]["shape"] = [1]

    rewrite_record(step(directory), change)


def wrong_types(directory: Path, outside: Path) -> None:
    """Fields of the wrong types wherever the record has fields."""

    def change(body: dict[str, Any]) -> None:
        body["files"]["model.safetensors"]["size"] = "big"
        body["items"]["model"] = {"dict": [[["list", "key"], 1]]}
        body["metrics"] = [1, 2]

    rewrite_record(step(directory), change)


def newer_format(directory: Path, outside: Path) -> None:
    rewrite_record(step(directory), lambda body: body.__setitem__("version", 99))


def renamed_step(directory: Path, outside: Path) -> None:
    """Step 1's folder renamed to step 3's: its record says step 1."""
    step(directory, 1).rename(step(directory, 3))


def junk_leases(directory: Path, outside: Path) -> None:
    """Stray and malformed files where reader leases live."""
    leases = directory / ".leases"
    leases.mkdir(exist_ok=True)
    (leases / "README").write_text("not a lease")
    (leases / f"2.{'a' * 32}.json").write_text("[1, 2")
    (leases / f"1.{'b' * 32}.json").write_text('{"step": "one", "expires_at": "never"}')
    (leases / "2.deleting.json").mkdir()
    (leases / ".tmp-1.json-1234").write_text("{}")


def junk_bookkeeping(directory: Path, outside: Path) -> None:
    """Malformed evaluator metrics, and a metrics file that is a link to a secret."""
    (step(directory, 1) / "recorded_metrics.json").write_text('{"loss": [[[')
    secret = outside / "metrics.json"
    secret.write_text('{"loss": 0.0}')
    (step(directory) / "recorded_metrics.json").symlink_to(secret)


# ------------------------------------------- found by an attack review of the above


def huge_numbers(directory: Path, outside: Path) -> None:
    """Integers beyond any float and far-future times where the record has numbers."""

    def change(body: dict[str, Any]) -> None:
        body["created_at"] = 10**400
        body["committed_at"] = 1e300
        body["metrics"] = {"loss": 10**400}

    rewrite_record(step(directory), change)


def huge_evaluator_metric(directory: Path, outside: Path) -> None:
    """An evaluator metric no float can hold, beside an honest step (best-N ranks it)."""
    (step(directory) / "recorded_metrics.json").write_text('{"loss": 1' + "0" * 400 + "}")


def huge_lease(directory: Path, outside: Path) -> None:
    """Leases that never expire: an integer beyond any float, and the year 3000."""
    leases = directory / ".leases"
    leases.mkdir()
    (leases / f"2.{'c' * 32}.json").write_text('{"step": 2, "expires_at": 1' + "0" * 400 + "}")
    (leases / f"1.{'d' * 32}.json").write_text('{"step": 1, "expires_at": 32503680000.0}')


def leases_link_to_another_run(directory: Path, outside: Path) -> None:
    """``.leases`` is a link to another run's leases: reading it must not delete them."""
    other = outside / "other-run-leases"
    other.mkdir()
    (other / f"7.{'e' * 32}.json").write_text('{"step": 7, "expires_at": 0}')  # expired
    (other / "README").write_text("another run's")
    (directory / ".leases").symlink_to(other)


def leases_not_a_folder(directory: Path, outside: Path) -> None:
    (directory / ".leases").write_text("a file where a folder belongs")


def sockets(directory: Path, outside: Path) -> None:
    """Sockets where the bookkeeping files, a lease and a data file belong."""
    leases = directory / ".leases"
    leases.mkdir()
    for path in (
        directory / "protected.json",
        leases / f"2.{'f' * 32}.json",
        step(directory) / "recorded_metrics.json",
        step(directory) / "extra.safetensors",
    ):
        path.unlink(missing_ok=True)
        short = Path(tempfile.mkdtemp(dir="/tmp")) / "s"  # sockets' paths are short
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(short))
        short.rename(path)
        short.parent.rmdir()


def entry_read_two_ways(directory: Path, outside: Path) -> None:
    """Two nodes reading one entry as different tensors (bytes agree, dtypes do not)."""

    def change(body: dict[str, Any]) -> None:
        (b,) = [n for k, n in body["items"]["model"]["dict"] if k == "b"]
        other = {**b["tensor"], "dtype": "int32"}
        half = {**b["tensor"], "dtype": "float16", "shape": [10]}
        body["items"]["twice"] = {"dict": [["i", {"tensor": other}], ["h", {"tensor": half}]]}

    rewrite_record(step(directory), change)


def quantized_dtype(directory: Path, outside: Path) -> None:
    """A tensor node whose dtype is quantized (reading raw bytes into one crashes)."""

    def change(body: dict[str, Any]) -> None:
        (b,) = [n for k, n in body["items"]["model"]["dict"] if k == "b"]
        b["tensor"].update(dtype="qint32")

    rewrite_record(step(directory), change)


def empty_but_huge_shapes(directory: Path, outside: Path) -> None:
    """Shapes with no element but dimensions whose strides overflow, and an empty view
    far past its storage."""

    def change(body: dict[str, Any]) -> None:
        pairs = body["items"]["model"]["dict"]
        (b,) = [n for k, n in pairs if k == "b"]
        (row,) = [n for k, n in pairs if k == "row"]
        empty = {**b["tensor"], "shape": [0, 1 << 62, 1 << 62]}
        view = {**row["tensor"], "shape": [0], "stride": [1], "offset": 1 << 61}
        body["items"]["empty"] = {"dict": [["e", {"tensor": empty}], ["v", {"tensor": view}]]}

    rewrite_record(step(directory), change)


def bad_optimizer_and_module_state(directory: Path, outside: Path) -> None:
    """An optimizer state without its groups' params, a module value that is no tensor."""

    def change(body: dict[str, Any]) -> None:
        body["items"]["opt"] = {"dict": [["state", [1, 2]], ["param_groups", 5]]}
        body["items"]["net"] = {"dict": [["weight", 7], ["bias", None]]}

    rewrite_record(step(directory), change)


def invalid_numpy_text(directory: Path, outside: Path) -> None:
    """A numpy unicode scalar whose bytes are no code point, and a datetime scalar of
    the generic unit (numpy fails on both outside any error handler)."""

    def change(body: dict[str, Any]) -> None:
        bad = base64.b64encode(b"\xff" * 4).decode()
        generic = base64.b64encode(b"\0" * 8).decode()
        node = {"dict": [["u", {"npscalar": ["<U1", bad]}], ["t", {"npscalar": ["<M8", generic]}]]}
        body["items"]["text"] = node

    rewrite_record(step(directory), change)


def chunks_sharing_an_entry(directory: Path, outside: Path) -> None:
    """A DTensor whose 64 chunks all read one entry: restoring it would allocate 64 times
    what the files hold."""
    folder = step(directory)
    data = torch.arange(1024.0).numpy().tobytes()
    (folder / "sharded").mkdir()
    shard = folder / "sharded" / "rank0.safetensors"
    shard.write_bytes(safetensors_bytes({"s": _entry("F32", len(data))}, data))

    def change(body: dict[str, Any]) -> None:
        body["files"]["sharded/rank0.safetensors"] = file_info(shard)
        chunks = [
            {"offsets": [i * 1024], "sizes": [1024], "file": "sharded/rank0.safetensors",
             "key": "s", "checksum": tensor_digest(data)}
            for i in range(64)
        ]  # fmt: skip
        node = {"key": "big", "dtype": "float32", "shape": [64 * 1024], "chunks": chunks}
        body["items"]["big"] = {"dtensor": node}

    rewrite_record(folder, change)


def file_and_folder(directory: Path, outside: Path) -> None:
    """A name that is a file and the folder of another (a copy cannot make both)."""

    def change(body: dict[str, Any]) -> None:
        info = body["files"]["model.safetensors"]
        body["files"]["sharded"] = info
        body["files"]["sharded/rank0.safetensors"] = info

    rewrite_record(step(directory), change)


def oversized_record(directory: Path, outside: Path) -> None:
    """A record of millions of empty lists: parsing it would take gigabytes."""

    def change(body: dict[str, Any]) -> None:
        body["metadata"] = {"junk": [[]] * 5_000_000}

    rewrite_record(step(directory), change)


ATTACKS: list[Callable[[Path, Path], None]] = [
    pickle_in_legacy_sharded_metadata,
    *(escape_attack(name) for name in ESCAPES),
    symlinked_data_file,
    symlinked_step_folder,
    symlinked_subfolder,
    fifo_data_file,
    huge_header_length,
    entry_past_the_end,
    huge_shape,
    huge_view,
    deep_record,
    deep_tree,
    object_dtypes,
    wrong_types,
    newer_format,
    renamed_step,
    junk_leases,
    junk_bookkeeping,
    huge_numbers,
    huge_evaluator_metric,
    huge_lease,
    leases_link_to_another_run,
    leases_not_a_folder,
    sockets,
    entry_read_two_ways,
    quantized_dtype,
    empty_but_huge_shapes,
    bad_optimizer_and_module_state,
    invalid_numpy_text,
    chunks_sharing_an_entry,
    file_and_folder,
    oversized_record,
]


# ------------------------------------------------------------------ exercising


def outcome(call: Callable[[], object]) -> str:
    """ "ok", or the name of the `CheckpointError` raised; anything else propagates."""
    try:
        call()
    except CheckpointError as e:
        return type(e).__name__
    return "ok"


def exercise(directory: Path, scratch: Path) -> dict[str, str]:
    """Every reading entry point against ``directory``: restores (latest, each step,
    into a target, all or nothing), metadata, verification, copies (sync, a mirror's
    download, a remote step's cached download) and the command line."""
    from checkpointing import cli

    results: dict[str, str] = {}
    with CheckpointManager(directory, READ_ONLY) as mgr:
        steps = [*mgr.all_steps(), *mgr.unreadable_steps()]
        results["restore"] = outcome(lambda: mgr.restore())
        for s in steps:
            results[f"restore {s}"] = outcome(lambda s=s: mgr.restore(step=s))
            for staged in (False, True):
                results[f"restore {s} into{' staged' * staged}"] = outcome(
                    lambda s=s, staged=staged: mgr.restore(
                        target_state(), step=s, all_or_nothing=staged
                    )
                )
            results[f"metrics {s}"] = outcome(lambda s=s: mgr.metrics(s))
            results[f"metadata {s}"] = outcome(lambda s=s: mgr.item_metadata(s))
            results[f"verify {s}"] = outcome(lambda s=s: mgr.verify(s))
        results["leases"] = outcome(mgr.leased_steps)
        results["report"] = outcome(mgr.retention_report)
    copy = scratch / "copy"
    results["sync"] = outcome(lambda: _sync(directory, copy))
    for argv in (["ls"], ["inspect"], ["verify", "--all"]):
        code = cli.main([argv[0], str(directory), *argv[1:]])
        assert code in (0, 1, 2), (argv, code)
        results[f"cli {argv[0]}"] = str(code)
    for item in ("model", "extra", "big"):
        code = cli.main(["export", str(directory), "--item", item, str(scratch / item)])
        assert code in (0, 2), (item, code)
    results["mirror"] = outcome(lambda: _mirror_download(directory, scratch))
    results["writer"] = outcome(lambda: _save_with_retention(directory, scratch / "writer"))
    return results


def _save_with_retention(directory: Path, copy: Path) -> None:
    """A trainer opening a copy of ``directory`` with best-N retention and saving."""
    _copy_tree(directory, copy)
    options = CheckpointManagerOptions(
        enable_async_checkpointing=False, max_to_keep=1, best_metric="loss"
    )
    with CheckpointManager(copy, options) as mgr:
        mgr.save(10**6, {"x": torch.ones(2)}, metrics={"loss": 1.0})  # a step no attack took
        mgr.best_step()


def _copy_tree(source: Path, destination: Path) -> None:
    """Regular files and links as they are, FIFOs made anew, sockets left out: a copy
    that never opens anything but a regular file."""
    for folder, folders, files in os.walk(source):
        into = destination / Path(folder).relative_to(source)
        into.mkdir(parents=True, exist_ok=True)
        for name in [*folders, *files]:
            path, target = Path(folder, name), into / name
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                target.symlink_to(os.readlink(path))
                folders[:] = [f for f in folders if f != name]
            elif stat.S_ISFIFO(mode):
                os.mkfifo(target)
            elif stat.S_ISREG(mode):
                shutil.copyfile(path, target)


def target_state() -> dict[str, Any]:
    """What a trainer restores into: the victim's items, a module and an optimizer."""
    state = victim_state()
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    return {**{k: v for k, v in state.items() if k != "extra"}, "net": net, "opt": opt}


def _sync(source: Path, destination: Path) -> None:
    with CheckpointManager(source, READ_ONLY) as src, CheckpointManager(destination) as dst:
        src.copy_to(dst)


def _mirror_download(directory: Path, scratch: Path) -> None:
    """A mirrored manager whose remote tier is the crafted directory restores every
    remote step (a download into its local directory, then a read)."""
    local = scratch / "mirror-local"
    with CheckpointManager(
        local,
        CheckpointManagerOptions(enable_async_checkpointing=False),
        remote=f"file://{directory}",
        remote_retention=None,
    ) as mgr:
        for s in mgr.all_steps():
            outcome(lambda s=s: mgr.restore(step=s))


if __name__ == "__main__":  # the memory-bounded run of test_untrusted.py
    import resource

    root = Path(sys.argv[1])
    limit = int(sys.argv[2])
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    for i, attack in enumerate(ATTACKS):
        directory, outside = root / f"{i}" / "ckpt", root / f"{i}" / "outside"
        outside.mkdir(parents=True)
        save_victim(directory)
        attack(directory, outside)
    exercise(root / "0" / "ckpt", root / "warm")  # threads and pools, before the limit
    with open("/proc/self/status") as status:
        vm = next(int(line.split()[1]) << 10 for line in status if line.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + limit, hard))
    for i in range(len(ATTACKS)):
        exercise(root / f"{i}" / "ckpt", root / f"{i}" / "scratch")
    print(json.dumps({"vm": vm, "limit": limit}))
