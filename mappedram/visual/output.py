"""Writing a picture or a page: under its name only when complete (the project's atomic output)."""

from __future__ import annotations

import os

from ..mapper.atomic import atomic_output


def write_output(path: str | os.PathLike[str], data: bytes) -> None:
    view = memoryview(data)
    with atomic_output(path) as fd:
        while view:
            view = view[os.write(fd, view) :]
