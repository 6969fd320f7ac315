"""The ``checkpointing`` command: look into and manage checkpoint directories.

Every command takes local paths and fsspec URLs (s3://, gs://, ...) alike, with the
filesystem's options given as ``--storage-option KEY=VALUE``. User mistakes and
unreachable stores end with one line on stderr and exit code 2; a failed verification
exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from checkpointing import __version__
from checkpointing.errors import CheckpointError, CheckpointNotFoundError
from checkpointing.options import CheckpointManagerOptions
from checkpointing.policies.retention import REASON_KEEP_ALL

# The manager (and torch with it) is imported when a command runs, not for --help.
if TYPE_CHECKING:
    from checkpointing.manager import CheckpointManager


def _manager(directory: str, options: CheckpointManagerOptions, **kwargs: Any) -> CheckpointManager:
    from checkpointing.manager import CheckpointManager

    return CheckpointManager(directory, options, **kwargs)


def _open(
    directory: str, args: argparse.Namespace, *, remote: str | None = None, **options: Any
) -> CheckpointManager:
    if args.run is not _watch:  # watching may start before the trainer made it
        _check_exists(directory)
    return _manager(
        directory,
        CheckpointManagerOptions(read_only=True, **options),
        remote=remote,
        storage_options=_storage_options(args.storage_option),
    )


def _check_exists(directory: str) -> None:
    """A local directory must exist (an object store has no directories to check)."""
    if ("://" not in directory or directory.startswith("file://")) and not Path(
        directory.removeprefix("file://")
    ).is_dir():
        raise CheckpointNotFoundError(f"no such directory: {directory}")


def _storage_option(text: str) -> tuple[list[str], Any]:
    """``KEY=VALUE``: dots in KEY reach into nested options; VALUE is JSON if it parses
    as JSON (``true``, ``3``, ``{...}``), else a string."""
    key, sep, value = text.partition("=")
    path = key.split(".")
    if not sep or not all(path):
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE, e.g. client_kwargs.endpoint_url=http://host:9000; got {text!r}"
        )
    try:
        return path, json.loads(value)
    except ValueError:
        return path, value


def _storage_options(pairs: list[tuple[list[str], Any]]) -> dict[str, Any] | None:
    if not pairs:
        return None
    options: dict[str, Any] = {}
    for path, value in pairs:
        *parents, leaf = path
        node = options
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise _given_twice(path[: depth + 1])
        if leaf in node:
            raise _given_twice(path)
        node[leaf] = value
    return options


def _given_twice(path: list[str]) -> CheckpointError:
    return CheckpointError(f"--storage-option {'.'.join(path)} is given a value already")


def _retention_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_to_keep": args.max_to_keep,
        "keep_period": args.keep_period,
        "keep_time_interval": args.keep_time_interval,
        "best_metric": args.best_metric,
        "best_mode": args.best_mode,
    }


def _ls(args: argparse.Namespace) -> int:
    with _open(args.directory, args, remote=args.remote, **_retention_options(args)) as mgr:
        rows = mgr.retention_report()
        leased = mgr.leased_steps()
        unreadable = mgr.unreadable_steps()
        mirror = mgr.mirror_status()
        local = {r.step for r in rows}
        remote_only = {s: mgr.metrics(s) for s in mgr.all_steps() if s not in local}
    remote = set(mirror.remote_steps) if mirror else set()
    if args.json:

        def tiers(step: int) -> dict[str, bool]:
            return {"local": step in local, "remote": step in remote} if mirror else {}

        listed = [
            {**dataclasses.asdict(r), "leased": r.step in leased, **tiers(r.step)} for r in rows
        ]
        listed += [{"step": s, "metrics": m, **tiers(s)} for s, m in remote_only.items()]
        broken = [{"step": s, "unreadable": why} for s, why in unreadable.items()]
        print(json.dumps(sorted(listed + broken, key=lambda row: row["step"])))
        return 0
    if mirror:
        lacks = f"lacks {', '.join(map(str, mirror.behind))}" if mirror.behind else "in line"
        print(f"remote {mirror.url}: {len(remote)} step(s), {lacks}")
    rules = (args.max_to_keep, args.keep_period, args.keep_time_interval, args.best_metric)
    known_rules = any(v is not None for v in rules)
    table = []
    for r in rows:
        when = datetime.datetime.fromtimestamp(r.committed_at, datetime.timezone.utc)
        kept = [reason for reason in r.reasons if known_rules or reason != REASON_KEEP_ALL]
        kept += ["leased"] if r.step in leased else []
        kept += [] if not mirror else ["remote too"] if r.step in remote else ["not remote"]
        reasons = ", ".join(kept) or ("(deleted at next save)" if known_rules else "-")
        metrics = json.dumps(r.metrics) if r.metrics is not None else ""
        table.append([str(r.step), f"{when:%Y-%m-%d %H:%M:%S}", _size(r.nbytes), reasons, metrics])
    for step, known in remote_only.items():
        table.append([str(step), "", "", "on the remote only", json.dumps(known) if known else ""])
    table.sort(key=lambda row: int(row[0]))
    header = ["step", "committed (UTC)", "size", "kept by", "metrics"]
    print(_format_table(header, table, right_aligned={0, 2}))
    for step, why in unreadable.items():
        print(f"{step:>10}  unreadable: {why}")
    if not known_rules and rows:
        print(
            "(the writer's retention rules are not known here: give --max-to-keep, "
            "--keep-period, --keep-time-interval, --best-metric to see what they keep)"
        )
    return 0


def _format_table(header: list[str], rows: list[list[str]], right_aligned: set[int]) -> str:
    """Columns as wide as their widest cell (the last one unpadded)."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.rjust(width) if i in right_aligned else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=False))
        ]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    with _open(args.directory, args) as mgr:
        step = args.step if args.step is not None else mgr.latest_step()
        items = mgr.item_metadata(step)
    described = {
        item: {path: _describe(leaf) for path, leaf in _leaves(tree, full=args.full)}
        for item, tree in items.items()
    }
    if args.json:
        print(json.dumps({"step": step, "items": described}, default=repr))
        return 0
    print(f"step {step}")
    for item, leaves in described.items():
        print(f"{item}:")
        for path, leaf in leaves.items():
            if isinstance(leaf, dict) and "dtype" in leaf:
                shape, size = str(leaf["shape"]), _size(leaf["nbytes"])
                print(f"  {path:<50} {leaf['dtype']:<12} {shape:<20} {size}")
            else:
                print(f"  {path:<50} {leaf if isinstance(leaf, _Summary) else repr(leaf)}")
    return 0


