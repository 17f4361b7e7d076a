"""Structural checks of a snapshot file: ``mappedram verify``.

Reads the stream, the block headers and the bitmaps' last words, never the page data
(unless hashes are asked for, which import numpy). Each problem carries the file offset
it was found at.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..errors import FormatError
from ..formats.constants import RAM_IDSTR
from .blocks import MappedRamBlock, RamBlock
from .elements import Problem
from .images import open_image
from .snapshot import Snapshot
from .source import read_exact

if TYPE_CHECKING:
    import numpy as np

HASH_PIECE = 8 << 20  # bytes read and hashed at once
# A block's sha256 feeds its clear pages as zeros, which costs time (about 1 s per GiB)
# but nothing in the file: a 325 KB stream may claim a TiB. So the clear bytes hashed
# per block are bounded by what the file holds: ZERO_BUDGET plus ZERO_FACTOR times the
# block's page data in the file. Past that, only the sparse digest (O(file)) is given,
# unless ``hash_zeros`` asks for the sha256 whatever it costs.
ZERO_BUDGET = 4 << 30
ZERO_FACTOR = 16


@dataclass
class Report:
    path: str
    problems: list[Problem] = field(default_factory=list)
    hashes: dict[str, str] = field(default_factory=dict)  # block -> sha256 of its RAM
    sparse: dict[str, "SparseDigest"] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> dict[str, Any]:
        return {
            "file": self.path,
            "valid": self.ok,
            "problems": [{"offset": p.offset, "message": p.text} for p in self.problems],
            "notes": self.notes,
            "sha256": self.hashes,
            "sparse_sha256": {name: asdict(d) for name, d in self.sparse.items()},
        }


@dataclass(frozen=True)
class SparseDigest:
    """What a block's RAM holds besides zeros, hashed in time that follows the file:
    ``digest`` = sha256(D + I + le64(pages)), where D is the sha256 of the bytes of every
    page that is not all zero, in page order, and I the sha256 of those pages' numbers as
    le64. A function of the RAM alone: the same for any file (mapped-ram or stream) that
    restores the same memory."""

    digest: str
    pages: int  # in the block
    nonzero_pages: int


def verify(
    path: str | os.PathLike[str],
    *,
    hash_blocks: bool = False,
    hash_zeros: bool = False,
    zero_budget: int = ZERO_BUDGET,
    progress: Callable[[int, int], None] | None = None,
    **open_args: Any,
) -> Report:
    """Check a file; a file that cannot be parsed yields one problem, not an exception.

    ``hash_blocks``: each block's sparse digest, and its sha256 where its clear pages are
    at most ``zero_budget`` plus ZERO_FACTOR times its page data (``hash_zeros``: always).
    ``progress(done, total)``: the bytes hashed; for a compressed image, the compressed
    bytes its one pass has read (with or without hashes).

    OSError (a missing or unreadable file) is left to the caller.
    """
    report = Report(os.fspath(path))
    try:
        snap = open_image(path, progress=progress, **open_args)  # a compressed image's one pass
    except FormatError as err:
        report.problems.append(Problem(err.offset, _expected(err)))
        return report
    with snap:
        try:
            forward = None
            if hash_blocks and snap.one_pass:  # a compressed image: hashed as its pages pass
                from .forward import InOrderHashes  # noqa: PLC0415  (only for these images)

                forward = InOrderHashes(list(snap))
            if forward is not None:
                snap.consume(forward)  # the image's one pass, before the checks walk it
            _check(snap, report)
            if forward is not None and not report.problems:
                hashes, notes = forward.results(snap.blocks)
                report.hashes.update(hashes)
                report.notes += notes
            elif hash_blocks and not report.problems:
                total = sum(b.used_length for b in snap if b.in_file)
                done = 0
                for block in snap:
                    if not block.in_file:
                        report.notes.append(f"block {block.name!r} is not in the file (x-ignore-shared): no hash")
                        continue
                    step = None if progress is None else (lambda n, base=done: progress(base + n, total))
                    if hash_zeros or zeros_within_budget(block, zero_budget):
                        report.hashes[block.name] = block_sha256(block, step)
                    else:
                        report.sparse[block.name] = block_sparse_digest(block, step)
                        report.notes.append(
                            f"block {block.name!r}: no sha256, its {_clear_bytes(block)} bytes of clear pages are "
                            f"past the zero budget (--hash-zeros hashes them, about 1 s per GiB); "
                            "its sparse-sha256 is given"
                        )
                    done += block.used_length
        except FormatError as err:
            report.problems.append(Problem(err.offset, _expected(err)))
        report.problems[:0] = [p for p in snap.problems if p not in report.problems]
    report.problems.sort(key=lambda p: p.offset)
    return report


def _expected(err: FormatError) -> str:
    return f"expected {err.expected}" + (f", found {err.found}" if err.found is not None else "")


def _check(snap: Snapshot, report: Report) -> None:
    problems = report.problems
    kinds = _RamKinds()
    for section in snap.sections:  # walks the whole stream (flags, footers, EOF); one Section at a time
        if section.idstr == RAM_IDSTR:
            kinds.add(section.offset, section.kind)
    if kinds.first != "start" or kinds.last != "end" or kinds.ends != 1:
        problems.append(
            Problem(
                kinds.offset if kinds.offset is not None else snap.stream_start,
                f"expected a RAM section that opens with START and closes with one END, found {kinds}",
            )
        )
    total = sum(b.used_length for b in snap)
    if snap.ram_total is not None and total != snap.ram_total:
        problems.append(
            Problem(
                snap.ram_section_offset or 0,
                f"expected block lengths adding up to MEM_SIZE {snap.ram_total}, found {total}",
            )
        )
    _check_vmdesc(snap, report)
    mapped = [b for b in snap if isinstance(b, MappedRamBlock) and b.in_file]  # others own no file bytes
    for block in mapped:
        _check_block(snap, block, problems)
    _check_regions(snap, mapped, problems)


class _RamKinds:
    """The kinds of the RAM sections in stream order, kept as at most SHOWN_RUNS runs (a
    million PART sections cost a counter, not a list)."""

    SHOWN_RUNS = 8

    def __init__(self) -> None:
        self.offset: int | None = None  # of the first one
        self.first = self.last = ""
        self.ends = 0
        self.runs: list[list[Any]] = []  # [kind, count]
        self.more = 0  # runs past SHOWN_RUNS

    def add(self, offset: int, kind: str) -> None:
        if self.offset is None:
            self.offset, self.first = offset, kind
        self.ends += kind == "end"
        if self.more == 0 and self.runs and self.runs[-1][0] == kind:
            self.runs[-1][1] += 1
        elif self.more == 0 and len(self.runs) < self.SHOWN_RUNS:
            self.runs.append([kind, 1])
        elif kind != self.last:
            self.more += 1
        self.last = kind

    def __str__(self) -> str:
        if self.offset is None:
            return "none"
        shown = ", ".join(kind if count == 1 else f"{kind} x{count}" for kind, count in self.runs)
        return shown + (f", then {self.more} more runs ending with {self.last}" if self.more else "")


def _check_vmdesc(snap: Snapshot, report: Report) -> None:
    if snap.vmdesc_location is None:
        report.notes.append(
            "no VM description after EOF (suppress-vmdesc or postcopy); device sections were delimited by their footers"
        )
        return
    desc = snap.vmdesc
    offset = snap.vmdesc_location[0]
    if desc is None:
        return  # the parse problem is already in snap.problems
    page_size = desc.get("page_size")
    if page_size is not None and page_size != snap.page_size:
        report.problems.append(
            Problem(offset, f"expected VM description page_size {snap.page_size}, found {page_size}")
        )
    devices = desc.get("devices")
    if not isinstance(devices, list):
        report.problems.append(Problem(offset, "expected a 'devices' list in the VM description, found none"))
    elif len(devices) != len(snap.devices):
        report.problems.append(
            Problem(
                offset,
                f"expected {len(snap.devices)} device entries in the VM description "
                f"(one per FULL section), found {len(devices)}",
            )
        )


def _check_block(snap: Snapshot, block: MappedRamBlock, problems: list[Problem]) -> None:
    if block.page_size != snap.page_size:
        problems.append(
            Problem(
                block.place.field_offset("page_size"),
                f"expected block {block.name!r} to have the stream's page size {snap.page_size}, "
                f"found {block.page_size}",
            )
        )
    if block.pages_offset % block.page_size:
        problems.append(
            Problem(
                block.place.field_offset("pages_offset"),
                f"expected block {block.name!r}: pages_offset aligned to the "
                f"page size {block.page_size}, found {block.pages_offset:#x}",
            )
        )
    stray = block.stray_bits()
    if stray:
        problems.append(
            Problem(
                block.bitmap_offset + block.bitmap_size - 1,
                f"expected block {block.name!r}: bitmap bits past page {block.num_pages} clear, found {stray} set",
            )
        )


def _check_regions(snap: Snapshot, blocks: list[MappedRamBlock], problems: list[Problem]) -> None:
    """Bitmaps, page regions and the stream itself must not overlap."""
    regions: list[tuple[int, int, str]] = []
    if snap.libvirt:
        regions.append((0, snap.stream_start, "the libvirt header"))
    stream_from = snap.stream_start
    for block in blocks:
        header_end = block.place.header_end
        regions.append((stream_from, header_end, f"the stream up to the header of {block.name!r}"))
        regions.append((block.bitmap_offset, block.bitmap_offset + block.bitmap_size, f"the bitmap of {block.name!r}"))
        regions.append((block.pages_offset, block.pages_offset + block.used_length, f"the pages of {block.name!r}"))
        stream_from = block.pages_offset + block.used_length
    regions.append((stream_from, snap.size, "the stream after the last block"))
    regions = [r for r in regions if r[1] > r[0]]
    regions.sort()
    reach_end, reach_name = 0, ""
    for start, end, name in regions:
        if start < reach_end:
            problems.append(
                Problem(
                    start,
                    f"expected {name} apart from {reach_name}, found them overlapping up to {min(end, reach_end):#x}",
                )
            )
        if end > reach_end:
            reach_end, reach_name = end, name


def _clear_bytes(block: RamBlock) -> int:
    return block.used_length - block.populated * block.page_size


def zeros_within_budget(block: RamBlock, budget: int = ZERO_BUDGET) -> bool:
    """Whether the block's clear pages are at most ``budget`` plus ZERO_FACTOR times the
    page data the file holds for it."""
    return _clear_bytes(block) <= budget + ZERO_FACTOR * block.populated * block.page_size


def block_sha256(block: RamBlock, progress: Callable[[int], None] | None = None) -> str:
    """sha256 of the block as the guest sees it, clear pages fed as zeros from a shared
    buffer (time follows the RAM the block claims)."""
    digest = hashlib.sha256()
    for chunk in _pieces(block, zeros=True, progress=progress):
        digest.update(chunk)
    return digest.hexdigest()


def block_sparse_digest(block: RamBlock, progress: Callable[[int], None] | None = None) -> SparseDigest:
    """The block's SparseDigest: only its populated pages are read (time follows the file)."""
    import numpy as np

    page_size = block.page_size
    data, numbers = hashlib.sha256(), hashlib.sha256()
    nonzero_pages = 0
    for first_page, chunk in _pieces(block, zeros=False, progress=progress):
        nonzero = np.frombuffer(chunk, dtype=np.uint8).reshape(-1, page_size).any(axis=1)
        count = int(nonzero.sum())
        if count == len(nonzero):
            data.update(chunk)
        elif count:
            for first, run in zip(*_runs(nonzero)):
                data.update(chunk[first * page_size : (first + run) * page_size])
        if count:
            numbers.update((np.flatnonzero(nonzero) + first_page).astype("<u8").tobytes())
        nonzero_pages += count
    digest = hashlib.sha256(data.digest() + numbers.digest() + block.num_pages.to_bytes(8, "little"))
    return SparseDigest(digest.hexdigest(), block.num_pages, nonzero_pages)


