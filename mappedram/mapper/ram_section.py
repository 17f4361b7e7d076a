"""The RAM section's payload, one reader per mode (FORMAT.md §2-§3).

The opening (START) payload is the MEM_SIZE word and the block list; what follows
until EOS depends on the mode's policy: under mapped-ram only EOS words (the pages are
at the offsets the block headers give), in a classic stream PAGE/ZERO records, which
the walker indexes here as it passes them (with numpy, imported there: a mapped-ram
file is read without it).
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from array import array
from typing import TYPE_CHECKING, Callable, NamedTuple

from ..errors import FormatError
from ..formats import headers as H
from ..formats.bitmap import BitmapLayout
from ..formats.constants import MAPPED_RAM_VERSION, RamFlag
from ..formats.layout import HEADER_FIELDS, HEADER_SIZE, parsed_place, valid_page_size
from ..formats.policy import ModePolicy, block_in_file
from .blocks import MappedRamBlock, RamBlock, StreamRamBlock
from .elements import Problem
from .source import Cursor, Source

if TYPE_CHECKING:
    import numpy as np

_WORD = H.RAM_WORD.size
# RAM blocks read at most. QEMU machines have dozens (RAM, ROMs, video RAM); memory
# hotplug adds at most 256 DIMM slots (ACPI) and one block per virtio-mem device. A block
# costs this process about 2 KiB, its entry in the file 40 bytes: the cap keeps a file of
# empty blocks within twice its size plus 32 MiB.
MAX_BLOCKS = 1 << 13
# A block entry (structs.RamBlockEntry) read with struct: u8 idlen, idstr, be64
# used_length, [be64 addr], [MappedRamHeader]; construct costs ~50 us an entry.
_U64 = H.RAM_WORD
_MAPPED_RAM_HEADER = H.MAPPED_RAM_HEADER  # version, page_size, bitmap_offset, pages_offset
_RECORD_HEAD = _WORD + 1 + 255 + 1  # a word, a block name, a zero page's fill byte
_PAGE_OR_ZERO = RamFlag.PAGE | RamFlag.ZERO
_MIN_RUN = 16  # records a numpy run must hold to be worth its set-up
_KNOWN_FLAGS = int(sum(RamFlag))


class MappedRamHeader(NamedTuple):
    version: int
    page_size: int
    bitmap_offset: int
    pages_offset: int


class BlockEntry(NamedTuple):
    """One entry of the block list, as structs.RamBlockEntry parses it."""

    idstr: str
    used_length: int
    addr: int | None
    mapped_ram: MappedRamHeader | None


def _take(cursor: Cursor, start: int, length: int, what: str) -> bytes:
    """The next ``length`` bytes of an entry that began at ``start``."""
    if cursor.pos + length > cursor.size:
        raise FormatError(start, what, f"the end of the file at {cursor.size:#x}")
    return cursor.read(length, what)


class RunLog:
    """One block's records in stream order, as runs: ``count`` pages from ``first``, each
    record's data ``stride`` bytes after the one before from ``offset`` (-1: ZERO
    records). Consecutive CONTINUE records of consecutive pages, the bulk of a stream,
    make one run: 24 bytes per run, not per page."""

    def __init__(self, stride: int) -> None:
        self.stride = stride
        self.first, self.count, self.offset = array("q"), array("q"), array("q")

    def add(self, page: int, offset: int) -> None:
        """One record: page ``page`` with its data at ``offset`` (-1 for ZERO)."""
        first, count, at = self.first, self.count, self.offset
        if count:
            n = count[-1]
            if first[-1] + n == page and (at[-1] < 0 if offset < 0 else at[-1] + n * self.stride == offset):
                count[-1] = n + 1
                return
            if offset < 0 and at[-1] < 0 and first[-1] <= page < first[-1] + n:
                return  # zeroed again: the last run already zeroes it
        first.append(page)
        count.append(1)
        at.append(offset)

    def add_run(self, pages: np.ndarray, data_offset: int | None) -> None:
        """Records of ``pages`` one stride apart, the first one's data at ``data_offset``
        (None for ZERO records): split where the pages are not consecutive."""
        import numpy as np

        if data_offset is None:
            pages = pages[np.concatenate(([True], np.diff(pages) != 0))]  # zeroed again: once
        starts = np.flatnonzero(np.diff(pages) != 1) + 1
        firsts = pages[np.concatenate(([0], starts))]
        counts = np.diff(np.concatenate(([0], starts, [len(pages)])))
        if data_offset is None:
            offsets = np.full(len(firsts), -1, dtype=np.int64)
        else:
            offsets = np.concatenate(([0], starts)) * self.stride + data_offset
        first, count, at = self.first, self.count, self.offset
        head, head_at = int(firsts[0]), int(offsets[0])
        if (
            count
            and first[-1] + count[-1] == head
            and (at[-1] < 0 if head_at < 0 else at[-1] >= 0 and at[-1] + count[-1] * self.stride == head_at)
        ):
            count[-1] += int(counts[0])  # the first piece extends the last run
            firsts, counts, offsets = firsts[1:], counts[1:], offsets[1:]
        first.frombytes(firsts.astype(np.int64).tobytes())
        count.frombytes(counts.astype(np.int64).tobytes())
        at.frombytes(offsets.astype(np.int64).tobytes())

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import numpy as np

        return tuple(np.frombuffer(a, dtype=np.int64) for a in (self.first, self.count, self.offset))  # type: ignore[return-value]


class PageIndex:
    """Where a classic stream's pages are, built by the walker as it passes the records.

    Per block a RunLog. A block asks through ``pages(name)``, which first lets the walk
    reach EOF (``complete``), then keeps the last record of each page that holds data
    (16 bytes per page, made on use), or through ``count(name)``, which needs no per-page
    arrays when no page has two records (a paused save).
    """

    def __init__(self, complete: Callable[[], None]) -> None:
        self._complete = complete
        self._records: dict[str, RunLog] = {}

    def log(self, name: str, page_size: int) -> RunLog:
        """The log the walker adds ``name``'s records to."""
        if name not in self._records:
            self._records[name] = RunLog(_WORD + page_size)  # one CONTINUE|PAGE record's data to the next
        return self._records[name]

    def _runs(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        self._complete()
        log = self._records.get(name) or RunLog(0)
        return (*log.arrays(), log.stride)

    def count(self, name: str) -> int:
        """Pages of ``name`` whose last record holds data."""
        import numpy as np

        firsts, counts, offsets, _ = self._runs(name)
        if np.all(firsts[1:] >= firsts[:-1] + counts[:-1]):  # in page order, each page once
            return int(counts[offsets >= 0].sum())
        return len(self.pages(name)[0])

    def pages(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(page numbers, file offsets) of the pages the stream holds, sorted by page."""
        import numpy as np

        firsts, counts, offsets, stride = self._runs(name)
        within = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        pages = np.repeat(firsts, counts) + within
        run_offsets = np.repeat(offsets, counts)
        offsets = np.where(run_offsets >= 0, run_offsets + within * stride, -1)
        last = len(pages) - 1 - np.unique(pages[::-1], return_index=True)[1]  # sorted by page
        keep = last[offsets[last] >= 0]
        return pages[keep], offsets[keep]


def _continue_run(buf: bytes, base: int, at: int, flags: int, page_size: int, num_pages: int, records: RunLog) -> int:
    """Log the run of records from ``at`` that all carry ``flags`` (CONTINUE|PAGE: a word
    and a page; CONTINUE|ZERO: a word and a fill byte of 0) with a page inside the block
    and lie wholly in ``buf``; return the bytes taken (0: let the record loop judge)."""
    import numpy as np

    is_page = flags & RamFlag.PAGE
    stride = _WORD + (page_size if is_page else 1)
    count = (base + len(buf) - at) // stride
    if count < _MIN_RUN:
        return 0
    start = at - base
    words = np.ndarray((count,), dtype=">u8", buffer=buf, offset=start, strides=(stride,))
    mask = page_size - 1
    good = (words & mask) == flags
    pages = (words & ~np.uint64(mask)) // np.uint64(page_size)
    good &= pages < num_pages
    if not is_page:
        good &= np.ndarray((count,), dtype=np.uint8, buffer=buf, offset=start + _WORD, strides=(stride,)) == 0
    taken = count if good.all() else int(np.argmin(good))
    if taken == 0:
        return 0
    records.add_run(pages[:taken].astype(np.int64), at + _WORD if is_page else None)
    return taken * stride


class RamSectionReader(ABC):
    """Reads the RAM section's payloads for one mode; holds the blocks it found."""

    def __init__(
        self,
        src: Source,
        policy: ModePolicy,
        page_size: int,
        problems: list[Problem],
        *,
        ignore_shared: bool,
    ) -> None:
        self.src = src
        self.policy = policy
        self.page_size = page_size
        self.problems = problems
        self.ignore_shared = ignore_shared
        self.blocks: dict[str, RamBlock] = {}
        self.total: int | None = None  # MEM_SIZE
        self._verdicts: dict[int, str | None] = {}

    def opening(self, cursor: Cursor) -> None:
        """MEM_SIZE and the block list, then the rest of the START payload."""
        at = cursor.pos
        (word,) = struct.unpack(">Q", cursor.read(_WORD, "the RAM MEM_SIZE word"))
        if self.policy.word_problem(word & (self.page_size - 1)) or not word & RamFlag.MEM_SIZE:
            raise FormatError(at, "the MEM_SIZE word (flag 0x04) opening the RAM section", f"{word:#x}")
        self.total = word & ~(self.page_size - 1)
        remaining = self.total
        while remaining > 0:
            entry_offset = cursor.pos
            if len(self.blocks) == MAX_BLOCKS:
                raise FormatError(
                    entry_offset,
                    f"at most {MAX_BLOCKS} RAM blocks (the block list so far does not add up to MEM_SIZE)",
                    "more",
                )
            entry = self._entry(cursor)
            if entry.idstr in self.blocks:
                raise FormatError(entry_offset, "a RAM block name not seen before", repr(entry.idstr))
            block = self._block(entry, entry_offset, cursor)
            if entry.used_length % block.page_size:
                self.problems.append(
                    Problem(
                        entry_offset,
                        f"expected block {entry.idstr!r}'s used_length to be a multiple "
                        f"of the page size {block.page_size}, found {entry.used_length}",
                    )
                )
            self.blocks[entry.idstr] = block
            remaining -= entry.used_length  # verify reports a sum past MEM_SIZE
        self.payload(cursor)

    def _entry(self, cursor: Cursor) -> BlockEntry:
        start = cursor.pos
        what = f"RAM block entry {len(self.blocks)} (u8 idlen, idstr, be64 used_length)"
        length = _take(cursor, start, 1, what)[0]
        raw = _take(cursor, start, length + _WORD, what)
        try:
            name = raw[:length].decode()
        except UnicodeDecodeError as err:
            raise FormatError(start, what, f"{err} in field idstr") from None
        (used_length,) = _U64.unpack_from(raw, length)
        addr = _U64.unpack(_take(cursor, start, _WORD, what))[0] if self.ignore_shared else None
        header = None
        if self.policy.block_has_mapped_ram_header:
            header = MappedRamHeader(*_MAPPED_RAM_HEADER.unpack(_take(cursor, start, _MAPPED_RAM_HEADER.size, what)))
        return BlockEntry(name, used_length, addr, header)

    @abstractmethod
    def payload(self, cursor: Cursor) -> None:
        """A PART/END payload, or the START payload after the block list: words until EOS."""

    @abstractmethod
    def _block(self, entry: BlockEntry, entry_offset: int, cursor: Cursor) -> RamBlock:
        """The block of a parsed entry; leaves the cursor where the stream resumes."""

    def _verdict(self, flags: int) -> str | None:
        """The policy's objection to a RAM word's flags, asked once per flags value (the
        record loop runs per page); values past every known flag are not kept."""
        if flags in self._verdicts:
            return self._verdicts[flags]
        why = self.policy.later_word_problem(flags)
        if flags <= _KNOWN_FLAGS:
            self._verdicts[flags] = why
        return why

    def _word_problem(self, at: int, word: int, flags: int) -> FormatError:
        return FormatError(at, self._verdict(flags) or "a RAM word", f"word {word:#x}")


class MappedRamSectionReader(RamSectionReader):
    """Blocks with a MappedRamHeader; the payloads hold only EOS words."""

    def __init__(
        self,
        src: Source,
        policy: ModePolicy,
        page_size: int,
        problems: list[Problem],
        *,
        ignore_shared: bool,
        page_size_settled: bool,
        bitmap_layout: BitmapLayout,
    ) -> None:
        super().__init__(src, policy, page_size, problems, ignore_shared=ignore_shared)
        self.page_size_settled = page_size_settled
        self.bitmap_layout = bitmap_layout

    def _block(self, entry: BlockEntry, entry_offset: int, cursor: Cursor) -> RamBlock:
        hdr = entry.mapped_ram
        assert hdr is not None
        header_offset = cursor.pos - HEADER_SIZE
        name = entry.idstr
        if hdr.version > MAPPED_RAM_VERSION or hdr.version == 0:
            raise FormatError(
                header_offset, f"mapped-ram header version {MAPPED_RAM_VERSION} for {name!r}", str(hdr.version)
            )
        ps = hdr.page_size
        if not valid_page_size(ps):
            raise FormatError(
                header_offset + HEADER_FIELDS["page_size"], f"a power-of-two page size for {name!r}", str(ps)
            )
        place = parsed_place(name, entry.used_length, entry_offset, header_offset, hdr, self.bitmap_layout)
        if not self.blocks and not self.page_size_settled:
            self.page_size = ps  # the first header settles a page size nothing else gave
        in_file = block_in_file(self.ignore_shared, place.bitmap_offset, place.pages_offset)
        block = MappedRamBlock(self.src, place, hdr.version, entry.addr, self.bitmap_layout, in_file)
        if not in_file:
            return block  # a shared block: nothing reserved, the stream goes on here
        self.src.require(place.bitmap_offset, place.bitmap_size, f"the bitmap of {name!r}")
        self.src.require(place.pages_offset, place.used_length, f"the page region of {name!r}")
        if place.resume_offset <= cursor.pos:
            raise FormatError(
                place.field_offset("pages_offset"),
                f"a page region of {name!r} after its header, so that the stream resumes past {cursor.pos:#x}",
                f"it resumes at {place.resume_offset:#x}",
            )
        cursor.skip_to(place.resume_offset, f"the page region of {name!r}")
        return block

    def payload(self, cursor: Cursor) -> None:
        mask, eos = self.page_size - 1, int(RamFlag.EOS)
        while True:
            at = cursor.pos
            (word,) = struct.unpack(">Q", cursor.read(_WORD, "a RAM word (flags in the low bits)"))
            flags = word & mask
            if self._verdict(flags):
                raise self._word_problem(at, word, flags)
            if flags & eos:
                return


class StreamRamSectionReader(RamSectionReader):
    """Blocks of a classic stream; the payloads hold PAGE/ZERO records, indexed here."""

    def __init__(
        self,
        src: Source,
        policy: ModePolicy,
        page_size: int,
        problems: list[Problem],
        *,
        ignore_shared: bool,
        index: PageIndex,
    ) -> None:
        super().__init__(src, policy, page_size, problems, ignore_shared=ignore_shared)
        self.index = index
        self._current: str | None = None  # the block a CONTINUE record refers to

    def _block(self, entry: BlockEntry, entry_offset: int, cursor: Cursor) -> RamBlock:
        return StreamRamBlock(
            self.src, entry.idstr, entry.used_length, self.page_size, entry_offset, entry.addr, self.index
        )

    def payload(self, cursor: Cursor) -> None:
        """Walk PAGE/ZERO/CONTINUE records until EOS (the hot loop of stream files)."""
        pos = cursor.pos
        buf, base = b"", pos  # the cursor's window: records are read from it, never mapped
        size, page_size, mask = cursor.size, self.page_size, self.page_size - 1
        unpack = struct.Struct(">Q").unpack_from
        verdict, known = self._verdict, self._verdicts
        # plain ints: an IntFlag operation costs microseconds, this loop runs per record
        eos, page_or_zero, cont, page_flag = (
            int(f) for f in (RamFlag.EOS, _PAGE_OR_ZERO, RamFlag.CONTINUE, RamFlag.PAGE)
        )
        # CONTINUE records of one kind, the bulk of a stream, are taken in runs (numpy)
        run_flags = {f for f in (cont | page_flag, cont | int(RamFlag.ZERO)) if verdict(f) is None}
        block_name = self._current
        records = None if block_name is None else self.index.log(block_name, page_size)
        num_pages = 0 if block_name is None else self.blocks[block_name].num_pages
        while True:
            if pos + _RECORD_HEAD > base + len(buf):
                buf, base = cursor.window(pos, min(size - pos, _RECORD_HEAD))
                size = cursor.size  # a decompressed stream learns its end as it is read
            if pos + _WORD > size:
                raise FormatError(pos, "a RAM word", "the end of the file")
            (word,) = unpack(buf, pos - base)
            flags = word & mask
            if (known[flags] if flags in known else verdict(flags)) is not None:
                raise self._word_problem(pos, word, flags)
            if flags in run_flags and records is not None:
                stride = _WORD + (page_size if flags & page_flag else 1)
                # the window is refreshed only when fewer than _MIN_RUN records remain in it,
                # and numpy is asked only when the next record has the same flags too
                buf, base = cursor.window(pos, min(size - pos, _MIN_RUN * stride))
                nxt = pos + stride - base
                if nxt + _WORD <= len(buf) and unpack(buf, nxt)[0] & mask == flags:
                    taken = _continue_run(buf, base, pos, flags, page_size, num_pages, records)
                    if taken:
                        pos += taken
                        continue
            pos += _WORD
            if flags & eos:
                self._current = block_name
                cursor.skip_to(pos, "the RAM section")
                return
            if not flags & page_or_zero:
                continue  # MULTIFD_FLUSH: nothing follows
            if not flags & cont:
                if pos >= size:
                    raise FormatError(pos, "a block name", "the end of the file")
                length = buf[pos - base]
                if pos + 1 + length > size:
                    raise FormatError(pos, f"a block name of {length} bytes", "the end of the file")
                block_name = buf[pos - base + 1 : pos - base + 1 + length].decode("utf-8", "replace")
                if block_name not in self.blocks:
                    raise FormatError(pos, "the name of a RAM block from the block list", repr(block_name))
                records = self.index.log(block_name, page_size)
                num_pages = self.blocks[block_name].num_pages
                pos += 1 + length
            elif records is None:
                raise FormatError(pos - _WORD, "a block name (CONTINUE on the first page record)", f"word {word:#x}")
            page = (word & ~mask) // page_size
            if page >= num_pages:
                raise FormatError(pos - _WORD, f"a page inside block {block_name!r}", f"address {word & ~mask:#x}")
            if flags & page_flag:
                if pos + page_size > size:
                    raise FormatError(pos, f"{page_size} bytes of page data", "the end of the file")
                records.add(page, pos)
                pos += page_size
            else:
                if pos >= size:
                    raise FormatError(pos, "the fill byte of a zero page", "the end of the file")
                if buf[pos - base] != 0:
                    raise FormatError(pos, "a zero page fill byte of 0", f"{buf[pos - base]:#04x}")
                records.add(page, -1)
                pos += 1
