"""Adapter tests. Those of a trainer library run in that library's own virtual
environment (``dev.py`` makes them); elsewhere their directory is not collected, and the
library's own CI step fails if it collects nothing."""

from __future__ import annotations

import importlib.util


def _installed(module: str) -> bool:
    # A test directory of the same name (on sys.path through tests/adapters) is found as
    # a namespace package, without an origin; the real library is a regular package.
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.origin is not None


collect_ignore = [
    directory
    for directory, module in (("robo_orchard", "robo_orchard_lab"), ("helios", "helios"))
    if not _installed(module)
]
