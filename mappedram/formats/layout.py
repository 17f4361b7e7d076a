"""Where a mapped-ram block's pieces sit in the file, said once (FORMAT.md §3.2-§3.3).

The offsets of the MappedRamHeader's fields come from headers.py (checked against its schema). QEMU's placement rule
(mapped_ram_setup_ramblock) puts the header right after the block's entry, the bitmap
right after the header and the pages at the next alignment boundary past the bitmap;
the stream resumes after the page region. The writer places blocks with ``place_block``;
the reader describes each parsed block with the same ``BlockPlace``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import headers as H
from .bitmap import BitmapLayout
from .constants import MAPPED_RAM_ALIGNMENT

# The page sizes QEMU's targets have: target-page-bits from 9 to 30 (FORMAT.md §1.3).
MIN_PAGE_BITS, MAX_PAGE_BITS = 9, 30
MIN_PAGE_SIZE, MAX_PAGE_SIZE = 1 << MIN_PAGE_BITS, 1 << MAX_PAGE_BITS


def valid_page_size(size: int) -> bool:
    """A power of two from 512 bytes to 1 GiB: every page size the reader and writer accept."""
    return MIN_PAGE_SIZE <= size <= MAX_PAGE_SIZE and not size & (size - 1)


def round_up(value: int, align: int) -> int:
    return -(-value // align) * align


HEADER_FIELDS = H.MAPPED_RAM_FIELDS  # version 0, page_size 4, bitmap_offset 12, pages_offset 20
HEADER_SIZE = H.MAPPED_RAM_HEADER.size  # 28


@dataclass(frozen=True)
class BlockPlace:
    """Where one block's pieces are in the file (all absolute offsets)."""

    name: str
    used_length: int
    page_size: int
    entry_offset: int  # the entry's u8 idlen
    header_offset: int
    bitmap_offset: int
    bitmap_size: int
    pages_offset: int

    @property
    def header_end(self) -> int:
        return self.header_offset + HEADER_SIZE

    @property
    def resume_offset(self) -> int:
        """QEMU seeks here after the block: the next block's entry or EOS."""
        return self.pages_offset + self.used_length

    def field_offset(self, field: str) -> int:
        """File offset of a MappedRamHeader field of this block (``"page_size"``...)."""
        return self.header_offset + HEADER_FIELDS[field]

    def page_offset(self, index: int) -> int:
        """Where page ``index``'s slot is (its data only if its bitmap bit is set)."""
        return self.pages_offset + index * self.page_size


def place_block(
    name: str,
    used_length: int,
    page_size: int,
    entry_offset: int,
    layout: BitmapLayout,
    alignment: int = MAPPED_RAM_ALIGNMENT,
) -> BlockPlace:
    """mapped_ram_setup_ramblock: header after the entry, bitmap after the header,
    pages at the next ``alignment`` boundary after the bitmap."""
    header_offset = entry_offset + 1 + len(name.encode()) + H.RAM_WORD.size
    bitmap_offset = header_offset + HEADER_SIZE
    bitmap_size = layout.size(used_length // page_size)
    pages_offset = round_up(bitmap_offset + bitmap_size, alignment)
    return BlockPlace(
        name, used_length, page_size, entry_offset, header_offset, bitmap_offset, bitmap_size, pages_offset
    )


def parsed_place(
    name: str, used_length: int, entry_offset: int, header_offset: int, header: Any, layout: BitmapLayout
) -> BlockPlace:
    """The place a parsed MappedRamHeader (``header``) states. The reader checks it but
    does not assume QEMU's rule: another writer may place the pieces elsewhere."""
    return BlockPlace(
        name,
        used_length,
        header.page_size,
        entry_offset,
        header_offset,
        header.bitmap_offset,
        layout.size(used_length // header.page_size),
        header.pages_offset,
    )
