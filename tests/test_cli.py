"""The `checkpointing` console script, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpointing import CheckpointManager, CheckpointManagerOptions

SCRIPT = str(Path(sys.executable).parent / "checkpointing")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    directory = tmp_path / "ckpt"
    model = torch.nn.Linear(4, 3)
    with CheckpointManager(
        directory, CheckpointManagerOptions(enable_async_checkpointing=False)
    ) as m:
        for step, loss in ((10, 0.5), (20, 0.2), (30, 0.4)):
            m.save(step, {"model": model, "extra": {"epoch": step // 10}}, metrics={"loss": loss})
    return directory


def test_ls_table_and_json(ckpt: Path) -> None:
    table = run(
        "ls", str(ckpt), "--max-to-keep", "1", "--best-metric", "loss", "--best-mode", "min"
    )
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert "kept by" in lines[0] and len(lines) == 4
    assert "best 1 by loss (min)" in lines[2] and "latest" in lines[3]
    assert "deleted at next save" in lines[1]
    rows = json.loads(run("ls", str(ckpt), "--json").stdout)
    assert [r["step"] for r in rows] == [10, 20, 30] and rows[0]["metrics"] == {"loss": 0.5}


def test_ls_and_prune_know_the_time_interval_rule(ckpt: Path) -> None:
    """Without it, `ls` marked a step the writer keeps by keep_time_interval as deleted at
    the next save, and `prune` with the same flags deleted it (a new user's trial)."""
    rules = ["--max-to-keep", "1", "--keep-time-interval", "3600"]
    table = run("ls", str(ckpt), *rules)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert "one per 3600s" in lines[1] and "deleted at next save" in lines[2]
    assert run("prune", str(ckpt), *rules).stdout.strip() == "deleted 1 step(s): 20"
    assert [r["step"] for r in json.loads(run("ls", str(ckpt), "--json").stdout)] == [10, 30]


def test_inspect_reads_headers_only(ckpt: Path) -> None:
    out = run("inspect", str(ckpt), "--step", "20")
    assert out.returncode == 0, out.stderr
    assert "step 20" in out.stdout and "weight" in out.stdout and "float32" in out.stdout
    assert "[3, 4]" in out.stdout and "epoch" in out.stdout


def test_verify_detects_corruption(ckpt: Path) -> None:
    assert run("verify", str(ckpt), "--all").returncode == 0
    data = ckpt / "step_00000020" / "model.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    out = run("verify", str(ckpt), "--all")
    assert out.returncode == 1
    assert "step 10: ok" in out.stdout and "step 20:" in out.stdout and "checksum" in out.stdout


def test_prune_dry_run_then_for_real(ckpt: Path) -> None:
    dry = run("prune", str(ckpt), "--max-to-keep", "1", "--dry-run")
    assert dry.returncode == 0 and "would delete 2 step(s): 10 20" in dry.stdout
    assert len(list(ckpt.glob("step_*"))) == 3
    real = run("prune", str(ckpt), "--max-to-keep", "1")
    assert real.returncode == 0 and "deleted 2 step(s)" in real.stdout
    assert [p.name for p in ckpt.glob("step_*")] == ["step_00000030"]


def test_sync_copies_committed_steps(ckpt: Path, tmp_path: Path) -> None:
    out = run("sync", str(ckpt), str(tmp_path / "copy"))
    assert out.returncode == 0 and "copied 3 step(s)" in out.stdout
    assert run("verify", str(tmp_path / "copy"), "--all").returncode == 0
    again = run("sync", str(ckpt), str(tmp_path / "copy"))
    assert "copied 0 step(s)" in again.stdout


def test_sync_carries_protections_and_recorded_metrics_and_can_dry_run(
    ckpt: Path, tmp_path: Path
) -> None:
    """The trial's finding: `sync` dropped protected.json and the evaluators' metrics, so
    the copy's retention deleted pinned steps and ranked without the eval scores."""
    with CheckpointManager(ckpt) as mgr:
        mgr.protect(10)
    with CheckpointManager(ckpt, CheckpointManagerOptions(read_only=True)) as evaluator:
        evaluator.record_metrics(20, {"accuracy": 0.9})
    copy = tmp_path / "copy"
    dry = run("sync", str(ckpt), str(copy), "--dry-run")
    assert dry.returncode == 0 and "would copy 3 step(s): 10 20 30" in dry.stdout, dry.stderr
    assert not copy.exists()
    assert "copied 3 step(s): 10 20 30" in run("sync", str(ckpt), str(copy)).stdout
    options = CheckpointManagerOptions(max_to_keep=1, read_only=True)
    with CheckpointManager(copy, options) as copied:
        assert copied.metrics(20) == {"loss": 0.2, "accuracy": 0.9}
        kept = {r.step: r.reasons for r in copied.retention_report() if r.kept}
        assert kept.keys() == {10, 30} and kept[10] == ("protected",)
    with CheckpointManager(ckpt, CheckpointManagerOptions(read_only=True)) as evaluator:
        evaluator.record_metrics(30, {"accuracy": 0.8})
    again = run("sync", str(ckpt), str(copy))  # no step to copy, metrics to carry still
    assert "copied 0 step(s)" in again.stdout
    with CheckpointManager(copy, CheckpointManagerOptions(read_only=True)) as copied:
        assert copied.metrics(30) == {"loss": 0.4, "accuracy": 0.8}


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("endpoint_url", "expected KEY=VALUE"),
        ("=x", "expected KEY=VALUE"),
        ("client_kwargs..region=x", "expected KEY=VALUE"),
    ],
)
def test_malformed_storage_options_are_usage_errors(ckpt: Path, flag: str, message: str) -> None:
    out = run("ls", str(ckpt), "--storage-option", flag)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_a_storage_option_set_twice_is_a_usage_error(ckpt: Path) -> None:
    clash = run("ls", str(ckpt), "--storage-option", "a=1", "--storage-option", "a.b=2")
    assert clash.returncode == 2 and "--storage-option a is given a value already" in clash.stderr
    again = run("ls", str(ckpt), "--storage-option", "a.b=1", "--storage-option", "a.b=2")
    assert again.returncode == 2 and "--storage-option a.b is given a value" in again.stderr


