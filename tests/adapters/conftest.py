"""Adapter tests. Those of a trainer library run in that library's own virtual
environment (``dev.py`` makes them); elsewhere their directory is not collected, and the
library's own CI step fails if it collects nothing."""

from __future__ import annotations

import importlib.util

collect_ignore = [
    directory
    for directory, module in (("robo_orchard", "robo_orchard_lab"), ("helios", "helios"))
    if importlib.util.find_spec(module) is None
]
