"""A compressed libvirt image, read in one forward pass: ``mappedram.open(path)``.

libvirt compresses only classic streams, so everything sits in the stream in order:
the block list, the page records, the device sections, EOF, the VM description.
``ForwardSnapshot`` walks it once through a decompressing cursor (compression.py), with
the same walker and RAM reader as any classic stream; the page records' data goes to
the one consumer given to ``consume()`` as the records pass (extract, restore, hashes,
convert), and each block keeps one bit per page (``PageBits``: which pages hold data),
so memory follows a bitmap of the guest, never the guest.

What works forward only: the metadata (dump: blocks, populated pages, sections, the
VM description), verify and its hashes, extract, restore, convert, and the device state
(dump --state, extract --all, export-elf's CPU notes). Reading a page by number, a
block's extents or other file bytes needs random access and raises FormatError naming
what to use instead. A second pass over the data needs the image opened again.
Device sections are delimited by their footers (the description that sizes them comes
after them). A compressed image's configuration and non-RAM sections cannot be read
again, so their bytes are kept as they pass (``KeptBytes``): a few hundred KiB for a pc
guest, at most DEVICE_STATE_LIMIT in all. A section past that is dropped, and reading it
(decoding it, converting the image) is refused with one line naming its offset; the
walk itself, and with it dump and verify, goes on.
"""

from __future__ import annotations

import bisect
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Protocol, TypeVar

import numpy as np

from ..errors import FormatError
from ..formats import structs as S
from ..formats.bitmap import LITTLE_ENDIAN_64
from ..formats.constants import RAM_IDSTR, SectionType
from ..formats.policy import libvirt_stream_problem, policy_for
from .blocks import Progress, RamBlock, StreamRamBlock
from .channels import pwrite_all
from .copy_plan import zero_chunks
from .elements import Problem, Section
from .output import Writeback, output_file
from .parallel_load import RestoreStats
from .prologue import LIBVIRT_FORMAT_AT, read_libvirt, read_prologue, read_stream_prologue
from .ram_section import StreamRamSectionReader
from .snapshot import DEFAULT_PAGE_SIZE, Snapshot
from .source import UNKNOWN_SIZE, Cursor, Source
from .vmdesc import VMDESC_SEARCH_LIMIT, device_payload_size, load_vmdesc
from .walker import StreamWalker

__all__ = ["ForwardSnapshot", "KeptBytes", "PageConsumer", "PerBlock"]

DEVICE_STATE_LIMIT = 256 << 20  # bytes of the configuration and non-RAM sections kept, in all (the
# bound one section had before: a big VFIO device state still converts)
_RAM_NAME = RAM_IDSTR.encode()
_WORD = S.RamWord.sizeof()  # the RAM word in front of each record
_T = TypeVar("_T")


class PageConsumer(Protocol):
    """Where a forward pass delivers the pages, in stream order (a later record of a page
    overrides an earlier one)."""

    def page(self, block: RamBlock, page: int, data: memoryview) -> None:
        """A PAGE record: ``data`` is valid only during the call."""

    def zero(self, block: RamBlock, page: int) -> None:
        """A ZERO record for a page that held data before (a first ZERO record is not
        delivered: the page is zero already)."""

    def run(self, block: RamBlock, pages: np.ndarray, rows: np.ndarray) -> None:
        """PAGE records of ``pages`` in a row (the record loop's numpy runs): ``rows`` is
        a (len(pages), page size) view of their data, valid only during the call."""


def _segments(pages: np.ndarray) -> list[tuple[int, int]]:
    """[i, j) index ranges of ``pages`` that are consecutive page numbers."""
    cuts = (np.flatnonzero(np.diff(pages) != 1) + 1).tolist()
    return list(zip([0, *cuts], [*cuts, len(pages)]))