class _Summary(str):
    """What `inspect` shows for a long list of plain values (e.g. a Python RNG state)."""


def _describe(leaf: Any) -> Any:
    if _is_array(leaf):
        return {"dtype": leaf.dtype, "shape": list(leaf.shape), "nbytes": leaf.nbytes}
    return leaf


def _verify(args: argparse.Namespace) -> int:
    with _open(args.directory, args) as mgr:
        every = sorted({*mgr.all_steps(), *mgr.unreadable_steps()})
        if args.all:
            steps = every
        elif args.step is not None:
            steps = [args.step]
        else:  # the newest, readable or not
            steps = every[-1:]
            if not steps:
                raise CheckpointError(f"no checkpoint in {args.directory}")
        found: dict[int, str | None] = {}
        for step in steps:
            try:
                mgr.verify(step)
                found[step] = None
            except CheckpointError as e:
                found[step] = str(e)
            if not args.json:
                print(f"step {step}: {found[step] or 'ok'}")
    if args.json:
        print(json.dumps([{"step": s, "ok": e is None, "error": e} for s, e in found.items()]))
    return 1 if any(found.values()) else 0


def _prune(args: argparse.Namespace) -> int:
    _check_exists(args.directory)
    options = CheckpointManagerOptions(**_retention_options(args), read_only=args.dry_run)
    storage_options = _storage_options(args.storage_option)
    with _manager(args.directory, options, storage_options=storage_options) as mgr:
        steps = mgr.prune(dry_run=args.dry_run)
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "deleted": steps}))
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(steps)} step(s): {' '.join(map(str, steps)) or '-'}")
    return 0


