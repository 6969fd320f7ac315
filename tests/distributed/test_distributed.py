"""Multi-process jobs: real processes joined by a real torch.distributed (gloo) group."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from checkpointing import CheckpointManager, CheckpointManagerOptions
from checkpointing.errors import CorruptCheckpointError, ItemNotFoundError

sys.path.insert(0, str(Path(__file__).parent))
from worker import commit_record, full_weights, large_weights, replicated_state

WORKER = Path(__file__).with_name("worker.py")


def launch(
    world: int, scenario: str, directory: Path, tmp_path: Path, **env: str
) -> list[dict[str, Any]]:
    """Run ``scenario`` on ``world`` processes; return each rank's observations."""
    out = tmp_path / f"out-{scenario}-{world}"
    out.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), scenario, str(directory), str(out)],
            env={
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                **env,
            },
        )
        for rank in range(world)
    ]
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:  # a hung job must not outlive its test
        for p in procs:
            p.kill()
    results = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    if scenario != "killed":
        assert codes == [0] * world
        assert len(results) == world
    return results


@pytest.mark.parametrize(("world", "primary"), [(2, 0), (4, 0), (2, 1)])
def test_collective_save_restore(tmp_path: Path, world: int, primary: int) -> None:
    ranks = launch(world, "basic", tmp_path / "ckpt", tmp_path, PRIMARY=str(primary))
    # Every rank listed the same steps at every point (rank 1 looked only after its
    # background save had committed): an async save is listed from its join (the next
    # save), and so are retention's deletes.
    listed = [[], [], [0], [0], [0, 2], [0, 2], [2, 4]]
    expected = [[steps, steps[-1] if steps else None] for steps in listed]
    assert all(r["seen"] == expected for r in ranks)
    assert all(r["steps"] == [4, 6] for r in ranks)
    # replicated state written once; each rank's own state in a file of its own
    own = [f"own.rank{r}.safetensors" for r in range(world)]
    assert ranks[0]["files"] == ["model.safetensors", "opt.safetensors", *own]
    assert all(r["model_restored"] for r in ranks)
    assert [r["own"] for r in ranks] == [[100.0 * r + 6] * 3 for r in range(world)]
    # a single process reads the replicated state, but not the ranks' own
    with CheckpointManager(tmp_path / "ckpt", CheckpointManagerOptions(read_only=True)) as mgr:
        assert set(mgr.restore(items=["model"])["model"]) == {"weight", "bias"}
        with pytest.raises(ItemNotFoundError, match=f"each of the {world} processes"):
            mgr.restore(items=["own"])
        assert len(mgr.item_metadata()["own"]) == world


def test_mirrored_job_lists_the_remote_tier_alike_everywhere(tmp_path: Path) -> None:
    """Uploads run on the primary alone, after each save: the others list the remote
    steps the primary had when the save committed, from the same point on."""
    ranks = launch(2, "mirrored", tmp_path / "ckpt", tmp_path)
    seen = [r["seen"] for r in ranks]
    assert seen[0] == seen[1]
    assert all(r["first"] == [0.0] * 4 for r in ranks)  # downloaded once, read by both
    assert seen[0][-1] == [0, 1, 2, 3]  # all uploaded (the remote tier keeps every step)
    assert all(len(listed) > 0 for listed in seen[0][1:])


def test_async_commit_leaves_the_training_thread_free(tmp_path: Path) -> None:
    ranks = launch(2, "overlap", tmp_path / "ckpt", tmp_path)
    assert ranks == [{"sum": 2.0, "in_progress": True, "steps": [1]}] * 2


def test_sharded_state_reshards(tmp_path: Path) -> None:
    """DTensors saved on 4 ranks restore on 2 ranks and in one process (with and
    without a target), verified against our commit record."""
    ckpt = tmp_path / "ckpt"
    (saved,) = {json.dumps(r["files"]) for r in launch(4, "sharded_save", ckpt, tmp_path)}
    assert json.loads(saved) == [f"sharded/rank{r}.safetensors" for r in range(4)]
    assert all(r["restored"] for r in launch(2, "sharded_restore", ckpt, tmp_path))
    with CheckpointManager(ckpt, CheckpointManagerOptions(read_only=True)) as mgr:
        mgr.verify()
        restored = mgr.restore()
        assert restored["meta"] == {"world": 4}
        for name, value in full_weights().items():
            assert torch.equal(restored["model"][name], value)
        into = {name: torch.zeros_like(value) for name, value in full_weights().items()}
        mgr.restore({"model": into})
        assert all(torch.equal(into[n], v) for n, v in full_weights().items())
        model = commit_record(ckpt, 1)["items"]["model"]["dict"]
        (w,) = [node for key, node in model if key == "w"]
        boxes = [(c["offsets"], c["sizes"]) for c in w["dtensor"]["chunks"]]
        assert boxes == [([3 * r, 0], [3, 6]) for r in range(4)]


