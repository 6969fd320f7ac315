"""One process of a multi-process test job (started by test_distributed.py).

``python worker.py <scenario> <directory> <out_dir>`` with RANK, WORLD_SIZE, MASTER_ADDR
and MASTER_PORT set; writes ``<out_dir>/rank<r>.json`` with what it observed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from checkpointing import CheckpointManager, CheckpointManagerOptions, PerRank, TorchDistributed
from checkpointing.errors import CheckpointError


def commit_record(directory: str | Path, step: int | None) -> dict[str, Any]:
    """A step's commit record, as any reader of the format sees it."""
    return json.loads(Path(directory, f"step_{step:08d}", "checkpoint.json").read_bytes())  # type: ignore[no-any-return]


def full_weights() -> dict[str, torch.Tensor]:
    """The same values on every rank and in every job: what sharded tests compare."""
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(12, 6, generator=g), "b": torch.randn(12, generator=g)}


class Sharded(nn.Module):
    """A module whose parameters are DTensors sharded by rows over all ranks."""

    def __init__(self) -> None:
        super().__init__()
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for name, value in full_weights().items():
            self.register_parameter(
                name, nn.Parameter(distribute_tensor(torch.zeros_like(value), mesh, [Shard(0)]))
            )


def basic(directory: str, rank: int, world: int) -> dict[str, Any]:
    torch.manual_seed(0)  # replicated: the same model everywhere
    model = nn.parallel.DistributedDataParallel(nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    options = CheckpointManagerOptions(max_to_keep=2, save_interval_steps=2)
    primary = int(os.environ.get("PRIMARY", "0"))
    seen = []
    coordinator = TorchDistributed(primary=primary)
    with CheckpointManager(directory, options, coordinator=coordinator) as mgr:
        for step in range(7):
            loss = model(torch.full((2, 8), float(step + rank))).sum()
            loss.backward()
            opt.step()
            opt.zero_grad()
            own = torch.full((3,), float(rank * 100 + step))
            mgr.save(step, {"model": model.module, "opt": opt, "own": PerRank(own)})
            if rank == 1:  # looks once its background save has committed; the others at once
                time.sleep(0.3)
            seen.append((mgr.all_steps(), mgr.latest_step()))
        mgr.wait_until_finished()
        files = sorted(commit_record(directory, mgr.latest_step())["files"])
    expected = {k: v.clone() for k, v in model.module.state_dict().items()}
    fresh = nn.Linear(8, 4)
    with CheckpointManager(directory, options) as mgr:
        restored = mgr.restore({"model": fresh, "opt": None, "own": None})
        assert restored is not None
        steps = mgr.all_steps()
    same = all(torch.equal(fresh.state_dict()[k], v) for k, v in expected.items())
    return {
        "seen": seen,
        "steps": steps,
        "files": files,
        "model_restored": same,
        "own": restored["own"].tolist(),
    }


def mirrored(directory: str, rank: int, world: int) -> dict[str, Any]:
    """Local retention keeps one step, the remote tier all. The primary looks once its
    uploads are done, the others at once: all must list the same remote steps."""
    remote = f"file://{directory}-remote"
    options = CheckpointManagerOptions(max_to_keep=1)
    seen = []
    with CheckpointManager(directory, options, remote=remote, remote_retention=None) as mgr:
        for step in range(4):
            mgr.save(step, {"x": torch.full((4,), float(step))})
            if rank == 0:
                time.sleep(0.3)
            seen.append(mgr.all_steps())
        first = mgr.restore(step=0)  # only in the remote tier by now
        mgr.wait_until_finished()
        mgr.reload()
        seen.append(mgr.all_steps())
    assert first is not None
    return {"seen": seen, "first": first["x"].tolist()}


def sharded_save(directory: str, rank: int, world: int) -> dict[str, Any]:
    model = Sharded()
    with torch.no_grad():
        for name, value in full_weights().items():
            local = getattr(model, name).to_local()
            rows = value.shape[0] // world
            local.copy_(value[rank * rows : (rank + 1) * rows])
    with CheckpointManager(directory) as mgr:  # async: the shards are snapshotted
        mgr.save(1, {"model": model, "meta": {"world": world}})
        mgr.wait_until_finished()
    return {"files": sorted(commit_record(directory, 1)["files"])}


def sharded_restore(directory: str, rank: int, world: int) -> dict[str, Any]:
    model = Sharded()
    with CheckpointManager(directory, CheckpointManagerOptions(read_only=True)) as mgr:
        mgr.restore({"model": model})
    rows = 12 // world
    ok = all(
        torch.equal(getattr(model, n).to_local(), v[rank * rows : (rank + 1) * rows])
        for n, v in full_weights().items()
    )
    return {"restored": ok}


def counted(call: Callable[[], Any]) -> tuple[Any, int]:
    """What ``call`` returns, and the bytes this process read with direct reads
    (os.preadv, which the library's readers use) meanwhile."""
    real_preadv = os.preadv
    nbytes = 0

    def counting(fd: int, buffers: list[Any], offset: int, *flags: int) -> int:
        nonlocal nbytes
        n = real_preadv(fd, buffers, offset, *flags)
        nbytes += n
        return n

    os.preadv = counting
    try:
        return call(), nbytes
    finally:
        os.preadv = real_preadv


def large_weights() -> dict[str, torch.Tensor]:
    """Tensors whose shards are stored in pieces (`sharded.pieces`): 8 MiB, and 4.4 MB
    of an odd number of rows."""
    g = torch.Generator().manual_seed(5)
    big, odd = torch.randn(1024, 2048, generator=g), torch.randn(1003, 1100, generator=g)
    return {"big": big, "odd": odd}


def _sharded(full: dict[str, torch.Tensor], world: int, fill: bool) -> dict[str, torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    return {k: distribute_tensor(v if fill else torch.zeros_like(v), mesh, [Shard(0)])
            for k, v in full.items()}


def pieces_save(directory: str, rank: int, world: int) -> dict[str, Any]:
    with CheckpointManager(directory) as mgr:
        mgr.save(1, {"model": _sharded(large_weights(), world, fill=True)})
    return {}


def pieces_restore(directory: str, rank: int, world: int) -> dict[str, Any]:
    """Restore in place on this job's layout; the bytes this rank read (os.preadv)."""
    full = large_weights()
    target = _sharded(full, world, fill=False)
    with CheckpointManager(directory, CheckpointManagerOptions(read_only=True)) as mgr:
        _, nbytes = counted(lambda: mgr.restore({"model": target}))
    expected = _sharded(full, world, fill=True)
    same = all(
        torch.equal(target[k].to_local(), expected[k].to_local())  # type: ignore[attr-defined]
        for k in full
    )
    mine = sum(t.to_local().nbytes for t in target.values())  # type: ignore[attr-defined]
    return {"restored": same, "read": nbytes, "held": mine}


def fsdp_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    for layer in (model[0], model[2], model):
        fully_shard(layer, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, list[float]]:
    """Every parameter and Adam moment, gathered whole: comparable across world sizes."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = p.full_tensor().flatten().tolist()
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{name}.{key}"] = opt.state[p][key].full_tensor().flatten().tolist()
    return out


def fsdp_save(directory: str, rank: int, world: int) -> dict[str, Any]:
    from checkpointing.distributed import ShardedOptimizer

    model, opt = fsdp_model()
    for i in range(2):
        model(torch.full((4, 8), float(i))).square().sum().backward()
        opt.step()
        opt.zero_grad()
    with CheckpointManager(directory) as mgr:
        mgr.save(2, {"model": model, "optimizer": ShardedOptimizer(model, opt)})
    return full_state(model, opt)


def fsdp_restore(directory: str, rank: int, world: int) -> dict[str, Any]:
    from checkpointing.distributed import ShardedOptimizer

    model, opt = fsdp_model()  # a fresh optimizer: no state before restore
    with CheckpointManager(directory, CheckpointManagerOptions(read_only=True)) as mgr:
        mgr.restore({"model": model, "optimizer": ShardedOptimizer(model, opt)})
    return full_state(model, opt)


def overlap(directory: str, rank: int, world: int) -> dict[str, Any]:
    """While rank 1's background write is held back, both training threads run a
    collective of their own: an async save must not hold them in one."""
    import threading

    from checkpointing.format import tensors

    gate = threading.Event()
    if rank == 1:
        real = tensors.write_file

        def held(*args: Any) -> Any:
            assert gate.wait(60)
            return real(*args)

        tensors.write_file = held
    with CheckpointManager(directory) as mgr:
        mgr.save(1, {"x": PerRank(torch.full((4,), float(rank)))})
        total = torch.ones(1)
        dist.all_reduce(total)  # would deadlock if a rank were still inside save()
        in_progress = mgr.is_saving_in_progress()
        gate.set()
        mgr.wait_until_finished()
        return {"sum": total.item(), "in_progress": in_progress, "steps": mgr.all_steps()}


def killed(directory: str, rank: int, world: int) -> dict[str, Any]:
    """Rank 1 dies (SIGKILL) while writing step 2; the others must fail, not hang."""
    import signal

    from checkpointing.format import tensors

    options = CheckpointManagerOptions(
        coordination_timeout_secs=10, enable_async_checkpointing=False
    )
    result: dict[str, Any] = {}
    with CheckpointManager(directory, options) as mgr:
        mgr.save(1, {"x": torch.ones(4), "own": PerRank(torch.ones(2))})
        mgr.wait_until_finished()
        if rank == 1:
            real = tensors.write_file

            def die(*args: Any) -> Any:
                real(*args)
                os.kill(os.getpid(), signal.SIGKILL)

            tensors.write_file = die
        try:
            mgr.save(2, {"x": torch.zeros(4), "own": PerRank(torch.zeros(2))})
            mgr.wait_until_finished()
            result["error"] = None
        except CheckpointError as e:
            result["error"] = f"{type(e).__name__}: {e}"
        result["steps"] = mgr.all_steps()
    return result


def replicated_state() -> dict[str, Any]:
    """The same on every rank: tensors above and below the size read by one process
    (1 MiB), tied ones, bfloat16 and int64 ones, an optimizer's state."""
    g = torch.Generator().manual_seed(3)
    big = [torch.randn(300_000, generator=g) for _ in range(5)]
    model = {f"w{i}": t for i, t in enumerate(big)}
    model["tied"] = big[0]
    model["bf16"] = torch.randn(700, 1024, generator=g).to(torch.bfloat16)
    model["ids"] = torch.arange(200_000)
    model["small"] = torch.randn(10, generator=g)
    opt = {"m": torch.randn(400, 1000, generator=g), "v": torch.randn(20, 30, generator=g)}
    return {"model": model, "opt": {**opt, "lr": 0.1}}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return bool(a == b)


def replicated(directory: str, rank: int, world: int) -> dict[str, Any]:
    """Replicated state restored by every rank, in place and anew: the bytes each rank
    reads (direct reads: os.preadv), and what every rank ends up with."""
    state = replicated_state()

    def zeros() -> dict[str, Any]:
        model = {k: torch.zeros_like(v) for k, v in state["model"].items()}
        model["w1"] = torch.zeros(300_000, 1).squeeze(1)[::1]  # a view of the right shape
        model["w2"] = torch.zeros(2, 300_000)[1]  # contiguous, not the storage's start
        model["w3"] = torch.zeros(300_000, dtype=torch.float64)  # another dtype: replaced
        # not contiguous: read into new memory, then copied (after "m", which the test
        # damages: a rank that finds it here must still take part in the broadcasts)
        opt = {"m": torch.zeros(1000, 400).t(), "v": torch.zeros(30, 20).t()}
        return {"model": model, "opt": {**opt, "lr": 0.0}}

    out: dict[str, Any] = {}
    sync = CheckpointManagerOptions(enable_async_checkpointing=False)
    with CheckpointManager(directory, sync) as mgr:
        mgr.save(1, {**state, "own": PerRank(torch.full((300_000,), float(rank)))})
        target = {**zeros(), "own": torch.zeros(300_000)}
        restored, out["read_in_place"] = counted(lambda: mgr.restore(target))
        out["in_place"] = _same(restored["model"], state["model"]) and _same(
            restored["opt"], state["opt"]
        )
        out["filled"] = [k for k, v in target["model"].items() if restored["model"][k] is v]
        out["own"] = restored["own"].unique().tolist()
        restored, out["read_anew"] = counted(lambda: mgr.restore(items=["model", "opt"]))
        out["anew"] = _same(restored, state)
        out["tied"] = restored["model"]["tied"] is restored["model"]["w0"]
        target = zeros()
        restored, _ = counted(lambda: mgr.restore(target, all_or_nothing=True))
        out["all_or_nothing"] = _same(restored["model"], state["model"])
        # processes restoring different items each read everything they restore
        items = ["model"] if rank == 0 else ["model", "opt"]
        restored, out["read_differing"] = counted(lambda: mgr.restore(items=items))
        out["differing"] = _same(restored["model"], state["model"])
        # a target that fits everywhere but on rank 1: every rank fails, none hangs
        module = nn.ParameterDict(
            {k: nn.Parameter(torch.zeros_like(v), requires_grad=False)
             for k, v in state["model"].items()}
        )
        if rank == 1:
            module["w0"] = nn.Parameter(torch.zeros(3))
        try:
            mgr.restore({"model": module}, items=["model"])
        except CheckpointError as e:
            out["mismatch"] = f"{type(e).__name__}: {e}"
        # damage found by the rank reading it fails every rank's restore
        if rank == 0:
            damaged = Path(directory, "step_00000001", "opt.safetensors")
            data = bytearray(damaged.read_bytes())
            data[-state["opt"]["v"].nbytes - 1000] ^= 1  # in "m", stored before "v"
            damaged.write_bytes(data)
        dist.barrier()
        try:
            mgr.restore(zeros())
        except CheckpointError as e:
            out["corrupt"] = f"{type(e).__name__}: {e}"
    return out


def incremental(directory: str, rank: int, world: int) -> dict[str, Any]:
    """A frozen base and a trained adapter, replicated, plus each rank's own state, saved
    incrementally by every rank: what each step refers to, and every step restored."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(600, 1000, generator=g)  # replicated and frozen: written once
    options = CheckpointManagerOptions(
        incremental=True, max_to_keep=2, enable_async_checkpointing=False
    )

    sharded = _sharded({"w": large_weights()["big"]}, world, fill=True)  # frozen, FSDP-style

    def state(step: int) -> dict[str, Any]:
        own = torch.full((1000,), float(rank))  # each rank's own, unchanged: written once
        adapter = torch.full((50,), float(step))  # changes every step
        model = {"base": base, "adapter": adapter}
        return {"model": model, "sharded": sharded, "own": PerRank(own)}

    restored = []
    with CheckpointManager(directory, options) as mgr:
        for step in range(1, 5):
            mgr.save(step, state(step))
        steps = mgr.all_steps()
        for step in steps:
            into = {"model": {"base": torch.zeros_like(base), "adapter": torch.zeros(50)},
                    "sharded": _sharded({"w": large_weights()["big"]}, world, fill=False),
                    "own": torch.zeros(1000)}
            got = mgr.restore(into, step=step)
            restored.append(
                torch.equal(got["model"]["base"], base)
                and got["model"]["adapter"].tolist() == [float(step)] * 50
                and got["own"].tolist() == [float(rank)] * 1000
                and torch.equal(
                    got["sharded"]["w"].to_local(), sharded["w"].to_local()  # type: ignore[attr-defined]
                )
            )
    return {"steps": steps, "restored": restored}


def main() -> None:
    scenario, directory, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = globals()[scenario](directory, rank, world)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    if scenario != "killed":
        dist.barrier()
    # Skip interpreter teardown: tearing down gloo groups and device meshes aborted a
    # process once in CI ("terminate called without an active exception", torch 2.13),
    # after its work was done and reported; what is tested above is unaffected.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