def test_watch_runs_a_command_per_new_checkpoint(ckpt: Path, tmp_path: Path) -> None:
    log = tmp_path / "log"
    cmd = f"import sys; open({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')"
    out = run(
        "watch",
        str(ckpt),
        "--timeout",
        "0.5",
        "--poll",
        "0.1",
        "--every-step",
        "--",
        sys.executable,
        "-c",
        cmd,
        "{step}",
        "{path}",
    )
    assert out.returncode == 0, out.stderr
    assert log.read_text().splitlines() == [
        f"{step} {ckpt}/step_{step:08d}" for step in (10, 20, 30)
    ]


def test_watch_says_where_its_command_goes_and_when_it_saw_nothing(
    ckpt: Path, tmp_path: Path
) -> None:
    forgot = run("watch", str(ckpt), "echo", "{step}")
    assert forgot.returncode == 2 and "the command to run goes after --" in forgot.stderr
    nothing = run("watch", str(tmp_path / "mistyped"), "--timeout", "0.3", "--", "true")
    assert nothing.returncode == 0
    assert f"no checkpoint in {tmp_path / 'mistyped'} within 0.3 s" in nothing.stderr


def test_a_locked_directory_is_explained_in_command_line_terms(ckpt: Path) -> None:
    """The library's advice (read_only=True) means nothing to a shell user."""
    with CheckpointManager(ckpt, CheckpointManagerOptions(enable_async_checkpointing=False)):
        out = run("prune", str(ckpt), "--max-to-keep", "1")
    assert out.returncode == 2 and "another CheckpointManager is writing" in out.stderr
    assert "read_only" not in out.stderr and "once that writer has stopped" in out.stderr
    assert run("ls", str(ckpt)).returncode == 0


