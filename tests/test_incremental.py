"""Incremental saves (``incremental=True``): unchanged tensors are written once and read
from that step's files; every step still restores exactly, retention keeps what kept steps
read, damage in a referenced file is found, and copies and deletes keep steps whole.
(SIGKILL during incremental saves: tests/test_crash.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from checkpointing import (
    CheckpointError,
    CheckpointManager,
    CheckpointManagerOptions,
    CorruptCheckpointError,
)

RECORD = "checkpoint.json"


class LoRA(torch.nn.Module):
    """A frozen base layer and a trained low-rank adapter on it."""

    def __init__(self, d: int = 256, rank: int = 4) -> None:
        super().__init__()
        self.base = torch.nn.Linear(d, d)
        self.base.requires_grad_(False)
        self.down = torch.nn.Linear(d, rank, bias=False)
        self.up = torch.nn.Linear(rank, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


def train_step(model: LoRA, optimizer: torch.optim.Optimizer) -> None:
    x = torch.randn(8, 256)
    loss = model(x).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in model.state_dict().items()}


def references(directory: Path, step: int) -> dict[str, Any]:
    body = json.loads((directory / f"step_{step:08d}" / RECORD).read_text())
    return body.get("references", {})


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_frozen_base_is_written_once_and_every_step_restores(
    make_manager: Callable[..., CheckpointManager], tmp_path: Path, asynchronous: bool
) -> None:
    torch.manual_seed(0)
    model = LoRA()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    state = {"model": model, "optimizer": optimizer}
    mgr = make_manager(incremental=True, max_to_keep=2, enable_async_checkpointing=asynchronous)
    saved = {}
    for step in range(6):
        train_step(model, optimizer)
        mgr.save(step, state)
        saved[step] = snapshot(model)
    mgr.wait_until_finished()
    report = {r.step: r for r in mgr.retention_report()}
    assert sorted(report) == [0, 4, 5]
    assert report[0].reasons == ("holds tensors of step 4", "holds tensors of step 5")
    base_bytes = sum(t.numel() * t.element_size() for t in model.base.state_dict().values())
    assert report[0].nbytes > base_bytes  # the first save is complete
    for step in (4, 5):
        assert report[step].nbytes * 10 < base_bytes  # the adapter and its optimizer only
        assert set(references(tmp_path / "ckpt", step)) == {"0"}
    for step in (0, 4, 5):
        fresh = LoRA()
        mgr.restore({"model": fresh}, step=step)
        for name, tensor in fresh.state_dict().items():
            assert torch.equal(tensor, saved[step][name]), (step, name)
        mgr.verify(step)
    whole = mgr.restore(step=5)  # no target: new tensors, read from both steps' files
    assert torch.equal(whole["model"]["base.weight"], model.base.weight)
    reader = CheckpointManager(tmp_path / "ckpt", CheckpointManagerOptions(read_only=True))
    with reader:  # an evaluation job on the same directory
        up = reader.restore(step=4)["model"]["up.weight"]
        assert torch.equal(up, saved[4]["up.weight"])


def test_a_changed_tensor_is_written_again_and_unchanged_state_costs_no_data(
    make_manager: Callable[..., CheckpointManager], tmp_path: Path
) -> None:
    model = torch.nn.Linear(64, 64)
    mgr = make_manager(incremental=True, enable_async_checkpointing=False)
    mgr.save(1, {"model": model})
    mgr.save(2, {"model": model})  # nothing changed: a record, and no data file
    assert sorted(p.name for p in (tmp_path / "ckpt" / "step_00000002").iterdir()) == [RECORD]
    with torch.no_grad():
        model.weight[0, 0] += 1  # same size, same dtype, other bytes
    mgr.save(3, {"model": model})
    refs = references(tmp_path / "ckpt", 3)
    assert refs == {"1": {"model.safetensors": refs["1"]["model.safetensors"]}}  # the bias
    restored = torch.nn.Linear(64, 64)
    mgr.restore({"model": restored}, step=3)
    assert torch.equal(restored.weight, model.weight) and torch.equal(restored.bias, model.bias)
    model.weight = torch.nn.Parameter(model.weight.double())  # another dtype: written
    mgr.save(4, {"model": model})
    assert mgr.restore(step=4)["model"]["weight"].dtype == torch.float64


def test_async_saves_keep_the_values_at_save_time_as_tensors_freeze_and_thaw(
    make_manager: Callable[..., CheckpointManager], tmp_path: Path
) -> None:
    """An async save compares tensors frozen at earlier saves on the training thread
    and copies the rest; the step holds the values of the moment save() was called,
    whatever the training thread writes into them right after."""
    model = torch.nn.Linear(256, 256)
    mgr = make_manager(incremental=True, max_to_keep=None, enable_async_checkpointing=True)
    saved = {}
    for step in range(8):
        with torch.no_grad():
            model.bias.add_(1)  # changes at every step
            if step in (4, 6):
                model.weight.add_(1)  # frozen, but for these steps
        mgr.save(step, {"model": model})
        saved[step] = snapshot(model)
        with torch.no_grad():  # while the background writes
            model.weight.fill_(float("nan"))
            model.bias.fill_(float("nan"))
        mgr.wait_until_finished()
        model.load_state_dict(saved[step])
    for step in range(8):
        fresh = torch.nn.Linear(256, 256)
        mgr.restore({"model": fresh}, step=step)
        for name, tensor in fresh.state_dict().items():
            assert torch.equal(tensor, saved[step][name]), (step, name)
        mgr.verify(step)
    origin = {1: 0, 2: 0, 3: 0, 5: 4, 7: 6}  # where each step reads the weight from
    for step in range(8):
        assert set(references(tmp_path / "ckpt", step)) == (
            {str(origin[step])} if step in origin else set()
        ), step


def test_a_new_process_starts_with_a_complete_save(tmp_path: Path) -> None:
    opts = CheckpointManagerOptions(
        incremental=True, max_to_keep=1, enable_async_checkpointing=False
    )
    model = torch.nn.Linear(32, 32)
    with CheckpointManager(tmp_path, opts) as mgr:
        mgr.save(1, {"model": model})
        mgr.save(2, {"model": model})
        assert mgr.all_steps() == [1, 2]  # 2 reads 1's files
    with CheckpointManager(tmp_path, opts) as mgr:  # a restart: nothing remembered
        mgr.save(3, {"model": model})
        assert references(tmp_path, 3) == {}
        assert mgr.all_steps() == [3]  # nothing reads 1 or 2 any more


def test_delete_refuses_a_step_that_others_read(
    make_manager: Callable[..., CheckpointManager], tmp_path: Path
) -> None:
    mgr = make_manager(incremental=True, enable_async_checkpointing=False)
    frozen = {"w": torch.randn(1000)}
    for step in (1, 2, 3):
        mgr.save(step, {"frozen": frozen, "step": torch.tensor(step)})
    with pytest.raises(CheckpointError, match=r"step\(s\) \[2, 3\] read"):
        mgr.delete(1)
    assert mgr.all_steps() == [1, 2, 3]
    mgr.delete(3)
    mgr.delete(2)
    mgr.delete(1)
    assert mgr.all_steps() == []


def test_damage_in_a_referenced_file_is_found(
    make_manager: Callable[..., CheckpointManager], tmp_path: Path
) -> None:
    mgr = make_manager(incremental=True, enable_async_checkpointing=False)
    frozen = {"w": torch.randn(100_000)}
    mgr.save(1, {"frozen": frozen, "n": torch.tensor(1)})
    mgr.save(2, {"frozen": frozen, "n": torch.tensor(2)})
    data = tmp_path / "ckpt" / "step_00000001" / "frozen.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match=r"step_00000001/frozen\.safetensors"):
        mgr.verify(2)
    with pytest.raises(CorruptCheckpointError, match=r"step_00000001/frozen\.safetensors"):
        mgr.restore(step=2)
    data.unlink()
    with pytest.raises(CorruptCheckpointError, match=r"step_00000001/frozen\.safetensors"):
        mgr.restore(step=2)


def test_copies_carry_the_steps_they_read(
    make_manager: Callable[..., CheckpointManager], tmp_path: Path
) -> None:
    src = make_manager(incremental=True, enable_async_checkpointing=False)
    frozen = {"w": torch.randn(1000)}
    for step in (1, 2):
        src.save(step, {"frozen": frozen, "n": torch.tensor(step)})
    dst = make_manager(tmp_path / "copy", enable_async_checkpointing=False)
    assert src.copy_to(dst) == [1, 2]
    assert torch.equal(dst.restore(step=2)["frozen"]["w"], frozen["w"])
    dst.verify(2)
    # A destination whose step 1 is another one: step 2 would read the wrong files.
    other = make_manager(tmp_path / "other", enable_async_checkpointing=False)
    other.save(1, {"frozen": {"w": torch.zeros(1000)}, "n": torch.tensor(1)})
    with pytest.raises(CheckpointError, match="reads files of step 1"):
        src.copy_to(other)
    assert other.all_steps() == [1]


def test_any_fsspec_directory_takes_incremental_saves() -> None:
    opts = CheckpointManagerOptions(incremental=True, enable_async_checkpointing=False)
    frozen = torch.randn(10_000)
    with CheckpointManager("memory://incremental-test/run", opts) as mgr:
        for step in (1, 2):
            mgr.save(step, {"frozen": frozen, "n": torch.tensor(step)})
        assert mgr.last_save_stats().nbytes < 1000  # type: ignore[union-attr]
        mgr.verify(2)
        assert torch.equal(mgr.restore(step=2)["frozen"], frozen)


def test_a_mirror_carries_incremental_steps_and_a_fresh_node_resumes_from_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mirror uploads a step's origins before the step; the remote's own retention
    keeps what kept steps read; a node without local steps downloads both to restore."""
    from checkpointing import remote_tier

    uploaded: list[int] = []
    real = remote_tier.copy_step

    def spy(src: Any, dst: Any, names: Any, record: Any, *args: Any) -> Any:
        uploaded.append(record.step)
        return real(src, dst, names, record, *args)

    monkeypatch.setattr(remote_tier, "copy_step", spy)
    remote = (tmp_path / "remote").as_uri()
    opts = CheckpointManagerOptions(
        incremental=True, max_to_keep=2, enable_async_checkpointing=False
    )
    frozen = {"w": torch.randn(100_000)}
    state = lambda step: {"frozen": frozen, "n": torch.full((10,), float(step))}  # noqa: E731
    mgr = CheckpointManager(tmp_path / "node1", opts, remote=remote)
    mgr.save(1, state(1))
    mgr.close()  # step 1 uploaded; then a run whose mirror is down for a while:
    real_pass = remote_tier.Mirror._pass
    monkeypatch.setattr(remote_tier.Mirror, "_pass", lambda self: None)
    with CheckpointManager(tmp_path / "node1", opts, remote=remote) as mgr:
        mgr.save(2, state(2))  # a new process: complete
        for step in (3, 4):
            mgr.save(step, state(step))  # they read step 2's files
        monkeypatch.setattr(remote_tier.Mirror, "_pass", real_pass)
        uploaded.clear()
        mgr.wait_until_finished()
        assert uploaded == [2, 4, 3]  # newest first, its origin before it
        assert mgr.mirror_status().remote_steps == (2, 3, 4)  # remote keeps 2 for 3, 4
    with CheckpointManager(remote, CheckpointManagerOptions(read_only=True)) as bucket:
        reasons = {r.step: r.reasons for r in bucket.retention_report()}[2]
        assert {"holds tensors of step 3", "holds tensors of step 4"} <= set(reasons)
        bucket.verify(3)
    with CheckpointManager(tmp_path / "node2", opts, remote=remote) as fresh:
        restored = fresh.restore()
        assert torch.equal(restored["frozen"]["w"], frozen["w"])
        assert restored["n"].tolist() == [4.0] * 10
        assert sorted(p.name for p in (tmp_path / "node2").glob("step_*")) == [
            "step_00000002", "step_00000004"
        ]
        fresh.verify(4)


