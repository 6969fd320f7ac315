"""Draw docs/retention.svg: which saved steps each retention rule keeps, computed by the
library's own pure policies (so the picture cannot drift from the code).

    .venv/bin/python docs/retention_timeline.py   # rewrites docs/retention.svg

A run saves every 100 steps, one save per 20 minutes, with an evaluation loss; after each
save, retention deletes what no rule keeps (`decide_retention`), as the manager does.
"""

from __future__ import annotations

from pathlib import Path

from checkpointing.policies import (
    CheckpointInfo,
    KeepAnyOf,
    KeepBest,
    KeepEveryNSeconds,
    KeepEveryNSteps,
    KeepLatest,
    decide_retention,
)

LOSSES = [0.9, 0.7, 0.62, 0.55, 0.58, 0.49, 0.51, 0.44, 0.47, 0.45, 0.41, 0.43,
          0.42, 0.40, 0.44, 0.39, 0.43, 0.41, 0.42, 0.45]  # fmt: skip
RULES = [
    ("latest 3", KeepLatest(3)),
    ("every 500 steps", KeepEveryNSteps(500)),
    ("one per 7200s", KeepEveryNSeconds(7200)),
    ("best 2 by loss", KeepBest(2, "loss", mode="min")),
]
CELL, LABEL, TOP = 34, 150, 46


def survivors() -> tuple[list[CheckpointInfo], dict[int, tuple[str, ...]]]:
    """Every save, and the reasons each survivor is kept at the end of the run."""
    policy = KeepAnyOf(*(rule for _, rule in RULES))
    saved = [
        CheckpointInfo(100 * (i + 1), 1200.0 * i, {"loss": loss}) for i, loss in enumerate(LOSSES)
    ]
    alive: list[CheckpointInfo] = []
    keep: dict[int, tuple[str, ...]] = {}
    for info in saved:
        alive.append(info)
        decision = decide_retention(alive, policy, now=info.time)
        keep = dict(decision.keep)
        alive = [a for a in alive if a.step in keep]
    return saved, keep


def svg() -> str:
    saved, keep = survivors()
    rows = [*(name for name, _ in RULES), "kept (any rule)"]
    width, height = LABEL + CELL * len(saved) + 10, TOP + CELL * len(rows) + 30
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{LABEL}" y="16">steps saved (every 100, one save per 20 minutes);'
        f" filled: kept at the end of the run</text>",
    ]
    for i, info in enumerate(saved):
        x = LABEL + i * CELL + CELL // 2
        out.append(f'<text x="{x}" y="{TOP - 10}" text-anchor="middle">{info.step}</text>')
    for r, row in enumerate(rows):
        y = TOP + r * CELL
        out.append(f'<text x="{LABEL - 8}" y="{y + CELL // 2 + 4}" text-anchor="end">{row}</text>')
        for i, info in enumerate(saved):
            reasons = keep.get(info.step, ())
            last = r == len(rows) - 1
            kept = bool(reasons) if last else any(_is_rule(row, r) for r in reasons)
            fill = ("#2b6cb0" if not last else "#2f855a") if kept else "#edf2f7"
            x = LABEL + i * CELL
            out.append(
                f'<rect x="{x + 2}" y="{y + 2}" width="{CELL - 4}" height="{CELL - 4}" '
                f'rx="4" fill="{fill}"/>'
            )
    y = TOP + len(rows) * CELL + 18
    out.append(f'<text x="{LABEL - 8}" y="{y}" text-anchor="end" fill="#4a5568">loss</text>')
    for i, info in enumerate(saved):
        x = LABEL + i * CELL + CELL // 2
        loss = (info.metrics or {})["loss"]
        out.append(f'<text x="{x}" y="{y}" text-anchor="middle" fill="#4a5568">{loss:g}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _is_rule(row: str, reason: str) -> bool:
    """Whether ``reason`` (as `retention_report` shows it) is the rule of ``row``."""
    return reason.startswith(row)


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__).parse_args()  # --help, and nothing else
    target = Path(__file__).with_name("retention.svg")
    target.write_text(svg())
    print(f"wrote {target}")
