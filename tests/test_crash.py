"""Crash safety, corruption detection and the writer lock, against real processes and files.

The SIGKILL test needs ~40 fresh saving processes. Importing torch costs ~1.5 s, so a
helper process (this file run as a script) imports it once and forks one saving child
per restart; the test kills those children, which are ordinary separate processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import pytest
import torch

from checkpointing import (
    CheckpointManager,
    CheckpointManagerOptions,
    CorruptCheckpointError,
    DirectoryLockedError,
    ReadOnlyError,
    StepAlreadyExistsError,
)

CRASH_OPTIONS = CheckpointManagerOptions(enable_async_checkpointing=False, max_to_keep=3)
# Incremental saves: the frozen item is written once, then read from that step's files.
INCREMENTAL = dataclasses.replace(CRASH_OPTIONS, incremental=True)
SYNC = CheckpointManagerOptions(enable_async_checkpointing=False)
READ_ONLY = CheckpointManagerOptions(enable_async_checkpointing=False, read_only=True)
KILLS = 36
RECORD = "checkpoint.json"


# ------------------------------------------------------------------ state and checks


def make_state(step: int, frozen: bool = False) -> dict[str, Any]:
    """~5 MB across a model, its AdamW state and loose tensors, all derived from ``step``
    (and with ``frozen``, ~2 MB more that are the same at every step).

    Only seeded sampling and elementwise ops, so every process gets the same bits.
    """
    gen = torch.Generator().manual_seed(step)
    model = torch.nn.Sequential(
        torch.nn.Linear(384, 384),
        torch.nn.Tanh(),
        torch.nn.Linear(384, 384),
        torch.nn.Linear(384, 256),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    optimizer.step()
    extra = {
        "step": step,
        "ids": torch.randint(0, 2**40, (4096,), generator=gen),
        "half": torch.randn(8192, generator=gen).to(torch.bfloat16),
        "tag": f"step-{step}",
    }
    state = {"model": model, "optimizer": optimizer, "extra": extra}
    if frozen:
        base = torch.Generator().manual_seed(12345)
        state["frozen"] = {"base": torch.randn(512, 1024, generator=base)}
    return state


def expected_restore(state: Mapping[str, Any]) -> dict[str, Any]:
    """What ``restore()`` without a target returns for ``state``."""
    return {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}


def assert_same(actual: Any, expected: Any, path: str = "") -> None:
    """Structural equality; tensors must match dtype, shape and every byte."""
    where = path or "<root>"
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: expected a tensor, got {actual!r}"
        assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), (
            f"{where}: {actual.dtype}{list(actual.shape)} != {expected.dtype}{list(expected.shape)}"
        )
        assert torch.equal(_bytes_of(actual), _bytes_of(expected)), f"{where}: bytes differ"
    elif isinstance(expected, Mapping):
        assert isinstance(actual, Mapping), f"{where}: expected a mapping, got {actual!r}"
        assert set(actual) == set(expected), f"{where}: keys {set(actual)} != {set(expected)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{path}/{key}")
    elif isinstance(expected, list | tuple):
        assert type(actual) is type(expected) and len(actual) == len(expected), (
            f"{where}: {actual!r} != {expected!r}"
        )
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{path}/{i}")
    else:
        assert type(actual) is type(expected) and actual == expected, (
            f"{where}: {actual!r} != {expected!r}"
        )


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def tmp_entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".tmp-"))


def visible_entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


# ------------------------------------------------------------ the saving child processes


def _emit(line: str) -> None:
    os.write(1, f"{line}\n".encode())  # one write per line: atomic on a pipe


def _save_forever(directory: Path, first_step: int, incremental: bool) -> None:
    with CheckpointManager(directory, INCREMENTAL if incremental else CRASH_OPTIONS) as mgr:
        for step in itertools.count(first_step):
            state = make_state(step, frozen=incremental)
            _emit(f"saving {step}")
            mgr.save(step, state)
            _emit(f"saved {step}")


def _zygote_main() -> None:
    """Per stdin command, fork a child that saves forever; report its pid and wait status."""
    torch.set_num_threads(1)  # no thread pool to lose in fork()
    make_state(0)  # warm up: the first optimizer step costs seconds of lazy imports
    while line := sys.stdin.readline():
        command = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                _save_forever(
                    Path(command["directory"]), command["first_step"], command["incremental"]
                )
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
            finally:
                os._exit(1)
        _emit(f"pid {pid}")
        _, status = os.waitpid(pid, 0)
        _emit(f"dead {pid} {status}")


@dataclasses.dataclass
class ChildRun:
    pid: int
    started: int | None = None  # highest step announced with "saving"
    saved: int | None = None  # highest step whose save() returned
    saving_at: float = 0.0  # monotonic time of the last "saving" line


def _note(run: ChildRun, word: str, step: int) -> None:
    if word == "saving":
        run.started, run.saving_at = step, time.monotonic()
    else:
        run.saved = step


class Zygote:
    """Parent side of `_zygote_main`."""

    def __init__(self, stderr_path: Path) -> None:
        self._stderr_path = stderr_path
        with stderr_path.open("wb") as err:
            self._proc = subprocess.Popen(
                [sys.executable, __file__],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._stdin: IO[bytes] = self._proc.stdin
        self._fd = self._proc.stdout.fileno()
        self._buf = b""
        self.run: ChildRun | None = None

    def stderr_tail(self) -> str:
        return self._stderr_path.read_text(errors="replace")[-3000:]

    def _readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._fd], [], [], left)[0]:
                raise AssertionError(
                    f"no word from the child in {timeout} s:\n{self.stderr_tail()}"
                )
            chunk = os.read(self._fd, 4096)
            if not chunk:
                raise AssertionError(f"the helper process died:\n{self.stderr_tail()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def start(self, directory: Path, first_step: int, incremental: bool = False) -> ChildRun:
        command = {"directory": str(directory), "first_step": first_step}
        command["incremental"] = incremental
        self._stdin.write(json.dumps(command).encode() + b"\n")
        self._stdin.flush()
        word, pid = self._readline(60).split()
        assert word == "pid", word
        self.run = ChildRun(int(pid))
        return self.run

    def next_event(self, timeout: float = 30) -> tuple[str, int]:
        """The next "saving N" / "saved N" of the running child."""
        assert self.run is not None
        word, *args = self._readline(timeout).split()
        if word == "dead":
            raise AssertionError(f"the saving child died on its own:\n{self.stderr_tail()}")
        step = int(args[0])
        _note(self.run, word, step)
        return word, step

    def kill(self) -> ChildRun:
        """SIGKILL the running child and collect what it said before dying."""
        run, self.run = self.run, None
        assert run is not None
        with contextlib.suppress(ProcessLookupError):  # died on its own: the status says how
            os.kill(run.pid, signal.SIGKILL)
        while True:
            word, *args = self._readline(30).split()
            if word == "dead":
                break
            _note(run, word, int(args[0]))
        status = int(args[1])
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
            f"child {run.pid} was not killed by SIGKILL (status {status}):\n{self.stderr_tail()}"
        )
        return run

    def close(self) -> None:
        if self.run is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.run.pid, signal.SIGKILL)
        self._stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


@pytest.fixture
def zygote(tmp_path: Path) -> Iterator[Zygote]:
    helper = Zygote(tmp_path / "child-stderr.txt")
    try:
        yield helper
    finally:
        helper.close()


# ------------------------------------------------------------------------- the tests


def _check_after_crash(
    directory: Path, run: ChildRun, incremental: bool = False
) -> tuple[int, str]:
    """Open a writer on the crashed directory and check it; return (latest step, phase).
    Incremental: every listed step restores (none lost a step it reads from)."""
    leftovers = tmp_entries(directory)
    mgr = CheckpointManager(directory, INCREMENTAL if incremental else CRASH_OPTIONS)
    try:
        assert tmp_entries(directory) == [], f"start-up left {tmp_entries(directory)}"
        steps = mgr.all_steps()
        names = {f"step_{s:08d}" for s in steps}
        assert set(visible_entries(directory)) == names, (
            f"step directories {visible_entries(directory)} != listed steps {steps}"
        )
        assert all((directory / n / RECORD).is_file() for n in names), f"a step lacks {RECORD}"
        latest = mgr.latest_step()
        assert latest is not None, f"no checkpoint left after killing child {run}"
        assert run.started is None or latest <= run.started, f"latest {latest} was never saved"
        assert run.saved is None or latest >= run.saved, (
            f"latest {latest} is older than step {run.saved}, whose save() had returned"
        )
        for step in steps if incremental else [latest]:
            assert_same(mgr.restore(step=step), expected_restore(make_state(step, incremental)))
    finally:
        mgr.close()
    if any("-deleting-" in n for n in leftovers):
        phase = "retention delete"
    elif leftovers:
        phase = "writing files / commit"
    elif len(steps) > 3 + incremental:  # + the step holding the frozen item
        phase = "after commit, before retention"
    elif run.saved == run.started:
        phase = "between saves"
    elif latest == run.started:
        phase = "after retention"
    else:
        phase = "before the first file"
    return latest, phase


@pytest.mark.parametrize("incremental", [False, True], ids=["full", "incremental"])
def test_sigkill_at_random_moments_leaves_only_complete_steps(
    tmp_path: Path, zygote: Zygote, incremental: bool
) -> None:
    directory = tmp_path / "ckpt"
    rng = random.Random(20240611)
    make_state(0)  # pay the first optimizer's lazy imports while the helper process does

    # An undisturbed run measures a typical save duration (it includes retention deletes).
    zygote.start(directory, 0, incremental)
    durations: list[float] = []
    while len(durations) < 5:
        word, _ = zygote.next_event()
        if word == "saved":
            assert zygote.run is not None
            durations.append(time.monotonic() - zygote.run.saving_at)
    # Incremental: each child's first save is complete, like the first of this run.
    typical = durations[0] if incremental else sorted(durations)[len(durations) // 2]
    run = zygote.kill()
    latest, _ = _check_after_crash(directory, run, incremental)

    # Kill delays stratified over [0, 1.3] save durations: before, during and after a save.
    fractions = [(i + rng.random()) * 1.3 / KILLS for i in range(KILLS)]
    rng.shuffle(fractions)
    phases: Counter[str] = Counter()
    for fraction in fractions:
        zygote.start(directory, latest + 1, incremental)
        while zygote.next_event()[0] != "saving":
            pass
        time.sleep(fraction * typical)
        run = zygote.kill()
        latest, phase = _check_after_crash(directory, run, incremental)
        phases[phase] += 1
    print(f"typical save {typical * 1e3:.1f} ms; kills by phase: {dict(phases)}")
    assert phases["writing files / commit"] >= 3, f"too few kills landed mid-save: {phases}"
    with CheckpointManager(directory, READ_ONLY) as reader:
        kept = reader.all_steps()
    # Every step 0..latest was committed once (steps only grow); retention removed some.
    assert len(kept) < latest + 1, f"retention never deleted a step: {kept}"


@pytest.fixture
def saved_dir(tmp_path: Path) -> Path:
    """A directory with steps 1 and 2 of a small two-item state."""
    directory = tmp_path / "ckpt"
    with CheckpointManager(directory, SYNC) as mgr:
        for step in (1, 2):
            mgr.save(step, small_state(step))
    return directory


def small_state(step: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(step)
    return {
        "weights": {"a": torch.randn(1000, generator=gen), "b": torch.arange(500) * step},
        "other": {"c": torch.full((10,), float(step))},
    }


def test_read_only_manager_never_cleans_or_locks(saved_dir: Path, tmp_path: Path) -> None:
    (saved_dir / ".lock").unlink(missing_ok=True)
    for name in (".tmp-step_00000003-0123abcd", ".tmp-step_00000001-deleting-89abcdef"):
        (saved_dir / name).mkdir()
        (saved_dir / name / "w.safetensors").write_bytes(b"partial")
    (saved_dir / ".tmp-protected.json-deadbeef").write_bytes(b"[")
    before = sorted(os.listdir(saved_dir))

    reader = CheckpointManager(saved_dir, READ_ONLY)
    try:
        reader.reload()
        assert reader.all_steps() == [1, 2]
        assert_same(reader.restore(step=1), small_state(1))
        with pytest.raises(ReadOnlyError):
            reader.save(3, small_state(3))
        with pytest.raises(ReadOnlyError):
            reader.delete(1)
        assert sorted(os.listdir(saved_dir)) == before, "a read-only manager changed the directory"
        # It holds no lock: a writer opens alongside (and cleans up, being a writer).
        with CheckpointManager(saved_dir, SYNC) as writer:
            assert tmp_entries(saved_dir) == []
            writer.save(3, small_state(3))
        reader.reload()
        assert reader.all_steps() == [1, 2, 3]
    finally:
        reader.close()

    absent = tmp_path / "absent"
    with CheckpointManager(absent, READ_ONLY) as reader:
        assert reader.restore(missing_ok=True) is None
    assert not absent.exists(), "a read-only manager created its directory"


_LOCK_PROBE = """
import json, sys
from checkpointing import CheckpointManager, CheckpointManagerOptions, DirectoryLockedError
opts = CheckpointManagerOptions(enable_async_checkpointing=False)
try:
    CheckpointManager(sys.argv[1], opts)
    writer = "opened"
