"""Copy committed steps between directories (local or remote), commit record last.

Every file is checked against the commit record as it is copied (size and checksums,
in the same pass), so a copy is never committed with a corrupt file in it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import BinaryIO

from checkpointing.fastio.threads import parallel_map
from checkpointing.format import verify
from checkpointing.format.record import RECORD_NAME, Record
from checkpointing.storage.base import Storage


def copy_step(
    src: Storage,
    dst: Storage,
    names: tuple[str, str],
    record: Record,
    progress: Callable[[int], object] = lambda n: None,
) -> None:
    """Copy a step from ``src`` to ``dst`` (``names``: its directory in each); it appears
    in ``dst`` only when complete.

    ``progress(n)`` is called with the bytes of each chunk copied.
    """

    def copy_file(filename: str) -> None:
        info = record.files[filename]
        where = f"{src.url}/{names[0]}/{filename}"

        def produce(out: BinaryIO) -> None:
            with src.open_read(f"{names[0]}/{filename}") as f:
                expected = (info.size, info.header_checksum, info.checksum)
                verify.copy_checked(f, out, expected, where, progress)

        writer.write(filename, produce)

    writer = dst.begin(names[1], uuid.uuid4().hex[:8])
    try:
        parallel_map(copy_file, list(record.files), max(src.parallelism, dst.parallelism))
        writer.commit(RECORD_NAME, record.to_json())
    except BaseException:
        writer.abort()
        raise
