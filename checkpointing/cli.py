"""The ``checkpointing`` command: look into checkpoint directories without writing Python."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from collections.abc import Sequence

from checkpointing.errors import CheckpointError
from checkpointing.manager import CheckpointManager
from checkpointing.options import CheckpointManagerOptions


def _open(directory: str) -> CheckpointManager:
    return CheckpointManager(directory, CheckpointManagerOptions(read_only=True))


def _ls(args: argparse.Namespace) -> int:
    with _open(args.directory) as mgr:
        rows = mgr.retention_report()
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        return 0
    print(f"{'step':>10}  {'committed (UTC)':<19}  {'size':>10}  {'kept by':<30}  metrics")
    for r in rows:
        when = datetime.datetime.fromtimestamp(r.committed_at, datetime.timezone.utc)
        print(
            f"{r.step:>10}  {when:%Y-%m-%d %H:%M:%S}  {_size(r.nbytes):>10}  "
            f"{', '.join(r.reasons) or '(would be deleted)':<30}  "
            f"{json.dumps(r.metrics) if r.metrics is not None else ''}"
        )
    return 0


def _verify(args: argparse.Namespace) -> int:
    with _open(args.directory) as mgr:
        steps = (
            mgr.all_steps()
            if args.all
            else [args.step if args.step is not None else mgr.latest_step()]
        )
        if steps == [None]:
            raise CheckpointError(f"no checkpoint in {mgr.directory}")
        bad = 0
        for step in steps:
            try:
                mgr.verify(step)
                print(f"step {step}: ok")
            except CheckpointError as e:
                print(f"step {step}: {e}")
                bad += 1
    return 1 if bad else 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="checkpointing", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    ls = commands.add_parser("ls", help="list committed steps and what retention keeps")
    ls.add_argument("directory")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(run=_ls)
    verify = commands.add_parser("verify", help="check sizes and checksums")
    verify.add_argument("directory")
    which = verify.add_mutually_exclusive_group()
    which.add_argument("--step", type=int)
    which.add_argument("--all", action="store_true")
    verify.set_defaults(run=_verify)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except CheckpointError as e:
        print(f"checkpointing: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
