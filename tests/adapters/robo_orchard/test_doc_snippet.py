"""docs/adapters.md's robo_orchard_lab snippet runs as written, on a tiny problem."""

from __future__ import annotations

from pathlib import Path

from doc_snippet import run_adapter_snippet

ADAPTERS = Path(__file__).resolve().parent.parent

PRELUDE = f"""
import sys
sys.path.insert(0, {str(ADAPTERS)!r})
import tv_shim
tv_shim.install()
import torch
from resume_check import tiny_problem
from robo_orchard_lab.pipeline.batch_processor.simple import SimpleBatchProcessor
from robo_orchard_lab.pipeline.hook_based_trainer import HookBasedTrainer
from checkpointing import CheckpointManager, CheckpointManagerOptions

accelerator, model, optimizer, loader, scheduler = tiny_problem(1)

def forward(model, batch):
    xb, yb, ids = batch
    out = model(xb)
    return {{"out": out}}, torch.nn.functional.mse_loss(out, yb)

processor = SimpleBatchProcessor.from_callable(forward)
hooks = []  # the user's other hooks
"""

# Ten epochs of 8 batches: the hook saves the last step when training ends.
CHECK = """
manager.wait_until_finished()
assert manager.all_steps() == [80], manager.all_steps()
"""


def test_the_documented_snippet_runs(tmp_path: Path) -> None:
    run_adapter_snippet("robo_orchard", PRELUDE, CHECK, tmp_path)
