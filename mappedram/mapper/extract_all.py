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
from contextlib import ExitStack
from typing import Any, Callable, Iterable, Mapping

from .blocks import RamBlock
from .channels import pwrite_all
from .devstate import states_info
from .forward import FileWriter, ForwardSnapshot, PerBlock
from .output import Writeback, check_output, output_file, refused
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
    A compressed image is written in its one pass, every block file at once; its VM
    description comes at its end, so the names of the JSON files are checked whatever.
    """
    directory = os.fspath(directory)
    blocks: list[RamBlock] = list(snapshot)
    files = safe_names(b.name for b in blocks)
    written = [b for b in blocks if b.in_file]
    outputs = [files[b.name] for b in written] + [MAP_NAME]
    if snapshot.one_pass or snapshot.vmdesc is not None:
        outputs += [DESC_NAME, STATE_NAME]
    _prepare_directory(directory, snapshot.fd)
    for name in outputs:  # all or nothing: refuse before the first file is written
        check_output(os.path.join(directory, name), overwrite=overwrite, source_fds=[snapshot.fd])
    paths = {b.name: os.path.join(directory, files[b.name]) for b in written}
    if snapshot.one_pass:
        state = _blocks_in_one_pass(snapshot, paths, overwrite, progress)
    else:
        total = sum(b.populated * b.page_size for b in written)
        done = 0

        def moved(block_done: int, _block_total: int) -> None:
            if progress:
                progress(done + block_done, total)

        for block in written:
            done += extract(snapshot, block.name, paths[block.name], overwrite=overwrite, progress=moved)
        if progress:
            progress(total, total)
        state = states_info(snapshot) if snapshot.vmdesc is not None else None
    summary: dict[str, Any] = {
        "file": snapshot.path,
        "desc": None,
        "state": None,
        "blocks": {
            block.name: {
                "path": files[block.name] if block.in_file else None,
                "in_file": block.in_file,
                "used_length": block.used_length,
                "page_size": block.page_size,
                "pages_present": block.populated,
            }
            for block in blocks
        },
    }
    if state is not None:
        _write_json(os.path.join(directory, DESC_NAME), snapshot.vmdesc, snapshot.fd, overwrite)
        _write_json(os.path.join(directory, STATE_NAME), state, snapshot.fd, overwrite)
        summary["desc"], summary["state"] = DESC_NAME, STATE_NAME
    _write_json(os.path.join(directory, MAP_NAME), summary, snapshot.fd, overwrite)
    return summary


def _blocks_in_one_pass(
    snapshot: ForwardSnapshot,
    paths: Mapping[str, str],
    overwrite: bool,
    progress: Callable[[int, int], None] | None,
) -> dict[str, Any] | None:
    """Every block file of a compressed image, each page written as its record passes;
    returns state.json's content (None: no description). The state is decoded before
    the block files appear, so that a refusal (more device state than the pass keeps)
    leaves none of them."""
    with ExitStack() as files:
        writers = {}
        for name, path in paths.items():
            fd = files.enter_context(output_file(path, overwrite=overwrite, source_fd=snapshot.fd))
            os.ftruncate(fd, snapshot.block(name).used_length)
            writers[name] = FileWriter(fd, {name: 0}, writeback=Writeback(fd))
        snapshot.consume(PerBlock(writers), progress)
        for writer in writers.values():
            writer.flush()
        return states_info(snapshot) if snapshot.vmdesc is not None else None


def _write_json(path: str, value: Mapping[str, Any], source_fd: int, overwrite: bool) -> None:
    data = (json.dumps(value, indent=2, ensure_ascii=True) + "\n").encode()
    with output_file(path, overwrite=overwrite, source_fd=source_fd) as fd:
        pwrite_all(fd, memoryview(data), 0)
