"""Test-only: let PyPI's CUDA build of torchvision import on CPU-only torch.

Its C++ ops do not load against the CPU torch, and importing it fails with "operator
torchvision::nms does not exist" (registering fake kernels needs the schemas). Defining
the two op schemas first lets the Python package load; nothing here calls them.
"""

from __future__ import annotations

import torch

_lib = None


def install() -> None:
    global _lib
    if _lib is not None:
        return
    try:
        torch.ops.torchvision.nms.default  # noqa: B018  (already defined: a real build)
        return
    except (AttributeError, RuntimeError):
        pass
    _lib = torch.library.Library("torchvision", "DEF")
    _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
