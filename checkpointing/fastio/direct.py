"""O_DIRECT: reads and writes around the page cache, and the alignment they want."""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable

# O_DIRECT wants the buffer address, the file offset and the length aligned to the
# device's logical block size (512 B or 4 KiB); pages satisfy both.
ALIGN = mmap.PAGESIZE
O_DIRECT: int | None = getattr(os, "O_DIRECT", None)  # None: this OS has no direct I/O

_AT_EMPTY_PATH = 0x1000
_STATX_DIOALIGN = 0x2000
_STATX_SIZE = 256  # bytes of struct statx
_DIO_MEM_ALIGN = 152  # offsets of stx_dio_mem_align, stx_dio_offset_align in it
_DIO_OFFSET_ALIGN = 156


def _load_statx() -> Callable[..., int] | None:
    try:
        statx = ctypes.CDLL(None, use_errno=True).statx
    except (OSError, AttributeError):  # not Linux, or a C library without statx
        return None
    statx.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_char_p)
    return statx


_statx = _load_statx()


def alignment(fd: int) -> tuple[int, int]:
    """(memory, file offset and length) alignment of direct I/O on ``fd``'s file.

    Filesystems report it (statx STATX_DIOALIGN, Linux 6.1+), and it is often finer
    than a page: 512 B for offsets, and for memory 512 B on virtio disks but 4 B on
    NVMe, where nearly any tensor can then be read into as it is wherever it sits in
    memory. Where nothing is reported, or something coarser than a page, a page for
    both (direct I/O that is then refused goes on through the page cache).
    """
    if _statx is None:
        return ALIGN, ALIGN
    buffer = ctypes.create_string_buffer(_STATX_SIZE)
    if _statx(fd, b"", _AT_EMPTY_PATH, _STATX_DIOALIGN, buffer) != 0:
        return ALIGN, ALIGN
    raw = buffer.raw
    mask = int.from_bytes(raw[0:4], "little")
    memory = int.from_bytes(raw[_DIO_MEM_ALIGN : _DIO_MEM_ALIGN + 4], "little")
    offset = int.from_bytes(raw[_DIO_OFFSET_ALIGN : _DIO_OFFSET_ALIGN + 4], "little")
    if not mask & _STATX_DIOALIGN or not all(_power_of_two_to_page(n) for n in (memory, offset)):
        return ALIGN, ALIGN
    return memory, offset


def _power_of_two_to_page(n: int) -> bool:
    return 0 < n <= ALIGN and not n & (n - 1)
