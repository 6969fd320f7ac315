"""A checkpoint is untrusted input: crafted and damaged checkpoints attack every reading
entry point (restore, verify, item_metadata, sync, the mirror, the command line).

Every case must end in a typed `CheckpointError` (or a listing that skips the step),
read and write no file outside the directories involved, run no code, and allocate no
memory a header merely claims. An audit hook watches every file opened, moved or
removed and every unpickling or process start (`confined`); a run under an address
space limit checks memory (`test_crafted_checkpoints_stay_within_memory`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import crafted
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from checkpointing import (
    CheckpointManager,
    CheckpointManagerOptions,
    CorruptCheckpointError,
)
from checkpointing.errors import CheckpointError, UnsupportedFormatError

_WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_FORBIDDEN = {
    "pickle.find_class",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "subprocess.Popen",
}
_PATH_EVENTS = {
    "open",
    "os.rename",
    "os.replace",
    "os.remove",
    "os.rmdir",
    "os.mkdir",
    "shutil.rmtree",
    "os.symlink",
    "os.link",
    "os.truncate",
    "os.chmod",
}
_seen: list[tuple[str, tuple[Any, ...]]] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _seen is not None and (event in _PATH_EVENTS or event in _FORBIDDEN):
        _seen.append((event, args))


sys.addaudithook(_audit)


@contextlib.contextmanager
def confined(*roots: Path) -> Iterator[None]:
    """Fail if the block unpickles, starts a process, or touches a path outside
    ``roots`` (reading Python's own files, for lazy imports, is allowed)."""
    global _seen
    _seen = []
    try:
        yield
    finally:
        seen, _seen = _seen, None
    allowed = [os.path.realpath(r) for r in roots]
    readable = [*allowed, *map(os.path.realpath, (sys.prefix, sys.base_prefix, *sys.path))]
    for event, args in seen:
        assert event not in _FORBIDDEN, f"{event}{args!r} while reading a checkpoint"
        named = args[1:2] if event in ("os.symlink", "os.link") else args[:2]  # made: dst
        paths = [a for a in named if isinstance(a, str | bytes | os.PathLike)]
        writes = event != "open" or (isinstance(args[2], int) and args[2] & _WRITES)
        for path in paths:
            text = os.fsdecode(path)
            if not os.path.isabs(text) or text.startswith("/proc/self/fd/"):
                continue  # relative to a folder opened without following links
            if event == "open":  # through every link: what is really read or written
                real = os.path.realpath(text)
            else:  # these act on the name itself, a link included
                folder, name = os.path.split(text)
                real = os.path.join(os.path.realpath(folder), name)
            inside = readable if not writes else allowed
            assert any(real == r or real.startswith(r + os.sep) for r in inside), (
                f"{event} {text!r} outside {allowed}"
            )


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    directory = tmp_path / "ckpt"
    crafted.save_victim(directory)
    return directory


def attacked(tmp_path: Path, attack: Any) -> tuple[Path, Path]:
    directory, outside = tmp_path / "ckpt", tmp_path / "outside"
    outside.mkdir(parents=True)
    crafted.save_victim(directory)
    attack(directory, outside)
    return directory, outside


# ------------------------------------------------------------- the fixed corpus


@pytest.mark.timeout(120)
@pytest.mark.parametrize("attack", crafted.ATTACKS, ids=lambda a: a.__name__)
def test_crafted_checkpoint_is_refused_without_harm(tmp_path: Path, attack: Any) -> None:
    directory, outside = attacked(tmp_path, attack)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    crafted.target_state()  # torch makes its caches' folders once, for the first optimizer
    with confined(directory, scratch, tmp_path / "cache"):
        os.environ["XDG_CACHE_HOME"] = str(tmp_path / "cache")
        try:
            results = crafted.exercise(directory, scratch)
        finally:
            del os.environ["XDG_CACHE_HOME"]
    assert not (outside / "PWNED").exists(), "the pickle ran"
    assert step_1_restores(directory) or attack is crafted.renamed_step
    if attack is crafted.leases_link_to_another_run:
        assert len(list((outside / "other-run-leases").iterdir())) == 2, "its leases stay"
    assert results["writer"] == "ok", results  # a trainer can always save on
    harmless = attack in (
        crafted.junk_leases,
        crafted.junk_bookkeeping,
        crafted.huge_evaluator_metric,
        crafted.huge_lease,
        crafted.leases_link_to_another_run,
        crafted.leases_not_a_folder,
        crafted.bad_optimizer_and_module_state,  # plain values, until restored into objects
    )
    if not harmless:  # the attacked step 2 (or, renamed, 3) is never restored
        attacked_step = 3 if attack is crafted.renamed_step else 2
        assert results.get(f"restore {attacked_step}", "skipped") != "ok", results
        assert results["restore"] != "ok" or attack in (
            crafted.symlinked_step_folder,  # not a step: the latest is step 1
            crafted.renamed_step,
        ), results
    for leftover in scratch.rglob("*"):
        assert crafted.SECRET not in leftover.read_bytes() if leftover.is_file() else True


def step_1_restores(directory: Path) -> bool:
    """The step the attack left alone still restores exactly."""
    with CheckpointManager(directory, crafted.READ_ONLY) as mgr:
        if 1 not in mgr.all_steps():
            return False
        restored = mgr.restore(step=1)
    assert restored is not None
    return bool(torch.equal(restored["model"]["w"], crafted.victim_state()["model"]["w"]))


def test_pickled_sharded_metadata_is_refused_by_name(tmp_path: Path) -> None:
    directory, outside = attacked(tmp_path, crafted.pickle_in_legacy_sharded_metadata)
    with CheckpointManager(directory, crafted.READ_ONLY) as mgr:
        with pytest.raises(UnsupportedFormatError, match="pickle"):
            mgr.restore(step=2)
        assert mgr.restore(step=2, items=["big"])["big"]["x"].shape == (300_000,)
        mgr.verify(2)  # its files are intact: only loading them would run code
    assert not (outside / "PWNED").exists()


@pytest.mark.parametrize("name", crafted.ESCAPES)
def test_file_names_that_leave_the_step_make_it_unreadable(tmp_path: Path, name: str) -> None:
    directory, _ = attacked(tmp_path, crafted.escape_attack(name))
    with CheckpointManager(directory, crafted.READ_ONLY) as mgr:
        assert mgr.all_steps() == [1]
        assert "not a plain file name" in mgr.unreadable_steps()[2]
        with pytest.raises(CorruptCheckpointError, match="not a plain file name"):
            mgr.restore()


@pytest.mark.parametrize(
    ("attack", "message"),
    [
        (crafted.symlinked_data_file, "symbolic link"),
        (crafted.symlinked_subfolder, "symbolic link"),
        (crafted.fifo_data_file, "not a regular file"),
    ],
    ids=["file", "folder", "fifo"],
)
@pytest.mark.timeout(60)
def test_links_and_fifos_are_not_followed(tmp_path: Path, attack: Any, message: str) -> None:
    directory, _ = attacked(tmp_path, attack)
    with CheckpointManager(directory, crafted.READ_ONLY) as mgr:
        for call in (lambda: mgr.restore(step=2), lambda: mgr.verify(2)):
            with pytest.raises(CorruptCheckpointError, match=message):
                call()


def test_a_linked_step_folder_is_not_a_step(tmp_path: Path) -> None:
    directory, _ = attacked(tmp_path, crafted.symlinked_step_folder)
    with CheckpointManager(directory, crafted.READ_ONLY) as mgr:
        assert mgr.all_steps() == [1] and not mgr.unreadable_steps()


@pytest.mark.parametrize(
    ("attack", "message"),
    [
        (crafted.huge_header_length, "header claims"),
        (crafted.entry_past_the_end, "outside the file"),
        (crafted.huge_shape, "holds .* bytes, its record says"),
        (crafted.huge_view, "reaches past"),
    ],
    ids=["header", "entry", "shape", "view"],
)
def test_claimed_sizes_are_checked_before_allocating(
    tmp_path: Path, attack: Any, message: str
) -> None:
    directory, _ = attacked(tmp_path, attack)
    with CheckpointManager(directory, crafted.READ_ONLY) as mgr:
        with pytest.raises(CorruptCheckpointError, match=message):
            mgr.restore(step=2)
        if attack in (crafted.huge_header_length, crafted.entry_past_the_end):
            with pytest.raises(CorruptCheckpointError, match=message):
                mgr.verify(2)


def test_a_deep_record_leaves_the_directory_usable(tmp_path: Path) -> None:
    for attack in (crafted.deep_record, crafted.deep_tree):
        directory, _ = attacked(tmp_path / attack.__name__, attack)
        with CheckpointManager(directory) as mgr:  # opens, and even saves
            assert mgr.all_steps() == [1] and list(mgr.unreadable_steps()) == [2]
            mgr.save(3, {"x": torch.ones(2)})


def test_a_newer_format_is_listed_and_never_silently_skipped(tmp_path: Path) -> None:
    directory, _ = attacked(tmp_path, crafted.newer_format)
    with CheckpointManager(directory, CheckpointManagerOptions(max_to_keep=1)) as mgr:
        assert "newer" in mgr.unreadable_steps()[2]
        for call in (lambda: mgr.restore(missing_ok=True), lambda: mgr.restore(step=2)):
            with pytest.raises(UnsupportedFormatError, match="upgrade"):
                call()
        mgr.save(3, {"x": torch.ones(2)})
        mgr.wait_until_finished()
        assert mgr.all_steps() == [3] and (directory / "step_00000002").exists(), (
            "retention deletes step 1, never the unreadable step"
        )
    shutil.rmtree(directory / "step_00000003")
    with (
        CheckpointManager(directory, crafted.READ_ONLY) as mgr,
        pytest.raises(UnsupportedFormatError, match="No older step is readable"),
    ):
        mgr.restore(missing_ok=True)  # never a silent fresh start


def test_junk_in_leases_never_stops_saves_or_retention(tmp_path: Path) -> None:
    directory, _ = attacked(tmp_path, crafted.junk_leases)
    with CheckpointManager(directory, CheckpointManagerOptions(max_to_keep=1)) as mgr:
        assert mgr.leased_steps() == set()
        for s in (3, 4):
            mgr.save(s, {"x": torch.ones(2)})
        mgr.wait_until_finished()
        # A folder where step 2's deletion mark goes keeps step 2 (logged); 1 and 3 go.
        assert mgr.all_steps() == [2, 4]
    assert (directory / ".leases" / "README").exists(), "foreign files are left alone"
    temporary = [p.name for p in (directory / ".leases").iterdir() if p.name.startswith(".tmp")]
    assert temporary == [".tmp-1.json-1234"], "the failed marks left nothing (that one is new)"


def test_changing_the_padding_keeps_older_steps(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, CheckpointManagerOptions(step_format_fixed_length=3)) as mgr:
        mgr.save(7, {"x": torch.ones(2)})
        mgr.record_metrics(7, {"loss": 1.0})
    with CheckpointManager(tmp_path, CheckpointManagerOptions(max_to_keep=1)) as mgr:
        assert mgr.all_steps() == [7] and mgr.metrics(7) == {"loss": 1.0}
        assert mgr.restore()["x"].tolist() == [1.0, 1.0]
        mgr.verify(7)
        assert mgr.step_directory(7).endswith("step_007")
        mgr.save(8, {"x": torch.zeros(2)})
        mgr.wait_until_finished()
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step")) == [
            "step_00000008"
        ]