def _pieces(block: RamBlock, *, zeros: bool, progress: Callable[[int], None] | None) -> Iterator[Any]:
    """The block's bytes in page order along its copy plan, read into one buffer of
    whole pages (at least one): with ``zeros``, every byte, clear ranges as views of a
    shared zero buffer; without, (first page, bytes) of the populated pages only."""
    from .copy_plan import GAP, copy_plan, zero_chunks

    page_size = block.page_size
    piece = max(HASH_PIECE // page_size, 1) * page_size
    buffer = memoryview(bytearray(min(piece, max(block.used_length, 1))))
    done = 0
    for steps in copy_plan(block.extent_arrays(), page_size, 0, block.used_length, piece):
        for dest, length, file_offset in steps:
            if file_offset == GAP:
                if zeros:
                    for chunk in zero_chunks(length):
                        yield chunk
                        done += len(chunk)
                        if progress:
                            progress(done)
                else:
                    done += length
                continue
            chunk = buffer[:length]
            read_exact(block.fd, chunk, file_offset, block.name)
            yield chunk if zeros else (dest // page_size, chunk)
            done += length
            if progress:
                progress(done)


def _runs(mask: np.ndarray) -> tuple[list[int], list[int]]:
    """(firsts, lengths) of the runs of True in a bool array."""
    import numpy as np

    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.view(np.int8), [0]))))
    return edges[::2].tolist(), (edges[1::2] - edges[::2]).tolist()
