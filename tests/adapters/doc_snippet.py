"""Run an adapter's section of docs/adapters.md in this environment, so the snippet a
user copies stays true for trainer libraries that live in side environments."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from resume_check import ENV, ROOT


def run_adapter_snippet(adapter: str, prelude: str, check: str, cwd: Path) -> None:
    """Run ``prelude`` (what a user already has), the snippet that imports
    ``trainer_adapters.<adapter>``, then ``check``, in a fresh interpreter in ``cwd``."""
    page = (ROOT / "docs" / "adapters.md").read_text()
    (snippet,) = [
        block
        for block in re.findall(r"^```python\n(.*?)^```$", page, re.M | re.S)
        if f"from trainer_adapters.{adapter} import" in block
    ]
    program = "\n".join([prelude, snippet, check])
    run = subprocess.run(
        [sys.executable, "-c", program], cwd=cwd, env=ENV, capture_output=True, text=True,
        timeout=300,
    )
    assert run.returncode == 0, f"{program}\n{run.stdout}\n{run.stderr}"