def test_large_shards_are_stored_in_pieces_that_more_processes_read_alone(
    tmp_path: Path,
) -> None:
    """Shards of 1 MiB and more are stored as a power of two of row runs: restored on
    twice the processes, each reads about what it holds, not whole stored shards."""
    ckpt = tmp_path / "ckpt"
    launch(2, "pieces_save", ckpt, tmp_path)
    model = dict(commit_record(ckpt, 1)["items"]["model"]["dict"])
    rows = {k: [c["sizes"][0] for c in node["dtensor"]["chunks"]] for k, node in model.items()}
    assert rows == {"big": [128] * 8, "odd": [251, 251, 251, 250]}
    ranks = launch(4, "pieces_restore", ckpt, tmp_path)
    assert all(r["restored"] for r in ranks)
    for r in ranks:  # + the pages around a header or a piece's ends
        assert r["held"] <= r["read"] < r["held"] + (64 << 10), ranks
    with CheckpointManager(ckpt, CheckpointManagerOptions(read_only=True)) as mgr:
        mgr.verify()
        into = {k: torch.zeros_like(v) for k, v in large_weights().items()}
        mgr.restore({"model": into})
        assert all(torch.equal(into[k], v) for k, v in large_weights().items())


def test_fsdp2_model_and_optimizer_reshard(tmp_path: Path) -> None:
    """FSDP2 (fully_shard) model and AdamW state trained on 4 ranks resume on 2."""
    saved = launch(4, "fsdp_save", tmp_path / "ckpt", tmp_path)
    restored = launch(2, "fsdp_restore", tmp_path / "ckpt", tmp_path)
    assert all(r == saved[0] for r in saved + restored)
    assert any("exp_avg_sq" in key for key in saved[0])


