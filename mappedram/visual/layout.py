"""What the pictures show, as plain data: the file's layout and each block's population.

``layout(snap)`` cuts the file into segments (libvirt header, stream head, each block's
header, bitmap and page region, RAM records, device state, VM description, gaps) that
cover a valid file from 0 to its size without overlap. ``population`` groups a block's pages
into at most ``max_cells`` cells and counts the pages that are set in each. Both read
only headers and bitmaps, never page data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..formats.structs import LIBVIRT_HEADER_SIZE, MAPPED_RAM_HEADER_SIZE
from ..mapper.blocks import RamBlock
from ..mapper.snapshot import Snapshot

# The kinds of segment, in legend order, with what the legend says.
KINDS = {
    "libvirt": "libvirt save header and XML",
    "prefix": "bytes before the stream",
    "stream": "stream framing (header, section headers, EOF)",
    "block-header": "RAM block header",
    "bitmap": "bitmap",
    "padding": "alignment padding",
    "pages": "page region",
    "records": "RAM page records",
    "devices": "device state",
    "vmdesc": "VM description (JSON)",
    "gap": "not accounted for",
}
MERGED = {"stream", "devices", "records", "gap"}  # neighbours of these kinds become one segment
MERGED_LABELS = {"stream": "stream framing", "devices": "device state", "records": "RAM page records"}
MAX_CELLS = 4096  # population cells per block: one per page up to 16 MiB of 4 KiB pages
CELLS_PER_ROW = 64  # every block drawn at the same width: a 1-page block is one small cell


@dataclass(frozen=True)
class Segment:
    kind: str  # a key of KINDS
    start: int
    end: int
    label: str
    block: str | None = None
    sections: int = 0  # stream sections it stands for (0: not a section)

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Cells:
    """A block's pages in ``len(counts)`` cells of ``pages_per_cell`` pages (the last may
    hold fewer): ``counts`` pages set per cell, ``fractions`` their share of the cell."""

    name: str
    num_pages: int
    page_size: int
    pages_per_cell: int
    counts: np.ndarray

    @property
    def sizes(self) -> np.ndarray:
        sizes = np.full(len(self.counts), self.pages_per_cell, dtype=np.int64)
        if len(sizes):
            sizes[-1] = self.num_pages - self.pages_per_cell * (len(sizes) - 1)
        return sizes

    @property
    def fractions(self) -> np.ndarray:
        return self.counts / np.maximum(self.sizes, 1)

    @property
    def total(self) -> int:
        return int(self.counts.sum())


def pages_per_cell(num_pages: int, max_cells: int = MAX_CELLS) -> int:
    return max(1, -(-num_pages // max_cells))


def cells_from_pages(name: str, pages: np.ndarray, num_pages: int, page_size: int, max_cells: int = MAX_CELLS) -> Cells:
    """Cells of sorted page indices (a diff's pages), without a bool per page."""
    per = pages_per_cell(num_pages, max_cells)
    cells = -(-num_pages // per)
    return Cells(name, num_pages, page_size, per, np.bincount(pages // per, minlength=cells).astype(np.int64))


def cell_grid(cells: Cells) -> np.ndarray:
    """What a population or diff map draws: the shares laid out CELLS_PER_ROW wide, -1 for
    a cell with no page set, NaN past the last cell."""
    n = len(cells.counts)
    grid = np.full(-(-max(n, 1) // CELLS_PER_ROW) * CELLS_PER_ROW, np.nan)
    grid[:n] = np.where(cells.counts > 0, cells.fractions, -1.0)
    return grid.reshape(-1, CELLS_PER_ROW)


def population(block: RamBlock, max_cells: int = MAX_CELLS) -> Cells:
    """The block's present pages per cell, from its bitmap or page index, a bounded piece
    at a time (a classic stream may claim far more RAM than its file holds)."""
    per = pages_per_cell(block.num_pages, max_cells)
    counts = np.zeros(-(-block.num_pages // per), dtype=np.int64)
    for first, chunk in block.present_chunks():
        pos = 0
        while pos < len(chunk):  # one step per cell the piece touches: at most max_cells + pieces
            cell = (first + pos) // per
            end = min(len(chunk), (cell + 1) * per - first)
            counts[cell] += np.count_nonzero(chunk[pos:end])
            pos = end
    return Cells(block.name, block.num_pages, block.page_size, per, counts)


def _section_label(sec: dict[str, Any]) -> str:
    if sec["kind"] == "command":
        return f"command {sec.get('command')}"
    if sec["kind"] == "eof":
        return "EOF"
    return f"{sec['kind']} section {sec.get('idstr', '')}".strip()


def _cut(start: int, end: int, taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of [start, end) outside the sorted, disjoint ``taken`` ranges."""
    out, pos = [], start
    for s, e in taken:
        if e <= pos or s >= end:
            continue
        if s > pos:
            out.append((pos, s))
        pos = max(pos, e)
    if pos < end:
        out.append((pos, end))
    return out


def layout(snap: Snapshot) -> list[Segment]:
    """The file cut into segments that cover [0, size) in file order."""
    info = snap.describe()
    size = info["size"]
    fixed: list[Segment] = []  # structures at known offsets
    libvirt = info["libvirt"]
    start = info["stream_start"]
    if libvirt:
        fixed.append(Segment("libvirt", 0, min(LIBVIRT_HEADER_SIZE, start), "libvirt save header"))
        if start > LIBVIRT_HEADER_SIZE:
            fixed.append(Segment("libvirt", LIBVIRT_HEADER_SIZE, start, "libvirt XML and cookie"))
    elif start:
        fixed.append(Segment("prefix", 0, start, "before the stream (offset=)"))
    sections = info["sections"]
    first_section = sections[0]["offset"] if sections else info["ram_section_offset"] or start
    fixed.append(Segment("stream", start, first_section, "QEVM header and configuration"))
    for b in info["blocks"]:
        name = b["name"]
        if "bitmap_offset" in b and b["in_file"]:
            header_end = b["header_offset"] + MAPPED_RAM_HEADER_SIZE
            fixed.append(Segment("block-header", b["entry_offset"], header_end, f"{name} header", name))
            bitmap_end = b["bitmap_offset"] + b["bitmap_size"]
            fixed.append(Segment("bitmap", b["bitmap_offset"], bitmap_end, f"{name} bitmap", name))
            pages_end = b["pages_offset"] + b["used_length"]
            fixed.append(Segment("pages", b["pages_offset"], pages_end, f"{name} pages", name))
    if info["vmdesc"]:
        vm = info["vmdesc"]
        fixed.append(Segment("vmdesc", vm["offset"], vm["offset"] + 5 + vm["json_length"], "VM description"))
    fixed = [s for s in fixed if s.end > s.start]
    fixed.sort(key=lambda s: s.start)
    taken = [(s.start, s.end) for s in fixed]
    mapped = snap.policy.block_has_mapped_ram_header

    found: list[Segment] = list(fixed)
    for sec in sections:
        end = sec.get("end", sec["offset"])
        if sec["kind"] == "full" and sec.get("idstr") != "ram":
            kind, label = "devices", "device state"
        elif sec.get("idstr") == "ram" and not mapped and sec.get("payload_length"):
            kind, label = "records", "RAM page records"
        else:
            kind, label = "stream", _section_label(sec)
        pieces = _cut(sec["offset"], end, taken)
        if kind == "stream" and mapped and sec.get("idstr") == "ram" and len(pieces) > 1:
            # the START section around the blocks: its head, then the padding before each page region
            found.append(Segment("stream", *pieces[0], "RAM section head", sections=1))
            found += [Segment("padding", s, e, "padding before the page region") for s, e in pieces[1:-1]]
            found.append(Segment("stream", *pieces[-1], "RAM section end", sections=1))
        else:
            found += [Segment(kind, s, e, label, sections=1) for s, e in pieces]
    found.sort(key=lambda s: s.start)
    covered = [(s.start, s.end) for s in found]
    found += [Segment("gap", s, e, "not accounted for") for s, e in _cut(0, size, _merge_ranges(covered))]
    found.sort(key=lambda s: s.start)
    return _merge(found)


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _merge(segments: list[Segment]) -> list[Segment]:
    """Adjacent sections of a MERGED kind (and adjacent gaps) become one segment."""
    out: list[Segment] = []
    for seg in segments:
        prev = out[-1] if out else None
        if (
            prev is not None
            and seg.kind in MERGED
            and prev.kind == seg.kind
            and prev.end == seg.start
            and (seg.kind == "gap" or (prev.sections and seg.sections))
        ):
            n = prev.sections + seg.sections
            label = prev.label if seg.kind == "gap" else f"{MERGED_LABELS[seg.kind]} ({n} sections)"
            out[-1] = Segment(seg.kind, prev.start, seg.end, label, sections=n)
        else:
            out.append(seg)
    return out