def _sync(args: argparse.Namespace) -> int:
    pairs = args.destination_option or args.storage_option
    options = CheckpointManagerOptions(read_only=args.dry_run)
    with (
        _open(args.source, args) as src,
        _manager(args.destination, options, storage_options=_storage_options(pairs)) as dst,
    ):
        todo = src.copy_to(dst, dry_run=True)
        total = sum(r.nbytes for r in src.retention_report() if r.step in todo)
        if not args.dry_run:
            with _progress(total, f"{args.source} -> {args.destination}") as advance:
                todo = src.copy_to(dst, progress=advance)
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "copied": todo, "bytes": total}))
        return 0
    verb = "would copy" if args.dry_run else "copied"
    print(f"{verb} {len(todo)} step(s): {' '.join(map(str, todo)) or '-'} ({_size(total)})")
    return 0


def _watch(args: argparse.Namespace) -> int:
    if not args.command:
        raise CheckpointError("watch needs a command after --, e.g. -- echo {step} {path}")
    seen = 0
    with _open(args.directory, args) as mgr:
        for step in mgr.iter_new_checkpoints(
            timeout=args.timeout, poll_interval_secs=args.poll, every_step=args.every_step
        ):
            seen += 1
            path = mgr.step_directory(step)
            command = [part.format(step=step, path=path) for part in args.command]
            print(f"step {step}: {shlex.join(command)}", flush=True)
            code = subprocess.call(command)
            if code:
                print(f"command exited with {code}", file=sys.stderr)
    if not seen and args.timeout is not None:  # a mistyped directory is not a quiet run
        print(f"no checkpoint in {args.directory} within {args.timeout:g} s", file=sys.stderr)
    return 0


def _export(args: argparse.Namespace) -> int:
    if not args.hf and (args.config or args.max_shard_size):
        raise CheckpointError("--config and --max-shard-size go with --hf")
    with _open(args.directory, args) as mgr:
        step = mgr.latest_step() if args.step is None else args.step
        restored = mgr.restore(step=step, items=[args.item])
        assert restored is not None and step is not None
        report = {r.step: r for r in mgr.retention_report()}
        # its own files and those of the steps it reads (an incremental save)
        stored = sum(report[s].nbytes for s in {step, *report[step].reads} & report.keys())
    leaves = dict(_leaves(restored[args.item]))
    import numpy as np
    import torch

    arrays = (torch.Tensor, np.ndarray)
    tensors = {p: torch.as_tensor(t) for p, t in leaves.items() if isinstance(t, arrays)}
    if not tensors:
        raise CheckpointError(f"item {args.item!r} of step {step} holds no tensors to export")
    # The rest (an optimizer's param_groups, counters) rides along in the file's metadata.
    values = {p: v for p, v in leaves.items() if p not in tensors}
    # Views of one stored tensor can claim far more bytes than are stored (a crafted
    # stride of 0); exporting writes each out in full, so it is bounded by the step.
    wanted = sum(t.numel() * t.element_size() for t in tensors.values())
    if wanted > 16 * stored + (1 << 30):
        raise CheckpointError(
            f"item {args.item!r} expands to {wanted} bytes from {stored} stored; not exported"
        )
    if args.hf:
        return _export_hf(args, tensors, len(values))
    from safetensors.torch import save_file

    try:  # copies: safetensors refuses tensors that share memory, or are not contiguous
        metadata = {"checkpointing.values": json.dumps(values, default=repr)} if values else None
        save_file({p: t.contiguous().clone() for p, t in tensors.items()}, args.output, metadata)
    except (ValueError, TypeError, KeyError, RuntimeError, NotImplementedError) as e:
        raise CheckpointError(f"cannot export {args.item!r} as safetensors: {e}") from e
    kept = f", and {len(values)} other values in its metadata" if values else ""
    print(f"wrote {len(tensors)} tensors of {args.item!r} to {args.output}{kept}")
    return 0


