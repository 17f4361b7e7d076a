"""RAM blocks of a snapshot: where each page is, read lazily by offset.

A mapped-ram block finds its pages through its bitmap (page i at pages_offset + i *
page_size when bit i is set; clear bits are zero pages, whatever the slot holds). A
stream block finds them through an index built by walking PAGE/ZERO records.

numpy is imported by the methods that make arrays: opening a file and counting a
mapped-ram block's pages (``populated``) need none.
"""

from __future__ import annotations

import mmap
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

from ..formats import bitmap as bm
from ..formats.bitmap import BitmapLayout
from ..formats.layout import BlockPlace
from .source import Source, read_exact

if TYPE_CHECKING:
    import numpy as np

# Bitmap bytes handled at once: 1 MiB covers 8 Mi pages (32 GiB of 4 KiB pages), so
# dumping or verifying a huge guest needs memory that does not grow with it.
BITMAP_CHUNK = 1 << 20
HUGE_PAGE = 2 << 20  # x86-64's transparent huge page

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class Extent:
    """``count`` pages from ``first_page`` on, stored contiguously from ``file_offset``."""

    first_page: int
    count: int
    file_offset: int


class RamBlock(ABC):
    """One RAMBlock of the snapshot (common part of both modes)."""

    def __init__(
        self, src: Source, name: str, used_length: int, page_size: int, entry_offset: int, addr: int | None
    ) -> None:
        self._src = src
        self.name = name
        self.used_length = used_length
        self.page_size = page_size
        self.entry_offset = entry_offset  # file offset of the block's u8 idlen
        self.addr = addr  # guest-physical address, only under x-ignore-shared
        self.in_file = True  # False: a shared block the file leaves out (x-ignore-shared)

    @property
    def fd(self) -> int:
        """The snapshot file's descriptor (for preadv into caller memory)."""
        return self._src.fd

    @property
    def num_pages(self) -> int:
        return self.used_length // self.page_size

    @property
    @abstractmethod
    def populated(self) -> int:
        """Pages that hold data in the file (set bits, or PAGE records)."""

    @abstractmethod
    def present_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first page, bool array) pieces, in page order and bounded memory; pages in no
        piece are absent."""

    @abstractmethod
    def extent_arrays(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(first pages, page counts, file offsets) of the populated pages, as runs that are
        contiguous in the file, in page order and bounded pieces (numpy, for hot loops)."""

    def extents(self) -> Iterator[Extent]:
        """The populated pages, as runs that are contiguous in the file."""
        for firsts, counts, offsets in self.extent_arrays():
            for first, count, offset in zip(firsts.tolist(), counts.tolist(), offsets.tolist()):
                yield Extent(first, count, offset)

    def present(self) -> np.ndarray:
        """A bool array, one entry per page: True where the file holds the page."""
        import numpy as np

        out = np.zeros(self.num_pages, dtype=bool)
        for first, chunk in self.present_chunks():
            out[first : first + len(chunk)] = chunk
        return out

    def runs(self) -> Iterator[tuple[int, int]]:
        """(first page, page count) of every run of populated pages."""
        return bm.merge_runs(bm.runs(chunk, first) for first, chunk in self.present_chunks())

    def page(self, index: int) -> memoryview:
        """Page ``index`` as the guest would see it: a read-only view, zeros if absent."""
        offset = self.page_offset(index)
        if offset is None:
            return memoryview(bytes(self.page_size))
        return memoryview(self._src.read(offset, self.page_size, f"page {index} of {self.name}"))

    def page_offset(self, index: int) -> int | None:
        """File offset of page ``index`` or None where the page is zero."""
        if not 0 <= index < self.num_pages:
            raise IndexError(f"page {index} outside block {self.name!r} of {self.num_pages} pages")
        return self._page_offset(index)

    @abstractmethod
    def _page_offset(self, index: int) -> int | None:
        """``page_offset`` of an index known to be inside the block."""

    def read_into(self, out: memoryview | np.ndarray, progress: Progress | None = None, zero_fill: bool = True) -> None:
        """Copy the block into ``out`` (``used_length`` writable bytes), single-threaded."""
        import numpy as np

        from .copy_plan import GAP, copy_plan

        view = memoryview(out).cast("B")
        if len(view) != self.used_length:
            raise ValueError(f"target holds {len(view)} bytes, block {self.name!r} has {self.used_length}")
        total = self.populated * self.page_size
        zeros = np.frombuffer(view, dtype=np.uint8) if zero_fill else None
        done = 0
        for steps in copy_plan(self.extent_arrays(), self.page_size, 0, self.used_length):
            for dest, length, file_offset in steps:
                if file_offset == GAP:
                    if zeros is not None:
                        zeros[dest : dest + length] = 0
                    continue
                read_exact(self._src.fd, view[dest : dest + length], file_offset, self.name)
                done += length
                if progress:
                    progress(done, total)

    def read(self, progress: Progress | None = None) -> np.ndarray:
        """The whole block as a new uint8 array; absent pages are zero."""
        out = new_buffer(self.name, self.used_length)
        self.read_into(out, progress, zero_fill=False)
        return out

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "used_length": self.used_length,
            "page_size": self.page_size,
            "pages_total": self.num_pages,
            "pages_present": self.populated,
            "entry_offset": self.entry_offset,
            "addr": self.addr,
            "in_file": self.in_file,
        }


