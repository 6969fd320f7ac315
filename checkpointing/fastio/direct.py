"""O_DIRECT: reads and writes around the page cache, and the alignment they want."""

from __future__ import annotations

import mmap
import os

# O_DIRECT wants the buffer address, the file offset and the length aligned to the
# device's logical block size (512 B or 4 KiB); pages satisfy both.
ALIGN = mmap.PAGESIZE
O_DIRECT: int | None = getattr(os, "O_DIRECT", None)  # None: this OS has no direct I/O
