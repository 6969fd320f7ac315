#!/usr/bin/env python3
"""Set-up and entry points for a fresh machine: ``python3 dev.py demo`` / ``python3 dev.py test``.

Each command creates ``.venv`` (once), installs the pinned CPU build of torch first (an
unpinned torch would pull gigabytes of CUDA packages), then this project with its extras,
and runs. A stamp file skips the install when nothing changed, so re-running is fast.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
TORCH = "torch==2.13.0"


def _run(*cmd: str | Path) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)


def ensure_env() -> None:
    """Create the virtual environment and install what changed since last time."""
    if not PY.exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / ".installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH.encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return
    pip = (PY, "-m", "pip", "install", "--disable-pip-version-check", "-q")
    _run(*pip, TORCH)
    _run(*pip, "-e", ".[all,test]")
    stamp.write_text(want)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test"):
        print(__doc__)
        return 2
    ensure_env()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if argv[0] == "demo":
        return subprocess.run(
            [str(PY), "examples/demo.py", *argv[1:]], cwd=ROOT, env=env
        ).returncode
    checks = [
        [str(PY), "-m", "ruff", "check", "."],
        [str(PY), "-m", "mypy", "checkpointing", "trainer_adapters"],
        [str(PY), "-m", "pytest", *argv[1:]],
    ]
    for cmd in checks:
        print("+", " ".join(cmd), flush=True)
        code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