def not_in_file(block: RamBlock) -> str:
    """The one line for asking a block the file leaves out for its pages."""
    return (
        f"block {block.name!r} is not in the file: x-ignore-shared left its RAM in shared memory "
        "(the backing file of its memory backend), so the file holds no pages of it"
    )


def new_buffer(name: str, size: int, huge_pages: bool = False) -> np.ndarray:
    """A zeroed uint8 array for a block, refused with a clear error when the block claims
    more than this machine's memory (a classic stream's RAM size is not bounded by its
    file size). ``huge_pages``: anonymous memory advised for transparent huge pages (one
    fault per 2 MiB instead of per 4 KiB), for blocks that will be filled densely; a
    sparse block would commit 2 MiB per page touched."""
    import numpy as np

    check_claim(name, size)
    if huge_pages and size >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
        area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        area.madvise(mmap.MADV_HUGEPAGE)
        return np.frombuffer(area, dtype=np.uint8)  # the array keeps the mapping alive
    return np.zeros(size, dtype=np.uint8)  # calloc: untouched pages cost nothing


def check_claim(name: str, size: int) -> None:
    """MemoryError when a block claims more RAM than this machine has."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        memory = 0
    if memory and size > memory:
        raise MemoryError(f"block {name!r} claims {size} bytes of RAM, more than this machine's {memory}")


class MappedRamBlock(RamBlock):
    """A block with a MappedRamHeader: bitmap and pages where its ``place`` says."""

    def __init__(
        self,
        src: Source,
        place: BlockPlace,
        version: int,
        addr: int | None,
        bitmap_layout: BitmapLayout,
        in_file: bool = True,
    ) -> None:
        super().__init__(src, place.name, place.used_length, place.page_size, place.entry_offset, addr)
        self.place = place
        self.in_file = in_file  # without it: no bitmap, no pages, every page absent
        self.version = version  # of the MappedRamHeader
        self.bitmap_layout = bitmap_layout
        self._populated: int | None = None

    @property
    def header_offset(self) -> int:
        return self.place.header_offset

    @property
    def bitmap_offset(self) -> int:
        return self.place.bitmap_offset

    @property
    def pages_offset(self) -> int:
        return self.place.pages_offset

    @property
    def bitmap_size(self) -> int:
        return self.place.bitmap_size if self.in_file else 0

    def _bitmap_chunks(self) -> Iterator[tuple[int, bytearray]]:
        """(first byte of the bitmap, its bytes as the file holds them) in bounded pieces
        of whole words, read into one buffer (each valid until the next is asked for: a
        fresh MiB per piece costs its page faults, more than the read)."""
        step = BITMAP_CHUNK - BITMAP_CHUNK % self.bitmap_layout.word_bytes
        buffer = bytearray(min(step, self.bitmap_size))
        for start in range(0, self.bitmap_size, step):
            length = min(step, self.bitmap_size - start)
            if length < len(buffer):
                buffer = bytearray(length)
            read_exact(self._src.fd, memoryview(buffer), self.bitmap_offset + start, f"the bitmap of {self.name}")
            yield start, buffer

    def present_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        import numpy as np

        for start, raw in self._bitmap_chunks():
            first = start * 8
            count = min(len(raw) * 8, self.num_pages - first)
            if count > 0:
                yield first, bm.unpack(self.bitmap_layout.to_lsb(np.frombuffer(raw, dtype=np.uint8)), count)

    @property
    def populated(self) -> int:
        if self._populated is None:
            total = sum(bm.popcount(raw) for _, raw in self._bitmap_chunks())
            self._populated = total - self.stray_bits()
        return self._populated

    def stray_bits(self) -> int:
        """Set bits past the last page (QEMU never sets them)."""
        if self.bitmap_size == 0:
            return 0
        word = self.bitmap_layout.word_bytes
        tail_start = (self.num_pages // 8) // word * word
        raw = self._src.read(
            self.bitmap_offset + tail_start, self.bitmap_size - tail_start, f"the bitmap tail of {self.name}"
        )
        return self.bitmap_layout.stray_bits(raw, self.num_pages - tail_start * 8)

    def extent_arrays(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for first, chunk in self.present_chunks():
            starts, counts = bm.runs(chunk, first)
            if len(starts):
                yield starts, counts, self.pages_offset + starts * self.page_size

    def _page_offset(self, index: int) -> int | None:
        if not self.in_file:
            return None
        word = self.bitmap_layout.word_bytes
        bit = index % (8 * word)
        word_start = index // (8 * word) * word
        raw = self._src.read(self.bitmap_offset + word_start, word, f"the bitmap of {self.name}")
        value = int.from_bytes(raw, self.bitmap_layout.byteorder)
        return self.place.page_offset(index) if value >> bit & 1 else None

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "header_offset": self.header_offset,
            "mapped_ram_version": self.version,
            "bitmap_offset": self.bitmap_offset,
            "bitmap_size": self.bitmap_size,
            "pages_offset": self.pages_offset,
        }


class PageLookup(Protocol):
    def pages(self, name: str) -> tuple[np.ndarray, np.ndarray]: ...

    def count(self, name: str) -> int: ...


class StreamRamBlock(RamBlock):
    """A block of a classic stream: its pages are where the walker's index says.

    The index holds only the pages that have a PAGE record (sorted page numbers and
    their file offsets), so its size follows the file, not the RAM size the stream
    claims; a later ZERO record for a page drops it.
    """

    def __init__(
        self,
        src: Source,
        name: str,
        used_length: int,
        page_size: int,
        entry_offset: int,
        addr: int | None,
        index: PageLookup,
    ) -> None:
        super().__init__(src, name, used_length, page_size, entry_offset, addr)
        self._lookup = index
        self._index: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def index(self) -> tuple[np.ndarray, np.ndarray]:
        """(page numbers, file offsets) of the pages the stream holds, by page (the first
        use walks the rest of the stream)."""
        if self._index is None:
            self._index = self._lookup.pages(self.name)
        return self._index

    @property
    def populated(self) -> int:
        # without per-page arrays where the stream allows it (dump of a huge stream)
        return len(self._index[0]) if self._index is not None else self._lookup.count(self.name)

    def present_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        import numpy as np

        pages = self.index[0]
        step = BITMAP_CHUNK * 8
        for first in np.unique(pages // step * step).tolist():  # only chunks that hold pages
            chunk = np.zeros(min(step, self.num_pages - first), dtype=bool)
            chunk[pages[(pages >= first) & (pages < first + step)] - first] = True
            yield first, chunk

    def extent_arrays(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        import numpy as np

        pages, offsets = self.index  # an 8-byte word separates any two pages: one page each
        if len(pages):
            yield pages, np.ones(len(pages), dtype=np.int64), offsets

    def _page_offset(self, index: int) -> int | None:
        import numpy as np

        pages, offsets = self.index
        at = int(np.searchsorted(pages, index))
        return int(offsets[at]) if at < len(pages) and pages[at] == index else None
