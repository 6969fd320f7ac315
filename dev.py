#!/usr/bin/env python3
"""Set-up and entry points for a fresh machine: ``python3 dev.py demo`` / ``python3 dev.py test``
(and ``python3 dev.py docs``: the documentation site into ``site/``).

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

import tomllib

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
    constraints = ROOT / "dev-constraints.txt"  # tested versions: no resolver backtracking
    inputs = (ROOT / "pyproject.toml").read_bytes() + constraints.read_bytes() + TORCH.encode()
    want = hashlib.sha256(inputs).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return
    pip = (PY, "-m", "pip", "install", "--disable-pip-version-check", "-q")
    _run(*pip, TORCH)
    _run(*pip, "-c", constraints, "-e", ".[all,test]")
    stamp.write_text(want)


# Trainer libraries whose pins clash with the main environment (robo-orchard-lab: numpy<2,
# pydantic<=2.10.6; helios-ml: numpy>=2.1) get an environment each, for the adapter tests
# under tests/adapters/<dir>. Torch stays the CPU build through a constraints file;
# robo-orchard-lab installs with --no-deps plus the modules it really imports.
SIDE_ENVS: dict[str, tuple[str, list[list[str]]]] = {
    ".venv-robo": (
        "tests/adapters/robo_orchard",
        [
            ["--no-deps", "robo-orchard-lab==0.4.0", "robo-orchard-core==0.4.0",
             "torchvision==0.28.0"],
            ["accelerate", "numpy<2", "pydantic<=2.10.6", "pydantic-settings", "safetensors",
             "fsspec", "huggingface_hub", "ordered-set", "rtoml", "pyyaml", "deprecated",
             "numpydantic", "cloudpickle", "transformers<5", "pillow"],
        ],
    ),
    ".venv-helios": (
        "tests/adapters/helios",
        [
            ["--no-deps", "helios-ml==2.0.1", "torchvision==0.28.0"],
            ["numpy>=2.1", "tqdm", "packaging", "pillow", "opencv-python-headless",
             "matplotlib"],
        ],
    ),
}


def ensure_side_env(name: str) -> Path:
    """Create (once) a trainer library's environment: torch, the library, this project's
    own dependencies and pytest; the project itself comes from PYTHONPATH."""
    env_dir = ROOT / name
    py = env_dir / "bin" / "python"
    steps = SIDE_ENVS[name][1]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    own = [d for d in project["dependencies"] if not d.startswith("torch")]
    stamp = env_dir / ".installed"
    want = hashlib.sha256(repr((TORCH, steps, own)).encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return py
    if not py.exists():
        venv.EnvBuilder(with_pip=True).create(env_dir)
    constraints = env_dir / "constraints.txt"
    constraints.write_text(TORCH + "\n")
    pip = (py, "-m", "pip", "install", "--disable-pip-version-check", "-q", "-c", constraints)
    _run(*pip, TORCH)
    for step in steps:
        _run(*pip, *step)
    _run(*pip, *own, "pytest>=8", "pytest-timeout>=2.3")
    stamp.write_text(want)
    return py


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "docs"):
        print(__doc__)
        return 2
    ensure_env()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_MKDOCS_2_WARNING": "1"}
    docs = [str(PY), "-m", "mkdocs", "build", "--strict", "--quiet"]  # a broken link fails
    if argv[0] == "docs":
        return subprocess.run([*docs, "-d", "site"], cwd=ROOT, env=env).returncode
    if argv[0] == "demo":
        return subprocess.run(
            [str(PY), "examples/demo.py", *argv[1:]], cwd=ROOT, env=env
        ).returncode
    checks = [
        [str(PY), "-m", "ruff", "check", "."],
        [str(PY), "-m", "mypy", "checkpointing", "trainer_adapters", "benchmarks"],
        [str(VENV / "bin" / "lint-imports")],  # the layering in pyproject.toml
        [*docs, "-d", str(VENV / "site")],  # the documentation site, checked
        [str(PY), "-m", "pytest", *argv[1:]],
    ]
    for cmd in checks:
        print("+", " ".join(cmd), flush=True)
        code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        if code:
            return code
    if argv[1:]:  # a selection of the main suite was asked for; the rest is not
        return 0
    side_env = {**env, "PYTHONPATH": str(ROOT)}
    for name, (tests, _) in SIDE_ENVS.items():
        cmd = [str(ensure_side_env(name)), "-m", "pytest", "-p", "no:cacheprovider", tests]
        print("+", " ".join(cmd), flush=True)
        code = subprocess.run(cmd, cwd=ROOT, env=side_env).returncode
        if code:  # 5, nothing collected: the library did not import
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
