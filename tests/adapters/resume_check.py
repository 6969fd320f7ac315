"""Shared checks of the kill-and-resume tests: run a training script, read its logs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


SAMPLES, BATCH, EPOCHS = 32, 4, 3  # 8 micro-batches per epoch (per process: 8 / n)


def tiny_problem(accum: int) -> tuple[Any, torch.nn.Module, Any, Any, Any]:
    """The small problem both training scripts learn: (accelerator, model, optimizer,
    loader, scheduler), not yet prepared. Ids ride along in each batch for the logs."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(gradient_accumulation_steps=accum, cpu=True)
    set_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(SAMPLES, 6, generator=g), torch.randn(SAMPLES, 2, generator=g)
    data = torch.utils.data.TensorDataset(x, y, torch.arange(SAMPLES))
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 2)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
    return accelerator, model, optimizer, loader, scheduler


def run(cmd: list[str], *, expect_kill: bool = False, launched: bool = False) -> None:
    """Run a training process; with ``expect_kill`` it must die of its own SIGKILL."""
    if cmd[0].endswith(".py"):
        cmd = [sys.executable, *cmd]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    if not expect_kill:
        assert proc.returncode == 0, output
    elif launched:  # the launcher reports the killed worker with a non-zero code
        assert proc.returncode != 0, output
    else:
        assert proc.returncode == -signal.SIGKILL, output


def effective_batches(log: Path) -> list[tuple[int, str]]:
    """The micro-batches that count: a resumed run overwrites what followed its step."""
    seen: dict[int, str] = {}
    after_resume = False
    for line in log.read_text().splitlines():
        if line.startswith("resume"):
            after_resume = True
            continue
        n, ids = line.split(" ", 1)
        if after_resume:  # drop what a killed run did after the step it resumed from
            seen = {k: v for k, v in seen.items() if k < int(n)}
            after_resume = False
        seen[int(n)] = ids
    return sorted(seen.items())


def assert_same_run(a: Path, b: Path, ranks: int = 1) -> None:
    """Final parameters, optimizer state and the sequence of batches are identical."""
    for r in range(ranks):
        fa = torch.load(a / f"final_rank{r}.pt", weights_only=False)
        fb = torch.load(b / f"final_rank{r}.pt", weights_only=False)
        assert fa["step"] == fb["step"] and fa["counter"] == fb["counter"]
        assert fa.get("scheduler") == fb.get("scheduler")
        for k, v in fa["model"].items():
            assert torch.equal(v, fb["model"][k]), k
        sa, sb = fa["optimizer"]["state"], fb["optimizer"]["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            for k in sa[i]:
                assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)
        ea = effective_batches(a / f"batches_rank{r}.log")
        eb = effective_batches(b / f"batches_rank{r}.log")
        assert ea == eb
        assert [n for n, _ in ea] == list(range(1, len(ea) + 1))  # nothing lost or repeated
