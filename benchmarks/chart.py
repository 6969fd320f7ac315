"""A bar chart of GB/s from a `save_restore.py --json` result: this library, its peers
and the disk, saves and restores side by side. Plain SVG, no plotting library.

    .venv/bin/python benchmarks/chart.py RESULT.json CHART.svg
"""

from __future__ import annotations

import json
import statistics
import sys
from html import escape
from pathlib import Path
from typing import Any

OURS, DISK = "this library", "disk O_DIRECT"
COLORS = {"ours": "#2b7bb9", "peer": "#9aa5b1", "disk": "#4d9a52"}
ROW, BAR, LEFT, WIDTH = 22, 15, 300, 800


def bars(result: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(label, kind, GB/s) for every method and operation, saves first, fastest first;
    the disk's rows are its limits (its write, and the faster of its O_DIRECT reads)."""
    gb = result["state_bytes"] / 1e9
    saves: list[tuple[str, str, float]] = []
    restores: list[tuple[str, str, float]] = []
    for method, ops in result["results"].items():
        if method != DISK and (method.startswith("disk") or method.startswith("fresh")):
            continue  # references (one reused buffer, first touch of memory), not limits
        for op, samples in ops.items():
            if not samples or (method == DISK and op not in ("write+fsync", "read O_DIRECT")):
                continue
            seconds = statistics.median(s["seconds"] for s in samples)
            kind = "ours" if method == OURS else "disk" if method == DISK else "peer"
            saving = "save" in op or "write" in op
            (saves if saving else restores).append((f"{method}: {op}", kind, gb / seconds))
    return sorted(saves, key=lambda r: -r[2]) + sorted(restores, key=lambda r: -r[2])


def svg(rows: list[tuple[str, str, float]], title: str) -> str:
    top = max(rate for _, _, rate in rows)
    scale = (WIDTH - LEFT - 90) / top  # room for the label of the longest bar
    height = 40 + ROW * len(rows) + 20
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
        f'<text x="10" y="20" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]
    for i, (label, kind, rate) in enumerate(rows):
        y = 34 + i * ROW
        out.append(f'<text x="{LEFT - 8}" y="{y + 12}" text-anchor="end">{escape(label)}</text>')
        out.append(
            f'<rect x="{LEFT}" y="{y}" width="{rate * scale:.1f}" height="{BAR}" '
            f'fill="{COLORS[kind]}"/>'
        )
        out.append(f'<text x="{LEFT + rate * scale + 6:.1f}" y="{y + 12}">{rate:.2f} GB/s</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> None:
    source, target = Path(argv[0]), Path(argv[1])
    result = json.loads(source.read_text())
    gb = result["state_bytes"] / 1e9
    title = (
        f"Durable save and cold restore of {gb:.1f} GB (GB/s, medians of "
        f"{result['rounds']} rounds; higher is faster)"
    )
    target.write_text(svg(bars(result), title))


if __name__ == "__main__":
    main(sys.argv[1:])