except DirectoryLockedError:
    writer = "DirectoryLockedError"
with CheckpointManager(sys.argv[1], CheckpointManagerOptions(read_only=True)) as reader:
    value = reader.restore(items=["other"])["other"]["c"].tolist()
    print(json.dumps({"writer": writer, "steps": reader.all_steps(), "value": value}))
"""


def test_second_writer_is_locked_out_readers_are_not(saved_dir: Path) -> None:
    writer = CheckpointManager(saved_dir, SYNC)
    try:
        with pytest.raises(DirectoryLockedError, match="read_only=True"):
            CheckpointManager(saved_dir, SYNC)
        with CheckpointManager(saved_dir, READ_ONLY) as reader:
            assert_same(reader.restore(), small_state(2))
            writer.save(3, small_state(3))
            reader.reload()
            assert reader.all_steps() == [1, 2, 3]

        probe = subprocess.run(
            [sys.executable, "-c", _LOCK_PROBE, str(saved_dir)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert probe.returncode == 0, probe.stderr
        assert json.loads(probe.stdout) == {
            "writer": "DirectoryLockedError",
            "steps": [1, 2, 3],
            "value": [3.0] * 10,
        }
    finally:
        writer.close()
    with CheckpointManager(saved_dir, SYNC) as again:  # the lock is free once closed
        again.save(4, small_state(4))


# ---------------------------------------------------------------- corruption detection


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data region, parsed header) of a safetensors file."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return 8 + length, json.loads(raw[8 : 8 + length])


def _patch(path: Path, offset: int, new: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(new)


def flip_data_byte(path: Path) -> None:
    start, header = _header(path)
    first = next(v for k, v in header.items() if k != "__metadata__")
    offset = start + first["data_offsets"][0] + 3
    _patch(path, offset, bytes([path.read_bytes()[offset] ^ 0x40]))


def change_header_value(path: Path) -> None:
    """Still valid JSON with the same tensors: only the header checksum can tell."""
    offset = path.read_bytes().index(b'"pt"')
    _patch(path, offset, b'"qt"')


def break_header_json(path: Path) -> None:
    _patch(path, 8, b"#")


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 3)


def append_garbage(path: Path) -> None:
    with path.open("ab") as f:
        f.write(b"junk")


SIZE_MISMATCH = r"size \d+ bytes, the commit record says \d+"
CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str, bool]] = {
    # name: (corrupt, message pattern, detected with verify_checksums=False)
    "data byte flipped": (flip_data_byte, r"checksum mismatch in tensor", False),
    "header value changed": (change_header_value, r"header checksum mismatch", False),
    "header not JSON": (break_header_json, r"unreadable safetensors header", True),
    "truncated": (truncate, SIZE_MISMATCH, True),
    "bytes appended": (append_garbage, SIZE_MISMATCH, True),
}


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_data_file_is_detected(saved_dir: Path, case: str, verify: bool) -> None:
    corrupt, pattern, detected_without_verify = CORRUPTIONS[case]
    victim = saved_dir / "step_00000002" / "weights.safetensors"
    corrupt(victim)
    options = CheckpointManagerOptions(
        enable_async_checkpointing=False, read_only=True, verify_checksums=verify
    )
    with CheckpointManager(saved_dir, options) as mgr:
        if verify or detected_without_verify:
            with pytest.raises(CorruptCheckpointError, match=pattern) as info:
                mgr.restore()
            assert str(victim) in str(info.value), f"error does not name the file: {info.value}"
        else:
            restored = mgr.restore()
            assert restored is not None
            assert torch.equal(restored["weights"]["b"], small_state(2)["weights"]["b"])
        # The damage stays in its file and its step.
        assert_same(mgr.restore(items=["other"]), {"other": small_state(2)["other"]})
        assert_same(mgr.restore(step=1), small_state(1))


def test_deleted_data_file_is_detected(saved_dir: Path) -> None:
    victim = saved_dir / "step_00000002" / "weights.safetensors"
    victim.unlink()
    with CheckpointManager(saved_dir, READ_ONLY) as mgr:
        with pytest.raises(CorruptCheckpointError, match="missing") as info:
            mgr.restore()
        assert str(victim) in str(info.value), f"error does not name the file: {info.value}"
        assert_same(mgr.restore(items=["other"]), {"other": small_state(2)["other"]})


@pytest.mark.parametrize("read_only", [False, True], ids=["writer", "reader"])
def test_unparseable_commit_record_is_listed_as_unreadable(
    saved_dir: Path, read_only: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The directory opens (logged, naming the record); the damaged step is listed as
    unreadable; restoring the latest refuses to fall back to an older step silently."""
    record = saved_dir / "step_00000002" / RECORD
    record.write_bytes(b'{"format": "checkpointing", "vers')
    options = CheckpointManagerOptions(enable_async_checkpointing=False, read_only=read_only)
    with caplog.at_level(logging.WARNING, logger="checkpointing"):
        mgr = CheckpointManager(saved_dir, options)
    try:
        assert str(record) in caplog.text, f"no warning names the record: {caplog.text!r}"
        assert mgr.all_steps() == [1]
        assert list(mgr.unreadable_steps()) == [2]
        with pytest.raises(CorruptCheckpointError, match=r"restore\(step=1\)") as info:
            mgr.restore(missing_ok=True)
        assert str(record) in str(info.value)
        assert_same(mgr.restore(step=1), small_state(1))
        if not read_only:
            with pytest.raises(StepAlreadyExistsError):
                mgr.save(2, small_state(2))  # its folder is taken
            mgr.delete(2)
            assert not (saved_dir / "step_00000002").exists()
            assert_same(mgr.restore(), small_state(1))
            mgr.save(3, small_state(3))
            assert mgr.all_steps() == [1, 3]
    finally:
        mgr.close()


def test_step_without_commit_record_is_not_listed(saved_dir: Path) -> None:
    (saved_dir / "step_00000002" / RECORD).unlink()
    with CheckpointManager(saved_dir, READ_ONLY) as mgr:
        assert mgr.all_steps() == [1]
        assert_same(mgr.restore(), small_state(1))


if __name__ == "__main__":
    _zygote_main()