class PageBits:
    """One bit per page, allocated in chunks only where the stream has pages."""

    CHUNK_SHIFT = 18
    CHUNK_PAGES = 1 << CHUNK_SHIFT  # 32 KiB of bits per GiB of 4 KiB pages

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._chunks: dict[int, bytearray] = {}

    def set(self, page: int) -> None:
        """Set ``page``'s bit (once per PAGE record: kept short)."""
        chunk = self._chunks.get(page >> self.CHUNK_SHIFT)
        if chunk is None:
            chunk = self._chunks[page >> self.CHUNK_SHIFT] = bytearray(self.CHUNK_PAGES // 8)
        chunk[(page >> 3) & (self.CHUNK_PAGES // 8 - 1)] |= 1 << (page & 7)

    def set_many(self, pages: np.ndarray) -> None:
        """Set the bits of ``pages`` (numbers, any order)."""
        for key in np.unique(pages >> self.CHUNK_SHIFT).tolist():
            chunk = self._chunks.get(key)
            if chunk is None:
                chunk = self._chunks[key] = bytearray(self.CHUNK_PAGES // 8)
            within = pages[(pages >> self.CHUNK_SHIFT) == key] & (self.CHUNK_PAGES - 1)
            np.bitwise_or.at(np.frombuffer(chunk, dtype=np.uint8), within >> 3, (1 << (within & 7)).astype(np.uint8))

    def clear(self, page: int) -> bool:
        """Clear ``page``'s bit; whether it was set."""
        chunk = self._chunks.get(page >> self.CHUNK_SHIFT)
        if chunk is None:
            return False
        at, bit = divmod(page % self.CHUNK_PAGES, 8)
        was = chunk[at] >> bit & 1
        chunk[at] &= ~(1 << bit) & 0xFF
        return bool(was)

    def count(self) -> int:
        return sum(int.from_bytes(c, "little").bit_count() for c in self._chunks.values())

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first page, bool array) in page order, only where bits may be set."""
        for key in sorted(self._chunks):
            first = key * self.CHUNK_PAGES
            bits = np.unpackbits(np.frombuffer(self._chunks[key], dtype=np.uint8), bitorder="little")
            yield first, bits[: max(0, min(self.CHUNK_PAGES, self.num_pages - first))].astype(bool)


class _FeedLog:
    """What the record loop logs one block's records to (ram_section's RunLog interface):
    each record, or run of records, is handed on while its data is in the cursor's window."""

    __slots__ = ("feed", "block")

    def __init__(self, feed: "PageFeed", block: "ForwardRamBlock") -> None:
        self.feed, self.block = feed, block

    def add(self, page: int, offset: int) -> None:
        self.feed.record(self.block, page, offset)

    def add_run(self, pages: np.ndarray, data_offset: int | None) -> None:
        self.feed.run(self.block, pages, data_offset)


class PageFeed:
    """The page index of a forward pass: takes the walker's records as they pass, keeps
    the bits of the pages that hold data and hands the data to the consumer."""

    def __init__(self, cursor: Cursor, complete: Any) -> None:
        self.cursor = cursor
        self.complete = complete  # walks to the end of the stream
        self.consumer: PageConsumer | None = None
        self.records = 0  # records seen without a consumer
        self.blocks: dict[str, ForwardRamBlock] = {}

    def log(self, name: str, page_size: int) -> _FeedLog:
        return _FeedLog(self, self.blocks[name])

    def run(self, block: "ForwardRamBlock", pages: np.ndarray, data_offset: int | None) -> None:
        """Records of ``pages`` one record apart (ZERO records when ``data_offset`` is None)."""
        if data_offset is None or self.consumer is None or not hasattr(self.consumer, "run"):
            stride = _WORD + block.page_size
            for i, page in enumerate(pages.tolist()):
                self.record(block, page, -1 if data_offset is None else data_offset + i * stride)
            return
        size, stride = block.page_size, _WORD + block.page_size
        span = (len(pages) - 1) * stride + size
        view = self.cursor.view(data_offset, span)
        if len(view) < span:
            raise FormatError(data_offset, f"{span} bytes of page records", "the end of the stream")
        rows = np.ndarray((len(pages), size), dtype=np.uint8, buffer=view, strides=(stride, 1))
        block.bits.set_many(pages)
        self.consumer.run(block, pages, rows)

    def record(self, block: "ForwardRamBlock", page: int, pos: int) -> None:
        consumer = self.consumer
        if consumer is None:
            self.records += 1
        if pos < 0:
            if block.bits.clear(page) and consumer is not None:
                consumer.zero(block, page)
            return
        data = self.cursor.view(pos, block.page_size)
        if len(data) < block.page_size:
            raise FormatError(pos, f"{block.page_size} bytes of page data", "the end of the stream")
        block.bits.set(page)
        if consumer is not None:
            consumer.page(block, page, data)

    def pages(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        raise self.blocks[name].forward_only("a page index with file offsets")


class ForwardRamBlock(StreamRamBlock):
    """A block of a compressed image: which pages hold data, but no file offsets."""

    def __init__(self, owner: "ForwardSnapshot", *args: Any) -> None:
        super().__init__(*args)
        self._owner = owner
        self.bits = PageBits(self.num_pages)

    def forward_only(self, what: str) -> FormatError:
        return self._owner.forward_only(what)

    @property
    def index(self) -> tuple[np.ndarray, np.ndarray]:
        raise self.forward_only("a page index with file offsets")

    @property
    def populated(self) -> int:
        self._owner.walk_all()
        return self.bits.count()

    def present_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        self._owner.walk_all()
        return self.bits.chunks()

    def extent_arrays(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        raise self.forward_only(f"the file offsets of block {self.name!r}'s pages")

    def _page_offset(self, index: int) -> int | None:
        raise self.forward_only(f"page {index} of block {self.name!r}")

    def read_into(self, out: Any, progress: Progress | None = None, zero_fill: bool = True) -> None:
        self._owner.restore_into({self.name: out}, zero_fill=zero_fill, progress=progress)


class _ForwardRamReader(StreamRamSectionReader):
    def __init__(self, owner: "ForwardSnapshot", feed: PageFeed, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, index=feed, **kwargs)  # type: ignore[arg-type]
        self._owner, self._feed = owner, feed

    def _block(self, entry: Any, entry_offset: int, cursor: Cursor) -> RamBlock:
        block = ForwardRamBlock(
            self._owner, self.src, entry.idstr, entry.used_length, self.page_size, entry_offset, entry.addr, self._feed
        )
        self._feed.blocks[entry.idstr] = block
        return block


class KeptBytes:
    """The stream's bytes a forward pass keeps (the configuration, the non-RAM sections),
    each element whole, at most ``limit`` bytes in all. An element that does not fit in
    what is left is dropped: reading it says so, naming its offset."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0  # bytes kept
        self._starts: list[int] = []  # in stream order
        self._parts: list[tuple[int, bytearray | None]] = []  # (end, bytes or None: dropped)

    @property
    def room(self) -> int:
        return self.limit - self.size

    def record(self, cursor: Cursor, start: int, walk: Callable[[], _T]) -> _T:
        """Keep the bytes from ``start`` to where ``walk`` leaves ``cursor``; what it returns."""
        cursor.record_from(start, self.room)
        result = walk()
        data = cursor.recorded(cursor.pos)
        self._starts.append(start)
        self._parts.append((cursor.pos, data))
        self.size += len(data or b"")
        return result

    def get(self, offset: int, length: int) -> bytes | None:
        """``length`` bytes from ``offset`` if one kept element holds them (None if none
        does); FormatError if the element that holds them was dropped."""
        i = bisect.bisect_right(self._starts, offset) - 1
        if i < 0:
            return None
        start, (end, data) = self._starts[i], self._parts[i]
        if offset + length > end:
            return None
        if data is None:
            raise FormatError(
                start,
                f"at most {self.limit} bytes of device state (what one forward pass keeps of the "
                "configuration and non-RAM sections)",
                "more with the section here",
            )
        return bytes(memoryview(data)[offset - start : offset - start + length])


class _ForwardWalker(StreamWalker):
    """The walker over a classic stream read once: keeps the bytes of non-RAM sections
    in ``kept`` (a decompressed stream cannot be read again; None: a file that can) and
    reads the VM description forward after EOF."""

    def __init__(self, *args: Any, kept: KeptBytes | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kept = kept
        self.vmdesc: tuple[int, bytes] | None = None  # (offset of the 0x06 byte, JSON)

    def _full_section(self, off: int, kind: SectionType) -> None:
        buf, base = self.cursor.window(off, 6 + 255)
        at = off - base + 6  # type, be32 id, u8 length, idstr
        name = buf[at : at + buf[at - 1]] if at <= len(buf) else b""
        self._keeping(off, kind, name == _RAM_NAME, super()._full_section)

    def _part_section(self, off: int, kind: SectionType) -> None:
        buf, base = self.cursor.window(off, 5)
        section_id = int.from_bytes(buf[off - base + 1 : off - base + 5], "big")
        self._keeping(off, kind, section_id == self.ram_section_id, super()._part_section)

    def _keeping(self, off: int, kind: SectionType, ram: bool, walk: Any) -> None:
        if ram or self.kept is None:
            walk(off, kind)
        else:
            self.kept.record(self.cursor, off, lambda: walk(off, kind))

    def _eof(self, off: int, kind: SectionType) -> None:
        cursor = self.cursor
        cursor.skip_to(off + 1, "EOF")
        self.eof_offset = off
        self.sections.append(Section("eof", off, end=off + 1))
        self.done = True
        after = off + 1
        buf, base = cursor.window(after, 1)
        if len(buf) <= after - base:
            return  # the stream ends at EOF: no description (suppress-vmdesc)
        if buf[after - base] != SectionType.VMDESCRIPTION:
            self.problems.append(
                Problem(after, "expected the VM description or the end of the stream after EOF, found other bytes")
            )
            return
        head = cursor.parse(S.VmDescriptionHead, "the VM description header (0x06, be32 length)")
        if head.length > VMDESC_SEARCH_LIMIT:
            self.problems.append(Problem(after, f"expected a VM description under {VMDESC_SEARCH_LIMIT} bytes"))
            return
        text = cursor.read(head.length, "the VM description JSON")
        self.vmdesc = (after, text)
        end = cursor.pos
        buf, base = cursor.window(end, 1)
        if len(buf) > end - base:
            self.problems.append(Problem(end, "expected the end of the stream after the VM description, found more"))


_VMDESC_HEAD = S.VmDescriptionHead.sizeof()


def _reporting(src: Source, progress: Progress | None) -> Any:
    """``src.fetch`` telling ``progress`` how far into the file each read reaches."""
    if progress is None:
        return src.fetch

    def fetch(offset: int, length: int) -> bytes:
        data = src.fetch(offset, length)
        progress(offset + len(data), src.size)
        return data

    return fetch


class _Passed:
    """Bytes kept from a forward pass, read like a Source (for load_vmdesc)."""

    def __init__(self, offset: int, data: bytes, size: int) -> None:
        self.offset, self.data, self.size = offset, data, size

    def read(self, offset: int, length: int, what: str) -> bytes:
        if offset != self.offset or length != len(self.data):
            raise FormatError(offset, f"{what} as it passed", "another range")
        return self.data


class ForwardSnapshot(Snapshot):
    """A classic stream read once from front to back: a compressed libvirt image (see
    the module), or an uncompressed file that convert reads without a page index.
    ``offset``: where an uncompressed file's stream starts (as for ``open``).
    ``device_state_limit``: the bytes of a compressed image's configuration and non-RAM
    sections its pass keeps, in all (``KeptBytes``); an uncompressed file keeps none."""

    one_pass = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        offset: int | None = None,
        page_size: int | None = None,
        progress: Progress | None = None,
        device_state_limit: int = DEVICE_STATE_LIMIT,
    ) -> None:
        self._src = Source(path)
        self._stream = None
        self._kept: KeptBytes | None = None  # a decompressed stream's: it cannot be read again
        try:
            self.path: str = self._src.path
            self.size: int = self._src.size
            self.bitmap_layout = LITTLE_ENDIAN_64
            self.problems: list[Problem] = []
            header, cut, compressor = (None, [], None) if offset is not None else read_libvirt(self._src.cursor(0))
            self.compressor: str | None = compressor
            if header is not None and compressor is not None:
                from .compression import Decompressed  # noqa: PLC0415 - only compressed images need it

                self._stream = Decompressed(self._src.fd, header.stream_start, self.size, compressor, progress)
                cursor = Cursor(self._stream.fetch, UNKNOWN_SIZE, header.stream_start)
                self._kept = KeptBytes(device_state_limit)  # from the QEVM header: the configuration
                self.prologue = self._kept.record(cursor, cursor.pos, lambda: read_stream_prologue(cursor, header, cut))
            else:
                cursor = Cursor(_reporting(self._src, progress), self.size, offset or 0)
                self.prologue = read_prologue(cursor, explicit_start=offset is not None)
            self.problems += self.prologue.problems
            self.policy = policy_for(self.capabilities)
            if not self.policy.pages_in_stream:
                raise FormatError(
                    self.stream_start,
                    f"a classic stream behind a {compressor}-compressed libvirt header (libvirt compresses no other)"
                    if compressor
                    else "a classic stream to read in one forward pass",
                    f"a {self.policy.mode.value} stream",
                )
            if compressor is None and self.libvirt is not None:
                if why := libvirt_stream_problem(self.libvirt.format, self.policy.mode):
                    self.problems.append(Problem(LIBVIRT_FORMAT_AT, f"expected {why}"))
            self.vmdesc_location: tuple[int, int] | None = None
            self._vmdesc: dict[str, Any] | None = None
            self._vmdesc_error: str | None = None
            self._feed = PageFeed(cursor, self.walk_all)
            settled = page_size or (1 << self.target_page_bits if self.target_page_bits else None)
            self._ram = _ForwardRamReader(
                self,
                self._feed,
                self._src,
                self.policy,
                settled or DEFAULT_PAGE_SIZE,
                self.problems,
                ignore_shared=self.ignore_shared,
            )
            self._walker = _ForwardWalker(
                cursor, self._ram, self.problems, kept=self._kept, vmdesc=lambda: None, vmdesc_offset=None
            )
            self._walker.walk(until_ram_start=True)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        super().close()

    @property
    def _kind(self) -> str:
        return f"{self.compressor}-compressed image" if self.compressor else "stream opened for one forward pass"

    def forward_only(self, what: str) -> FormatError:
        """The one line for an operation that needs random access."""
        return FormatError(
            self.stream_start,
            f"random access for {what}; this {self._kind} reads in one forward pass: "
            "use restore, extract, verify --hash, or convert it first (mappedram convert IMAGE OUT --to stream)",
        )

    def walk_all(self) -> None:
        self._walker.walk()
        if self._walker.vmdesc is not None and self.vmdesc_location is None:
            offset, text = self._walker.vmdesc
            self.vmdesc_location = (offset, len(text))
            try:  # the same parse and checks as a random-access file's description
                self._vmdesc = load_vmdesc(
                    _Passed(offset + _VMDESC_HEAD, text, self._walker.cursor.size), offset, len(text)
                )
            except ValueError as err:
                self._vmdesc_error = str(err)
                self.problems.append(Problem(offset, f"expected a VM description in JSON, found {err}"))
            else:
                self._check_device_sizes()

    def _check_device_sizes(self) -> None:
        """The footers delimited the device sections; the description, read after them,
        must give the same sizes (where the random-access reader takes its sizes from)."""
        devices = (self._vmdesc or {}).get("devices")
        if not isinstance(devices, list):
            return
        for sec, dev in zip(self.devices, devices):
            if not isinstance(dev, dict) or dev.get("name") != sec.idstr:
                continue  # verify reports a description out of order
            try:
                size = device_payload_size(dev)
            except (KeyError, TypeError, ValueError, OverflowError, RecursionError):  # JSON is free-form
                continue
            if size != sec.payload_length:
                self.problems.append(
                    Problem(
                        sec.payload_offset or sec.offset,
                        f"expected the {size} bytes of {sec.idstr}'s state the VM description gives, "
                        f"found {sec.payload_length} before its footer",
                    )
                )

    def _walk_all(self) -> None:
        self.walk_all()

    @property
    def sections(self) -> list[Section]:
        self.walk_all()
        return self._walker.sections

    @property
    def eof_offset(self) -> int | None:
        self.walk_all()
        return self._walker.eof_offset

    @property
    def vmdesc(self) -> dict[str, Any] | None:
        """The description after EOF: asking for it walks the stream (the pages pass)."""
        self.walk_all()
        return self._vmdesc

    def consume(self, consumer: PageConsumer, progress: Progress | None = None) -> None:
        """Walk the rest of the stream, handing every page record to ``consumer``."""
        if self._walker.done or self._feed.records or self._feed.consumer is not None:
            raise FormatError(
                self.stream_start,
                f"a {self._kind} not yet read past its pages (it reads in one pass)",
                "it was read already: open it again",
            )
        self._feed.consumer = consumer
        if progress is not None and self._stream is not None:
            self._stream._progress = progress
        self.walk_all()

    def read_bytes(self, offset: int, length: int) -> bytes:
        """Bytes of the configuration or a non-RAM section of a compressed image (kept as
        they passed: this walks the stream), or any bytes of an uncompressed file."""
        if self._kept is None:
            return super().read_bytes(offset, length)
        self.walk_all()
        data = self._kept.get(offset, length)
        if data is None:
            raise self.forward_only(f"file bytes at {offset:#x}")
        return data

    def restore_into(
        self,
        targets: Mapping[str, Any],
        *,
        channels: int = 4,
        zero_fill: bool = True,
        progress: Progress | None = None,
    ) -> RestoreStats:
        """Fill ``targets`` (block name -> writable buffer of used_length bytes) in this
        image's one pass; ``channels`` does not apply (one decompressor)."""
        views = {}
        for name, target in targets.items():
            view = memoryview(target).cast("B")
            block = self.block(name)
            if len(view) != block.used_length:
                raise ValueError(f"target holds {len(view)} bytes, block {name!r} has {block.used_length}")
            if zero_fill:
                np.frombuffer(view, dtype=np.uint8)[:] = 0
            views[name] = view
        fill = _BufferFill(views)
        self.consume(fill, progress)
        return RestoreStats(bytes_read=fill.copied)


class _BufferFill:
    def __init__(self, views: Mapping[str, memoryview]) -> None:
        self.views = views
        self.copied = 0

    def page(self, block: RamBlock, page: int, data: memoryview) -> None:
        view = self.views.get(block.name)
        if view is not None:
            at = page * block.page_size
            view[at : at + len(data)] = data
            self.copied += len(data)

    def zero(self, block: RamBlock, page: int) -> None:
        view = self.views.get(block.name)
        if view is not None:
            at = page * block.page_size
            view[at : at + block.page_size] = bytes(block.page_size)

    def run(self, block: RamBlock, pages: np.ndarray, rows: np.ndarray) -> None:
        view = self.views.get(block.name)
        if view is not None:
            ps = block.page_size
            target = np.frombuffer(view, dtype=np.uint8)[: block.num_pages * ps].reshape(-1, ps)
            target[pages] = rows  # in order: a page given twice keeps its later data
            self.copied += rows.nbytes


Locate = Callable[[RamBlock, int], int | None]  # (block, page) -> file offset, or None: not written
# (file offset, buffers to write there one after the other): how FileWriter's writes are
# done; ``FileWriter.pwrite`` unless convert hands them to its channels.
Put = Callable[[int, list[Any]], None]


class FileWriter:
    """Pages written into a file, contiguous pages coalesced into one write (the data
    views stay valid: the cursor's buffers are immutable). Where: ``bases`` (block name
    -> file offset of its page 0, pages in order after it), or else ``locate``. ``put``:
    what does each write (default: pwrite it here); ``batch``: pages per write at most."""

    BATCH = 256  # pages per write at most: 1 MiB, about the cursor's window (measured
    # against 64 and 2048 by bench/bench_convert.py)

    def __init__(
        self,
        fd: int,
        bases: Mapping[str, int],
        locate: Locate | None = None,
        writeback: Writeback | None = None,
        put: Put | None = None,
        batch: int = BATCH,
    ) -> None:
        self.fd = fd
        self.bases = bases
        self.locate = locate
        self.writeback = writeback
        self.put = put or self.pwrite
        self.batch = batch
        self._views: list[memoryview] = []
        self._at = 0  # file offset of the first pending view
        self._end = 0

    def _offset(self, block: RamBlock, page: int) -> int | None:
        base = self.bases.get(block.name)
        if base is not None:
            return base + page * block.page_size
        return None if self.locate is None else self.locate(block, page)

    def page(self, block: RamBlock, page: int, data: memoryview) -> None:
        base = self.bases.get(block.name)
        at = base + page * block.page_size if base is not None else self._offset(block, page)
        if at is None:
            return
        if self._views and (at != self._end or len(self._views) >= self.batch):
            self.flush()
        if not self._views:
            self._at = at
        self._views.append(data)
        self._end = at + len(data)

    def run(self, block: RamBlock, pages: np.ndarray, rows: np.ndarray) -> None:
        base = self.bases.get(block.name)
        if base is None:
            for i, page in enumerate(pages.tolist()):
                self.page(block, page, memoryview(rows[i]))
            return
        self.flush()
        for i, j in _segments(pages):
            for k in range(i, j, self.batch):
                piece = rows[k : min(j, k + self.batch)]  # gathered by whoever writes it
                self._put(base + int(pages[k]) * block.page_size, [piece], piece.nbytes)

    def zero(self, block: RamBlock, page: int) -> None:
        at = self._offset(block, page)
        if at is not None:
            self.flush()
            self._put(at, [memoryview(bytes(block.page_size))], block.page_size)

    def flush(self) -> None:
        views, self._views = self._views, []
        if views:
            self._put(self._at, views, sum(len(v) for v in views))

    def _put(self, at: int, parts: list[Any], nbytes: int) -> None:
        self.put(at, parts)
        if self.writeback is not None:
            self.writeback.wrote(nbytes)

    def pwrite(self, at: int, parts: list[Any]) -> None:
        """Write ``parts`` one after the other from ``at``, through ``fd``."""
        pwrite_all(self.fd, self.gather(parts), at)

    @staticmethod
    def gather(parts: list[Any]) -> memoryview:
        """``parts`` (memoryviews, or one array of rows as a run's pages) as one buffer: a
        pwritev of 4 KiB pieces costs the kernel about three times more than a copy."""
        if len(parts) == 1 and isinstance(parts[0], np.ndarray):
            return memoryview(np.ascontiguousarray(parts[0]).reshape(-1))
        return memoryview(b"".join(parts))


IOV_MAX = 1024  # buffers one pwritev takes (Linux)


class PerBlock:
    """Each block's pages to its own consumer (extract --all: a file per block); the
    pages of blocks without one are dropped."""

    def __init__(self, consumers: Mapping[str, PageConsumer]) -> None:
        self.consumers = consumers

    def page(self, block: RamBlock, page: int, data: memoryview) -> None:
        if (consumer := self.consumers.get(block.name)) is not None:
            consumer.page(block, page, data)

    def zero(self, block: RamBlock, page: int) -> None:
        if (consumer := self.consumers.get(block.name)) is not None:
            consumer.zero(block, page)

    def run(self, block: RamBlock, pages: np.ndarray, rows: np.ndarray) -> None:
        if (consumer := self.consumers.get(block.name)) is not None:
            consumer.run(block, pages, rows)


def extract_forward(
    snap: ForwardSnapshot,
    name: str,
    out_path: str | os.PathLike[str],
    *,
    overwrite: bool = True,
    progress: Progress | None = None,
) -> int:
    """``extract`` in the image's one pass: each page pwritten at its offset into the
    sparse output (a later record of a page overrides an earlier one)."""
    block = snap.block(name)
    with output_file(out_path, overwrite=overwrite, source_fd=snap.fd) as fd:
        os.ftruncate(fd, block.used_length)
        writer = FileWriter(fd, {name: 0}, writeback=Writeback(fd))
        snap.consume(writer, progress)
        writer.flush()
    return block.populated * block.page_size


def copy_regions_forward(
    snap: ForwardSnapshot, fd: int, regions: list[tuple[Any, int]], progress: Progress | None = None
) -> int:
    """export-elf's copy in the image's one pass: (region, file offset of its segment)
    pairs, a region being ``size`` bytes of ``block`` from ``offset`` (page-aligned)."""
    by_block: dict[str, list[tuple[int, int, int]]] = {}
    for region, seg in regions:
        by_block.setdefault(region.block, []).append((region.offset, region.offset + region.size, seg))

    def locate(block: RamBlock, page: int) -> int | None:
        at = page * block.page_size
        for lo, hi, seg in by_block.get(block.name, ()):
            if lo <= at and at + block.page_size <= hi:
                return seg + at - lo
        return None

    writer = FileWriter(fd, {}, locate)
    snap.consume(writer, progress)
    writer.flush()
    copied = 0
    for region, _ in regions:
        block = snap.block(region.block)
        ps = block.page_size
        for first, present in block.present_chunks():
            lo = max(first, region.offset // ps)
            hi = min(first + len(present), (region.offset + region.size) // ps)
            if lo < hi:
                copied += int(np.count_nonzero(present[lo - first : hi - first])) * ps
    return copied


@dataclass
class _HashState:
    digest: Any
    next_page: int = 0
    out_of_order: tuple[int, int] | None = None  # (page that came, page expected)


class InOrderHashes:
    """sha256 of each block as QEMU restores it, fed in one pass: a page's data when its
    record comes, zeros for the pages skipped. Correct only while each block's records
    come in increasing page order, as QEMU writes a paused save (each page once); a
    record for a page at or before one already hashed (a repeat, or a live save's later
    pass) makes that block's hash unavailable, said in a note."""

    def __init__(self, blocks: list[RamBlock]) -> None:
        self.state = {b.name: _HashState(hashlib.sha256()) for b in blocks if b.in_file}

    def _advance(self, block: RamBlock, page: int) -> _HashState | None:
        st = self.state.get(block.name)
        if st is None or st.out_of_order is not None:
            return None
        if page < st.next_page:
            st.out_of_order = (page, st.next_page)
            return None
        for zeros in zero_chunks((page - st.next_page) * block.page_size):
            st.digest.update(zeros)
        st.next_page = page + 1
        return st

    def page(self, block: RamBlock, page: int, data: memoryview) -> None:
        st = self._advance(block, page)
        if st is not None:
            st.digest.update(data)

    def zero(self, block: RamBlock, page: int) -> None:
        st = self.state.get(block.name)
        if st is not None and st.out_of_order is None:
            st.out_of_order = (page, st.next_page)  # a page that held data is zero again

    def run(self, block: RamBlock, pages: np.ndarray, rows: np.ndarray) -> None:
        back = np.flatnonzero(np.diff(pages) <= 0)
        if len(back):  # a page again, or one before: hashed up to there, then unavailable
            self.run(block, pages[: back[0] + 1], rows[: back[0] + 1])
            self.page(block, int(pages[back[0] + 1]), memoryview(rows[back[0] + 1]))
            return
        for i, j in _segments(pages):
            st = self._advance(block, int(pages[i]))
            if st is None:
                return
            st.digest.update(np.ascontiguousarray(rows[i:j]))
            st.next_page = int(pages[j - 1]) + 1

    def results(self, blocks: Mapping[str, RamBlock]) -> tuple[dict[str, str], list[str]]:
        """(block -> hex digest, notes for the blocks without one); pads to the end."""
        hashes, notes = {}, []
        for name, st in self.state.items():
            block = blocks[name]
            if st.out_of_order is not None:
                came, expected = st.out_of_order
                notes.append(
                    f"block {name!r}: no sha256 in one forward pass (page {came} comes again after page "
                    f"{expected - 1}): convert the image (--to mapped-ram) and hash that"
                )
                continue
            for zeros in zero_chunks((block.num_pages - st.next_page) * block.page_size):
                st.digest.update(zeros)
            hashes[name] = st.digest.hexdigest()
        return hashes, notes