def test_corrupt_shard_is_detected(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    launch(2, "sharded_save", ckpt, tmp_path)
    shard = next(ckpt.glob("step_*/sharded/rank1.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(data)
    options = CheckpointManagerOptions(read_only=True)
    with (
        CheckpointManager(ckpt, options) as mgr,
        pytest.raises(CorruptCheckpointError, match=r"rank1\.safetensors: checksum mismatch"),
    ):
        mgr.restore()


@pytest.mark.parametrize("world", [2, 3])
def test_replicated_state_is_read_once_between_the_ranks(tmp_path: Path, world: int) -> None:
    """Each rank reads a share of the large replicated tensors and gets the rest by
    broadcast: the bytes read add up to about one copy of the state, not one per rank."""
    ranks = launch(world, "replicated", tmp_path / "ckpt", tmp_path)
    state = replicated_state()
    model = sum(t.nbytes for t in state["model"].values()) - state["model"]["tied"].nbytes
    total = model + state["opt"]["m"].nbytes + state["opt"]["v"].nbytes
    own = 300_000 * 4  # each rank's PerRank item, read by that rank alone
    for r, seen in enumerate(ranks):
        assert seen["in_place"] and seen["anew"] and seen["tied"] and seen["all_or_nothing"]
        assert seen["own"] == [float(r)]
        # read into in place where shape and dtype fit; the float64 target is replaced
        assert seen["filled"] == [k for k in state["model"] if k != "w3"]
        assert seen["differing"]
    largest = max(t.nbytes for t in state["model"].values())
    for key in ("read_in_place", "read_anew"):
        reads = [seen[key] for seen in ranks]
        shared = sum(reads) - world * own * (key == "read_in_place")
        assert total <= shared < total + world * (1 << 20), (key, reads)  # + small ones
        assert all(n - own < total / world + largest for n in reads), (key, reads)
    # ranks that restore different items do not exchange: each reads what it restores
    assert ranks[0]["read_differing"] >= model
    assert all(seen["read_differing"] >= total for seen in ranks[1:])
    # one rank's target does not fit: it says why, every other names it, none hangs
    for r, seen in enumerate(ranks):
        if r == 1:
            assert seen["mismatch"].startswith("TargetMismatchError: ")
            assert "rank 1 failed" not in seen["mismatch"]
        else:
            assert seen["mismatch"].startswith(
                "TargetMismatchError: rank 1 failed this restore before reading"
            )
    # damage in one rank's share: that rank finds it, every other rank fails naming it
    errors = [seen["corrupt"] for seen in ranks]
    assert all("opt.safetensors: checksum mismatch in tensor 'm'" in e for e in errors)
    assert all(e.startswith(("CorruptCheckpointError", "PartialRestoreError")) for e in errors)
    assert sum("failed this restore reading its share" in e for e in errors) == world - 1


def test_incremental_saves_of_a_job(tmp_path: Path) -> None:
    """Unchanged replicated and per-rank tensors are written by the first save alone; the
    later steps refer to it, retention keeps it, and every kept step restores on every
    rank (the replicated tensors read once between them)."""
    ckpt = tmp_path / "ckpt"
    ranks = launch(2, "incremental", ckpt, tmp_path)
    assert all(r["steps"] == [1, 3, 4] and r["restored"] == [True] * 3 for r in ranks)
    record = commit_record(ckpt, 4)
    assert sorted(record["references"]) == ["1"]
    assert sorted(record["references"]["1"]) == [
        "model.safetensors", "own.rank0.safetensors", "own.rank1.safetensors",
        "sharded/rank0.safetensors", "sharded/rank1.safetensors",
    ]
    assert sorted(record["files"]) == ["model.safetensors"]  # the adapter alone
    (chunks,) = [n["dtensor"]["chunks"] for k, n in record["items"]["sharded"]["dict"]]
    assert [c["step"] for c in chunks] == [1] * 8  # each rank's four pieces, of step 1
    with CheckpointManager(ckpt, CheckpointManagerOptions(read_only=True)) as mgr:
        mgr.verify(4)
        assert mgr.restore(step=4, items=["model"])["model"]["adapter"].tolist() == [4.0] * 50
        whole = mgr.restore(step=4, items=["sharded"])["sharded"]["w"]  # on one process
        assert torch.equal(whole, large_weights()["big"])


def test_killed_rank_fails_the_others_and_leaves_no_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    (survivor,) = launch(2, "killed", ckpt, tmp_path)  # rank 1 was SIGKILLed mid-save
    assert survivor["steps"] == [1]
    assert survivor["error"].startswith("CoordinationError")
    assert "Ranks 1 failed" in survivor["error"] or "Connection" in survivor["error"]
    with CheckpointManager(ckpt) as mgr:  # a new run: step 1 only, nothing left over
        assert mgr.all_steps() == [1]
        assert mgr.restore(items=["x"])["x"].tolist() == [1.0] * 4
    assert sorted(p.name for p in ckpt.iterdir()) == [".lock", "step_00000001"]


@pytest.fixture
def one_process_group() -> Any:
    """A real process group of one (DTensors need one), torn down after the test."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_sharded_state_goes_anywhere_a_file_goes(tmp_path: Path, one_process_group: None) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    dtensor = distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)])
    for directory in (str(tmp_path / "ckpt"), "memory://sharded-test"):
        with CheckpointManager(directory) as mgr:
            mgr.save(1, {"w": {"x": dtensor}})
            mgr.wait_until_finished()
            assert mgr.restore()["w"]["x"].tolist() == [[1.0, 1.0]] * 4
            into = distribute_tensor(torch.zeros(4, 2), mesh, [Shard(0)])
            assert mgr.restore({"w": {"x": into}})["w"]["x"] is into
            assert into.to_local().tolist() == [[1.0, 1.0]] * 4


def test_coordinator_needs_a_process_group_and_a_real_primary(one_process_group: None) -> None:
    import torch.distributed as dist

    from checkpointing import SingleProcess, TorchDistributed
    from checkpointing.distributed import default_coordinator
    from checkpointing.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="primary must be a rank"):
        TorchDistributed(primary=1)
    assert isinstance(default_coordinator(10), SingleProcess)  # a job of one process
    dist.destroy_process_group()
    with pytest.raises(InvalidOptionError, match="init_process_group"):
        TorchDistributed()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def test_coordination_timeout_is_validated() -> None:
    from checkpointing.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="coordination_timeout_secs"):
        CheckpointManagerOptions(coordination_timeout_secs=0)
