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


def test_export_writes_plain_safetensors(ckpt: Path, tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    out = run("export", str(ckpt), "--step", "20", "--item", "model", str(target))
    assert out.returncode == 0, out.stderr
    assert set(load_file(target)) == {"weight", "bias"}


def test_user_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    out = run("inspect", str(tmp_path / "missing"))
    assert out.returncode == 2
    assert out.stderr.startswith("checkpointing: error:") and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