def test_metrics_for_a_deleted_step_do_not_bring_it_back(tmp_path: Path) -> None:
    from checkpointing.errors import CheckpointNotFoundError

    with CheckpointManager(tmp_path) as writer:
        writer.save(1, {"x": torch.ones(2)})
        writer.wait_until_finished()
        evaluator = CheckpointManager(tmp_path, crafted.READ_ONLY)
        writer.delete(1)
        with pytest.raises(CheckpointNotFoundError, match="deleted"):
            evaluator.record_metrics(1, {"loss": 0.5})
        evaluator.close()
        assert not (tmp_path / "step_00000001").exists()
        writer.save(1, {"x": torch.ones(2)})  # the step can be saved again


def test_stale_temporary_files_are_removed_by_the_next_writer(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"x": torch.ones(2)})
    stale = [
        tmp_path / ".leases" / ".tmp-1.abc.json-12345678",
        tmp_path / "step_00000001" / ".tmp-recorded_metrics.json-12345678",
    ]
    fresh = tmp_path / "step_00000001" / ".tmp-recorded_metrics.json-87654321"
    for path in [*stale, fresh]:
        path.parent.mkdir(exist_ok=True)
        path.write_text("{}")
    for path in stale:
        os.utime(path, (0, 0))
    with CheckpointManager(tmp_path):
        assert not any(p.exists() for p in stale)
        assert fresh.exists(), "a reader may be writing it right now"