def _export_hf(args: argparse.Namespace, tensors: dict[str, Any], n_values: int) -> int:
    """The Hugging Face layout: ``model.safetensors``, or shards and their index when the
    weights exceed ``--max-shard-size``, written by huggingface_hub itself so that
    ``from_pretrained`` reads it as its own (tied weights stored once, ``format: pt``)."""
    try:
        from huggingface_hub import save_torch_state_dict
    except ImportError as e:
        from checkpointing.storage.remote import DISTRIBUTION

        raise CheckpointError(
            f"--hf needs huggingface_hub: pip install '{DISTRIBUTION}[hf]'"
        ) from e
    config = None
    if args.config is not None:
        try:
            config = Path(args.config).read_bytes()
            json.loads(config)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"--config {args.config}: not a readable JSON file ({e})") from e
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise CheckpointError(f"--hf writes a directory; {output} is a file")
    # A nested item's paths become the dotted names a state_dict uses.
    state = {name.replace("/", "."): t for name, t in tensors.items()}
    output.mkdir(parents=True, exist_ok=True)
    try:
        save_torch_state_dict(state, output, max_shard_size=args.max_shard_size or "5GB")
    except (ValueError, TypeError, KeyError, RuntimeError, NotImplementedError) as e:
        raise CheckpointError(f"cannot export {args.item!r} in the Hugging Face layout: {e}") from e
    if config is not None:
        (output / "config.json").write_bytes(config)
    files = sorted(p.name for p in output.glob("model*.safetensors*"))
    left = f"; {n_values} values that are not tensors left out" if n_values else ""
    print(f"wrote {len(tensors)} tensors of {args.item!r} to {output}: {', '.join(files)}{left}")
    return 0


def _is_array(leaf: Any) -> bool:
    from checkpointing.restoring import TensorMetadata

    return isinstance(leaf, TensorMetadata)


def _leaves(tree: Any, prefix: str = "", *, full: bool = True) -> Iterator[tuple[str, Any]]:
    """Every leaf by its path; unless ``full``, a list of more than 8 plain values is one
    `_Summary` leaf."""
    children: Any = None
    if isinstance(tree, dict):
        children = tree.items()
    elif isinstance(tree, list | tuple):
        children = enumerate(tree)
        if (
            not full
            and len(tree) > 8
            and not any(isinstance(v, dict | list | tuple) or _is_array(v) for v in tree)
        ):
            kinds = "/".join(sorted({type(v).__name__ for v in tree}))
            yield prefix or "<value>", _Summary(f"<{len(tree)} {kinds} values; --full shows them>")
            return
    if children is None:
        yield prefix or "<value>", tree
        return
    for key, child in children:
        yield from _leaves(child, f"{prefix}/{key}" if prefix else str(key), full=full)


