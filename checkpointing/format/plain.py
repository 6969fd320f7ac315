"""A data file as the plain state dict it was saved from, for tools outside this library.

Every data file is a standard safetensors file, but large ones hold alignment padding
between tensors as entries of their own (safetensors allows no holes; see
docs/format.md), which `safetensors.torch.load_file` returns beside the real tensors.
`load_file` leaves them out, so ``module.load_state_dict(load_file(path))`` works.
"""

from __future__ import annotations

import os

import torch
from safetensors import safe_open

from checkpointing.format.tensors import PADDING_KEY


def load_file(path: str | os.PathLike[str], device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of one data file by name, without the padding entries.

    Dtypes that safetensors lacks (complex128, float4, ...) and numpy arrays come back as
    their ``uint8`` bytes here; `CheckpointManager.restore` gives them their real dtype.

    Args:
        path: A data file, e.g. ``step_00000100/model.safetensors``.
        device: Where the tensors are created.

    Returns:
        Tensor names (a module's ``state_dict`` keys) to tensors.
    """
    with safe_open(os.fspath(path), framework="pt", device=device) as f:
        padding = set(((f.metadata() or {}).get(PADDING_KEY) or "").split(","))
        names = f.keys()  # a safe_open handle is not iterable
        return {name: f.get_tensor(name) for name in names if name not in padding}
