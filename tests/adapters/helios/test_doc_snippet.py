"""docs/adapters.md's Helios snippet runs as written, on this folder's tiny model."""

from __future__ import annotations

from pathlib import Path

from doc_snippet import run_adapter_snippet

HERE = Path(__file__).resolve().parent

PRELUDE = f"""
import argparse
import sys
from pathlib import Path
sys.path.insert(0, {str(HERE)!r})
sys.path.insert(0, {str(HERE.parent)!r})
import helios_train
from checkpointing import CheckpointManagerOptions

args = argparse.Namespace(out=Path("."), kill_at_batch=None, preempt_at=None, accum=1)
model, datamodule = helios_train.Tiny(args), helios_train.Data(workers=0)
"""

# chkpt_frequency=500 of 1000 iterations, and save_interval_secs's first save: three
# steps, in the manager's directory for the model, named as Helios names its files.
CHECK = """
steps = {p.name for p in Path("runs/exp1/chkpt/tiny").glob("epoch_*")}
assert steps == {"epoch_1_iter_1", "epoch_63_iter_500", "epoch_125_iter_1000"}, steps
"""


def test_the_documented_snippet_runs(tmp_path: Path) -> None:
    run_adapter_snippet("helios", PRELUDE, CHECK, tmp_path)