@contextmanager
def _progress(total: int, label: str) -> Iterator[Callable[[int], object]]:
    """A progress bar on a terminal; silence in pipes and logs."""
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr) as bar:
        yield bar.update


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="checkpointing", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="name", required=True)

    def command(
        name: str, run: Callable[[argparse.Namespace], int], help: str, *, directory: bool = True
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        if directory:
            sub.add_argument("directory", help="checkpoint directory (path or URL)")
        sub.add_argument(
            "--storage-option",
            action="append",
            default=[],
            type=_storage_option,
            metavar="KEY=VALUE",
            help="an fsspec filesystem option, e.g. client_kwargs.endpoint_url=http://host:9000 "
            "(dots reach into nested options; VALUE is JSON if it parses, else a string)",
        )
        if name not in ("watch", "export"):
            sub.add_argument("--json", action="store_true", help="machine-readable output")
        sub.set_defaults(run=run)
        return sub

    def retention(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--max-to-keep", type=int)
        sub.add_argument("--keep-period", type=int)
        sub.add_argument("--keep-time-interval", type=float, metavar="SECONDS")
        sub.add_argument("--best-metric", help="'/'-separated path into the metrics")
        sub.add_argument("--best-mode", choices=("min", "max"), default="max")

    ls = command("ls", _ls, "list committed steps: size, metrics, what keeps each")
    ls.add_argument("--remote", metavar="URL", help="the mirror's remote: what it lacks")
    retention(ls)
    inspect = command("inspect", _inspect, "items and tensors of a step, from headers only")
    inspect.add_argument("--step", type=int, help="default: the latest")
    inspect.add_argument("--full", action="store_true", help="every value of long lists")
    verify = command("verify", _verify, "check sizes and checksums; exit 1 on a mismatch")
    which = verify.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="default: the latest")
    which.add_argument("--all", action="store_true")
    prune = command("prune", _prune, "apply a retention configuration")
    retention(prune)
    prune.add_argument("--dry-run", action="store_true", help="only say what would go")
    sync = command("sync", _sync, "copy committed steps to another directory", directory=False)
    sync.add_argument("source")
    sync.add_argument("destination")
    sync.add_argument(
        "--destination-option",
        action="append",
        default=[],
        type=_storage_option,
        metavar="KEY=VALUE",
        help="a storage option of the destination alone (default: the --storage-option ones)",
    )
    sync.add_argument("--dry-run", action="store_true", help="only say what would be copied")
    sync.description = (
        "copy committed steps the destination lacks, then protections and recorded metrics; "
        "nothing in the destination is deleted"
    )
    watch = command("watch", _watch, "run a command for each new checkpoint")
    watch.add_argument("--timeout", type=float, help="stop after this long without one")
    watch.add_argument("--poll", type=float, default=5.0, help="seconds between listings")
    watch.add_argument("--every-step", action="store_true", help="not only the newest")
    watch.epilog = "then: -- COMMAND ARGS..., where {step} and {path} are filled in"
    export = command("export", _export, "write one item as a plain safetensors file")
    export.add_argument("--step", type=int, help="default: the latest")
    export.add_argument("--item", required=True)
    export.add_argument(
        "--hf",
        action="store_true",
        help="OUTPUT is a directory in the Hugging Face layout (from_pretrained loads it)",
    )
    export.add_argument("--max-shard-size", help="with --hf: e.g. 500MB (default: 5GB)")
    export.add_argument("--config", metavar="FILE", help="with --hf: copied as config.json")
    export.add_argument("output")
    return parser


# The library's advice names Python arguments; here it names what a command line can do.
_COMMAND_LINE_TERMS = (
    (
        "open this one with read_only=True to read",
        "ls, inspect, verify, watch and export read it meanwhile; prune it, or sync into "
        "it, once that writer has stopped",
    ),
    (
        "the endpoint in storage_options",
        "the endpoint (--storage-option client_kwargs.endpoint_url=URL)",
    ),
)


def _in_command_line_terms(message: str) -> str:
    for library, command_line in _COMMAND_LINE_TERMS:
        message = message.replace(library, command_line)
    return message


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = _parser()
    args, extra = parser.parse_known_args(argv[: len(argv) - len(command) - (1 if command else 0)])
    if extra:
        hint = "; the command to run goes after --" if args.name == "watch" else ""
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    args.command = command
    for stream in (sys.stdout, sys.stderr):  # names from a checkpoint may not encode
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    logging.basicConfig(format="checkpointing: %(levelname)s: %(message)s")
    logging.addLevelName(logging.WARNING, "warning")
    try:
        code = int(args.run(args))
        sys.stdout.flush()  # here, where a closed pipe is caught
        return code
    except BrokenPipeError:  # `checkpointing ls | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 0
    except (CheckpointError, OSError) as e:
        print(f"checkpointing: error: {_in_command_line_terms(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