def test_corrupt_data_found_late_says_the_target_changed(tmp_path: Path) -> None:
    from checkpointing.errors import PartialRestoreError

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    with CheckpointManager(tmp_path, crafted.SYNC) as mgr:
        mgr.save(1, {"model": model})
    path = tmp_path / "step_00000001" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # in the last tensor: found after the others were read in
    path.write_bytes(data)
    target = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with CheckpointManager(tmp_path, crafted.READ_ONLY) as mgr:
        with pytest.raises(CorruptCheckpointError) as staged:
            mgr.restore({"model": target}, all_or_nothing=True)
        assert not isinstance(staged.value, PartialRestoreError)
        assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
        with pytest.raises(PartialRestoreError, match="partly overwritten") as partial:
            mgr.restore({"model": target})
        assert "checksum mismatch" in str(partial.value) and ".." not in str(partial.value)


def test_a_target_that_does_not_fit_is_left_unchanged(tmp_path: Path) -> None:
    from checkpointing.errors import TargetMismatchError

    saved = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"model": saved, "opt": torch.optim.SGD(saved.parameters(), lr=0.1)})
    other = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 5))  # last differs
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with CheckpointManager(tmp_path, crafted.READ_ONLY) as mgr:
        with pytest.raises(TargetMismatchError, match=r"1.weight: \[4, 8\] in the checkpoint"):
            mgr.restore({"model": other})
        assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
        fewer = torch.optim.SGD(list(saved.parameters())[:2], lr=0.1)
        with pytest.raises(TargetMismatchError, match="parameter groups"):
            mgr.restore({"opt": fewer})


