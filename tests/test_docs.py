"""The documentation's runnable snippets run, as a reader would paste them."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(page: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", (DOCS / page).read_text(), re.M | re.S)


def test_the_quickstart_runs_and_resumes(tmp_path: Path) -> None:
    (script,) = python_blocks("quickstart.md")
    assert len(script.splitlines()) <= 25, "the quickstart stays short"
    runs = [
        subprocess.run(
            [sys.executable, "-c", script],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert runs[0].stdout == runs[1].stdout == "kept: [70, 80, 90] best: 90\n"
    assert (tmp_path / "runs" / "quickstart" / "ckpt" / "step_00000090").is_dir()


def test_the_retention_picture_is_what_the_policies_decide() -> None:
    spec = importlib.util.spec_from_file_location("timeline", DOCS / "retention_timeline.py")
    assert spec is not None and spec.loader is not None
    timeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timeline)
    assert (DOCS / "retention.svg").read_text() == timeline.svg(), "run docs/retention_timeline.py"
    _, keep = timeline.survivors()
    assert sorted(keep) == [100, 500, 700, 1000, 1300, 1400, 1500, 1600, 1800, 1900, 2000]
