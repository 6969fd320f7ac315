"""Adapter tests. Those of a trainer library run in that library's own virtual
environment (``dev.py`` makes them); elsewhere their directory is not collected, and the
library's own CI step fails if it collects nothing."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


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


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Callable[..., Path]:
    """Uninterrupted runs of the test module's ``train(out, *args, **kwargs)``, each made
    once per module and shared by the tests that compare against it."""
    cache: dict[tuple[Any, ...], Path] = {}

    def get(*args: Any, **kwargs: Any) -> Path:
        key = (*args, *sorted(kwargs.items()))
        if key not in cache:
            cache[key] = tmp_path_factory.mktemp("ref")
            request.module.train(cache[key], *args, **kwargs)
        return cache[key]

    return get