def test_conjugate_views_keep_their_value() -> None:
    with tempfile.TemporaryDirectory() as directory:
        z = torch.tensor([1 + 2j, 3 - 4j])
        with CheckpointManager(directory) as mgr:
            mgr.save(1, {"z": z, "zc": z.conj(), "neg": torch._neg_view(z)})
            restored = mgr.restore()
        assert torch.equal(restored["zc"], z.conj().resolve_conj())
        assert torch.equal(restored["neg"], -z)
        assert torch.equal(restored["z"], z)


# --------------------------------------------------------------- generated attacks


def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(1 << 70), max_value=1 << 70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=12),
        st.sampled_from(["float32", "|O", "<f4", "model.safetensors", "../x", "nan"]),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(
                st.sampled_from(
                    [
                        "dict",
                        "tuple",
                        "tensor",
                        "ndarray",
                        "dtensor",
                        "npscalar",
                        "bytes",
                        "float",
                        "per_rank",
                        "shape",
                        "dtype",
                        "file",
                        "key",
                        "offset",
                        "stride",
                        "chunks",
                        "size",
                    ]
                )
                | st.text(max_size=5),
                inner,
                max_size=4,
            ),
        ),
        max_leaves=12,
    )


def _paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*path, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _paths(child, (*path, i))


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replace(copy[path[0]], path[1:], new)  # type: ignore[index]
    return copy