def test_the_command_line_lists_verifies_and_copies_incremental_steps(tmp_path: Path) -> None:
    opts = CheckpointManagerOptions(incremental=True, enable_async_checkpointing=False)
    with CheckpointManager(tmp_path / "ckpt", opts) as mgr:
        frozen = {"w": torch.randn(1000)}
        for step in (1, 2):
            mgr.save(step, {"frozen": frozen, "n": torch.tensor(step)})
    cli = str(Path(sys.executable).parent / "checkpointing")
    ls = subprocess.run([cli, "ls", str(tmp_path / "ckpt"), "--max-to-keep", "1"],
                        capture_output=True, text=True)
    assert ls.returncode == 0 and "holds tensors of step 2" in ls.stdout, ls.stderr
    verify = subprocess.run([cli, "verify", str(tmp_path / "ckpt"), "--all"],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    sync = subprocess.run([cli, "sync", str(tmp_path / "ckpt"), str(tmp_path / "copy")],
                          capture_output=True, text=True)
    assert sync.returncode == 0, sync.stderr
    shutil.rmtree(tmp_path / "ckpt")
    with CheckpointManager(tmp_path / "copy", CheckpointManagerOptions(read_only=True)) as copy:
        assert torch.equal(copy.restore(step=2)["frozen"]["w"], frozen["w"])