def test_export_writes_plain_safetensors(ckpt: Path, tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    out = run("export", str(ckpt), "--step", "20", "--item", "model", str(target))
    assert out.returncode == 0, out.stderr
    assert set(load_file(target)) == {"weight", "bias"}


def test_export_hf_is_loaded_by_from_pretrained(tmp_path: Path) -> None:
    """A tiny GPT-2 (tied embeddings) exported in shards with an index loads with
    transformers' own ``from_pretrained``, every weight equal and still tied."""
    import transformers  # the [hf] extra
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    with CheckpointManager(tmp_path / "ckpt") as m:
        m.save(7, {"model": model, "extra": {"epoch": 1}})
    config.save_pretrained(tmp_path / "cfg")
    target = tmp_path / "hf"
    out = run(
        "export", str(tmp_path / "ckpt"), "--item", "model", "--hf", str(target),
        "--config", str(tmp_path / "cfg" / "config.json"), "--max-shard-size", "10KB",
    )
    assert out.returncode == 0, out.stderr
    index = json.loads((target / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((target / name).is_file() for name in shards)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(target)
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_export_hf_user_errors(ckpt: Path, tmp_path: Path) -> None:
    target = tmp_path / "out"
    for args, message in (
        (["--config", "c.json", str(target)], "go with --hf"),
        (["--hf", "--config", str(tmp_path / "none.json"), str(target)], "not a readable JSON"),
        (["--hf", "--max-shard-size", "lots", str(target)], "Hugging Face layout"),
    ):
        out = run("export", str(ckpt), "--item", "model", *args)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
    (tmp_path / "file").write_text("x")
    out = run("export", str(ckpt), "--item", "model", "--hf", str(tmp_path / "file"))
    assert out.returncode == 2 and "is a file" in out.stderr
    single = run("export", str(ckpt), "--item", "model", "--hf", str(target))
    assert single.returncode == 0, single.stderr
    assert set(load_file(target / "model.safetensors")) == {"weight", "bias"}


def test_user_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    out = run("inspect", str(tmp_path / "missing"))
    assert out.returncode == 2
    assert out.stderr.startswith("checkpointing: error:") and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_missing_directory_is_an_error_not_an_empty_table(tmp_path: Path) -> None:
    for command in ("ls", "verify", "inspect", "prune"):
        out = run(command, str(tmp_path / "missing"))
        assert out.returncode == 2 and "no such directory" in out.stderr, (command, out)
    assert not (tmp_path / "missing").exists()


def test_output_into_a_closed_pipe_is_quiet(ckpt: Path) -> None:
    """`checkpointing ls DIR | head -1` printed "Broken pipe" and exited 2."""
    child = subprocess.Popen(
        [SCRIPT, "ls", str(ckpt)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # the reader is gone before anything is written
    assert child.wait(timeout=120) == 0
    assert child.stderr.read() == b""


def test_ls_without_the_writers_rules_says_so(ckpt: Path) -> None:
    out = run("ls", str(ckpt))
    lines = out.stdout.splitlines()
    assert "max_to_keep=None" not in out.stdout and "rules are not known" in lines[-1]
    assert lines[1].split()[5] == "-" and "latest" in lines[3]  # step, date, time, size


def test_version_json_everywhere_and_a_short_inspect(ckpt: Path, tmp_path: Path) -> None:
    import random

    from checkpointing import __version__

    assert run("--version").stdout.strip() == f"checkpointing {__version__}"
    directory = tmp_path / "rng"
    with CheckpointManager(
        directory, CheckpointManagerOptions(enable_async_checkpointing=False)
    ) as m:
        m.save(1, {"rng": {"python": random.getstate()}})
    short = run("inspect", str(directory))
    assert short.returncode == 0 and len(short.stdout.splitlines()) < 10, short.stdout
    assert "625 int values" in short.stdout
    assert len(run("inspect", str(directory), "--full").stdout.splitlines()) > 625
    described = json.loads(run("inspect", str(ckpt), "--json", "--step", "20").stdout)
    assert described["items"]["model"]["weight"] == {
        "dtype": "float32",
        "shape": [3, 4],
        "nbytes": 48,
    }
    assert json.loads(run("verify", str(ckpt), "--all", "--json").stdout) == [
        {"step": s, "ok": True, "error": None} for s in (10, 20, 30)
    ]
    pruned = json.loads(run("prune", str(ckpt), "--max-to-keep", "1", "--dry-run", "--json").stdout)
    assert pruned == {"dry_run": True, "deleted": [10, 20]}


def test_export_refuses_an_item_without_tensors_and_keeps_other_values(
    tmp_path: Path,
) -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.25)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    directory = tmp_path / "ckpt"
    with CheckpointManager(
        directory, CheckpointManagerOptions(enable_async_checkpointing=False)
    ) as m:
        m.save(1, {"optimizer": opt, "extra": {"epoch": 3}})
    empty = run("export", str(directory), "--item", "extra", str(tmp_path / "e.safetensors"))
    assert empty.returncode == 2 and "holds no tensors" in empty.stderr
    assert not (tmp_path / "e.safetensors").exists()
    out = run("export", str(directory), "--item", "optimizer", str(tmp_path / "o.safetensors"))
    assert out.returncode == 0 and "other values in its metadata" in out.stdout, out.stderr
    from safetensors import safe_open

    with safe_open(str(tmp_path / "o.safetensors"), "pt") as f:
        values = json.loads(f.metadata()["checkpointing.values"])
    assert values["param_groups/0/lr"] == 0.25


def test_help_and_version_do_not_import_torch() -> None:
    """`checkpointing --help` took 5-7 s: torch was imported before argparse ran."""
    for flag in ("--help", "--version"):
        probe = (
            "import sys; sys.modules['torch'] = None  # importing it now fails\n"
            f"from checkpointing.cli import main; main([{flag!r}])"
        )
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0 and "checkpointing" in out.stdout, out.stderr
