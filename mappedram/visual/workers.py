"""How many threads diff may compare with: the bound of its ``--workers`` (and the library's
``workers=``), in a module light enough for the command line to import at start."""

from __future__ import annotations

MAX_WORKERS = 64  # past a few, threads only add memory (an 8 MiB buffer per file each)


def check_workers(workers: int) -> int:
    """``workers`` if it is from 1 to MAX_WORKERS, else ValueError."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers is a number from 1 to {MAX_WORKERS}, not {workers}")
    return workers
