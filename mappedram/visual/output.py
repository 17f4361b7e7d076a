"""Writing a picture or a page by the project's output rules (mapper/output.py)."""

from __future__ import annotations

import os
from typing import Sequence

from ..mapper.output import output_file


def write_output(
    path: str | os.PathLike[str], data: bytes, *, overwrite: bool = True, source_fds: Sequence[int] = ()
) -> None:
    """``data`` as the file ``path``; ``source_fds``: the snapshot(s) it is drawn from (never
    replaced, and their modes bound the output's)."""
    view = memoryview(data)
    with output_file(path, overwrite=overwrite, source_fds=source_fds) as fd:
        while view:
            view = view[os.write(fd, view) :]
