"""Everything in a snapshot at once: every RAM block as a sparse raw file, the VM
description (``desc.json``), every device decoded (``state.json``) and a map from block
name to file (``blocks.json``), in one directory.

Block names are whatever the file says (QEMU's hold ``/`` and ``:``; a hostile file's may
hold ``..``, control characters, 255 bytes). Each becomes one flat file name of safe
characters: anything outside ``A-Za-z0-9._+-`` is ``_``, a leading ``.`` is ``_``, long
names are cut, and ``.raw`` is appended, so no block file is hidden, leaves the directory
or takes a JSON file's name. Two names that come out the same (also when compared
without case, for case-insensitive filesystems) are told apart by ``~2``, ``~3``…, which
no sanitised name holds. ``blocks.json`` says which file holds which block.

Every file is made by output.py's rules (complete or not at all, never more readable than
the input, existing files only with ``overwrite``); a new directory gets the input's
read bits (with their search bits) for group and others, and rwx for its owner.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from typing import Any, Callable, Iterable, Mapping

from .blocks import RamBlock
from .channels import pwrite_all
from .devstate import states_info
from .output import check_output, output_file, refused
from .restore import extract

MAP_NAME = "blocks.json"
DESC_NAME = "desc.json"
STATE_NAME = "state.json"
RAW_SUFFIX = ".raw"
NAME_CUT = 200  # characters kept of a block name: room for "~N" and ".raw" under NAME_MAX
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


def safe_names(names: Iterable[str]) -> dict[str, str]:
    """Block name -> a distinct flat file name (see the module's rules), in order."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    for name in names:
        stem = _UNSAFE.sub("_", name)[:NAME_CUT] or "_"
        if stem.startswith("."):
            stem = "_" + stem[1:]
        candidate, n = stem, 1
        while candidate.lower() in taken:
            n += 1
            candidate = f"{stem}~{n}"
        taken.add(candidate.lower())
        out[name] = candidate + RAW_SUFFIX
    return out


def directory_mode(source_mode: int) -> int:
    """rwx for the owner; for group and others, read and search where the input is readable."""
    readable = source_mode & 0o044
    return 0o700 | readable | readable >> 2


def _prepare_directory(directory: str, source_fd: int) -> None:
    """Make ``directory`` if it is missing; refuse what is not a directory."""
    if os.path.islink(directory) and not os.path.exists(directory):
        raise refused(directory, errno.ENOENT, "is a symbolic link to nothing; name the directory to write")
    try:
        os.mkdir(directory, directory_mode(os.fstat(source_fd).st_mode))
        return
    except FileExistsError:
        pass
    except OSError as err:
        raise refused(directory, err.errno, err.strerror) from None
    if not stat.S_ISDIR(os.stat(directory).st_mode):
        raise refused(directory, errno.ENOTDIR, "is not a directory; name a directory to write into")


def extract_all(
    snapshot: Any,
    directory: str | os.PathLike[str],
    *,
    overwrite: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write every block, ``desc.json``, ``state.json`` and ``blocks.json`` into
    ``directory`` (made if missing); returns what ``blocks.json`` holds.

    Every name is checked by output.py's rules before anything is written: without
    ``overwrite`` an existing file is refused, and the input (or a link to it) always.
    A block the file leaves out (x-ignore-shared) is listed with ``"path": null`` and
    not written. Without a usable VM description, ``desc.json`` and
    ``state.json`` are not written (``"desc"``/``"state"`` null in the map).
    """
    directory = os.fspath(directory)
    blocks: list[RamBlock] = list(snapshot)
    files = safe_names(b.name for b in blocks)
    vmdesc = snapshot.vmdesc
    outputs = [files[b.name] for b in blocks if b.in_file] + [MAP_NAME]
    if vmdesc is not None:
        outputs += [DESC_NAME, STATE_NAME]
    _prepare_directory(directory, snapshot.fd)
    for name in outputs:  # all or nothing: refuse before the first file is written
        check_output(os.path.join(directory, name), overwrite=overwrite, source_fds=[snapshot.fd])

    total = sum(b.populated * b.page_size for b in blocks if b.in_file)
    done = 0

    def moved(block_done: int, _block_total: int) -> None:
        if progress:
            progress(done + block_done, total)

    entries: dict[str, dict[str, Any]] = {}
    for block in blocks:
        entry: dict[str, Any] = {
            "path": files[block.name] if block.in_file else None,
            "in_file": block.in_file,
            "used_length": block.used_length,
            "page_size": block.page_size,
            "pages_present": block.populated,
        }
        if block.in_file:
            done += extract(
                snapshot, block.name, os.path.join(directory, files[block.name]), overwrite=overwrite, progress=moved
            )
        entries[block.name] = entry
    if progress:
        progress(total, total)
    summary: dict[str, Any] = {
        "file": snapshot.path,
        "desc": None,
        "state": None,
        "blocks": entries,
    }
    if vmdesc is not None:
        _write_json(os.path.join(directory, DESC_NAME), vmdesc, snapshot.fd, overwrite)
        _write_json(os.path.join(directory, STATE_NAME), states_info(snapshot), snapshot.fd, overwrite)
        summary["desc"], summary["state"] = DESC_NAME, STATE_NAME
    _write_json(os.path.join(directory, MAP_NAME), summary, snapshot.fd, overwrite)
    return summary


def _write_json(path: str, value: Mapping[str, Any], source_fd: int, overwrite: bool) -> None:
    data = (json.dumps(value, indent=2, ensure_ascii=True) + "\n").encode()
    with output_file(path, overwrite=overwrite, source_fd=source_fd) as fd:
        pwrite_all(fd, memoryview(data), 0)
