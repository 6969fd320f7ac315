"""The package's public names: imported on first use, each typed for checkers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import checkpointing


def test_every_public_name_resolves_and_is_declared_for_type_checkers() -> None:
    source = ast.parse(Path(checkpointing.__file__).read_text())
    declared = {
        alias.asname or alias.name
        for node in ast.walk(source)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("checkpointing")
        for alias in node.names
    }
    assert declared == set(checkpointing.__all__)
    for name in checkpointing.__all__:
        value = getattr(checkpointing, name)
        assert getattr(value, "__name__", name) == name
    assert "CheckpointManager" in dir(checkpointing)


def test_errors_and_options_import_without_torch() -> None:
    probe = (
        "import sys; sys.modules['torch'] = None\n"
        "from checkpointing import CheckpointError, CheckpointManagerOptions, KeepLatest\n"
        "CheckpointManagerOptions(max_to_keep=KeepLatest(2).n)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    ("url", "module", "extra"), [("s3://b/r", "s3fs", "s3"), ("gs://b/r", "gcsfs", "gcs")]
)
def test_a_missing_extra_is_named(url: str, module: str, extra: str) -> None:
    probe = (
        f"import sys; sys.modules[{module!r}] = None  # not installed\n"
        "from checkpointing import CheckpointManager, InvalidOptionError\n"
        f"try:\n    CheckpointManager({url!r})\n"
        "except InvalidOptionError as e:\n    print(e)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert f"pip install 'torch-checkpoint-manager[{extra}]'" in out.stdout, out.stderr