@pytest.fixture(scope="module")
def victim_body(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    directory = tmp_path_factory.mktemp("victim") / "ckpt"
    crafted.save_victim(directory)
    return directory, crafted.read_body(crafted.step(directory))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_generated_records_end_in_typed_errors(
    victim_body: tuple[Path, dict[str, Any]], data: st.DataObject
) -> None:
    """Any field of a record replaced by any JSON value, the record re-signed."""
    source, body = victim_body
    paths = list(_paths(body))
    path = data.draw(st.sampled_from(paths), label="path")
    crafted_body = _replace(body, path, data.draw(_json_values(), label="value"))
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch) / "ckpt"
        shutil.copytree(source, directory)
        folder = crafted.step(directory)
        if isinstance(crafted_body, dict):
            crafted.write_body(folder, crafted_body)
        else:
            (folder / crafted.RECORD).write_bytes(json.dumps(crafted_body).encode())
        with confined(directory), CheckpointManager(directory, crafted.READ_ONLY) as mgr:
            for call in (
                lambda: mgr.restore(step=2),
                lambda: mgr.restore(crafted.target_state(), step=2),
                lambda: mgr.item_metadata(2),
                lambda: mgr.verify(2),
            ):
                crafted.outcome(call)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=st.one_of(
        st.binary(max_size=64),
        st.dictionaries(
            st.text(max_size=4),
            st.fixed_dictionaries(
                {
                    "dtype": st.sampled_from(["F32", "U8", 7]),
                    "shape": st.lists(st.integers(-2, 1 << 40), max_size=2),
                    "data_offsets": st.lists(st.integers(-(1 << 63), 1 << 64), max_size=3),
                }
            ),
            max_size=3,
        ).map(lambda h: json.dumps(h).encode()),
    ),
    length=st.one_of(st.none(), st.integers(0, (1 << 64) - 1)),
)
def test_generated_headers_end_in_typed_errors(
    victim_body: tuple[Path, dict[str, Any]], header: bytes, length: int | None
) -> None:
    """A data file whose header is any bytes, with any claimed length; the record
    re-signed with the file's size (and its checksums, where they can be computed)."""
    source, _ = victim_body
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch) / "ckpt"
        shutil.copytree(source, directory)
        folder = crafted.step(directory)
        path = folder / "model.safetensors"
        claimed = len(header) if length is None else length
        path.write_bytes(claimed.to_bytes(8, "little") + header + b"\0" * 64)
        crafted.rewrite_record(
            folder, lambda body: crafted.refresh_checksums(body, folder, path.name)
        )
        with confined(directory), CheckpointManager(directory, crafted.READ_ONLY) as mgr:
            for call in (lambda: mgr.restore(step=2), lambda: mgr.verify(2)):
                crafted.outcome(call)


# ------------------------------------------------------------------ damage


def test_every_single_bit_flip_is_detected(tmp_path: Path) -> None:
    """Flip one random bit of one file of a step, many times over: `verify` always
    finds it; `restore` finds it or returns exactly the saved values (a flip in bytes
    it never reads: padding between tensors)."""
    crafted.save_victim(tmp_path / "ckpt")
    folder = crafted.step(tmp_path / "ckpt")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    expected = crafted.victim_state()
    rng = random.Random(0)
    flips = [(rng.choice(files), rng.random(), rng.randrange(8)) for _ in range(300)]
    flips += [(folder / crafted.RECORD, i / 60, rng.randrange(8)) for i in range(60)]
    for path, where, bit in flips:
        original = path.read_bytes()
        damaged = bytearray(original)
        damaged[int(where * len(damaged))] ^= 1 << bit
        path.write_bytes(damaged)
        try:
            with CheckpointManager(tmp_path / "ckpt", crafted.READ_ONLY) as mgr:
                assert crafted.outcome(lambda: mgr.verify(2)) != "ok", (path.name, where)
                try:
                    restored = mgr.restore(step=2)
                except CheckpointError:
                    continue
            assert_equal(restored, expected, f"{path.name}@{where}")
        finally:
            path.write_bytes(original)


def assert_equal(actual: Any, expected: Any, where: str) -> None:
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_equal(actual[key], expected[key], where)
    elif isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), where
    elif hasattr(expected, "tobytes"):
        assert actual.tobytes() == expected.tobytes() and actual.dtype == expected.dtype, where
    else:
        assert actual == expected, where


def test_crafted_checkpoints_stay_within_memory(tmp_path: Path) -> None:
    """Every crafted checkpoint, exercised under an address-space limit of 1 GiB above
    what the process had reserved: a header's claim of gigabytes fails the run."""
    tests = Path(__file__).parent
    done = subprocess.run(
        [sys.executable, str(tests / "crafted.py"), str(tmp_path), str(1 << 30)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1])["limit"] == 1 << 30


def test_the_command_line_reports_unreadable_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from checkpointing import cli

    directory, _ = attacked(tmp_path, crafted.newer_format)
    assert cli.main(["verify", str(directory), "--all"]) == 1
    out = capsys.readouterr().out
    assert "step 1: ok" in out and "step 2: " in out and "newer" in out
    assert cli.main(["verify", str(directory)]) == 1, "the newest step is step 2"
    capsys.readouterr()
    assert cli.main(["ls", str(directory)]) == 0
    assert "unreadable: " in capsys.readouterr().out
    assert cli.main(["ls", str(directory), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["step"] for row in rows] == [1, 2] and "unreadable" in rows[1]
