"""Writing a picture or a page by the project's output rules (mapper/output.py)."""

from __future__ import annotations

import os

from ..mapper.output import output_file


def write_output(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = True) -> None:
    view = memoryview(data)
    with output_file(path, overwrite=overwrite) as fd:
        while view:
            view = view[os.write(fd, view) :]
