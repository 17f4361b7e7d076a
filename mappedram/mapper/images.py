"""``mappedram.open``: any snapshot file, the one-pass reader only for what needs it.

A compressed libvirt image can only be read front to back (mapper/forward.py); every
other file opens as a random-access ``Snapshot``. The forward reader, and numpy with it,
is imported only when such an image turns up, so that dump and verify of other files
start fast.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from .prologue import CompressedImage
from .snapshot import Snapshot


def open_image(
    path: str | os.PathLike[str], *, progress: Callable[[int, int], None] | None = None, **open_args: Any
) -> Snapshot:
    """A Snapshot, or for a compressed libvirt image a ForwardSnapshot (``progress``:
    compressed bytes consumed, for the one pass)."""
    try:
        return Snapshot(path, **open_args)
    except CompressedImage:  # only found without an explicit offset: nothing else applies
        from .forward import ForwardSnapshot  # noqa: PLC0415  (heavy, and only for these images)

        return ForwardSnapshot(path, page_size=open_args.get("page_size"), progress=progress)
