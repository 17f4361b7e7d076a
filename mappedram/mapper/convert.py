"""Conversion between a classic stream and a mapped-ram file, device state unchanged.

Both directions stream: the pages go from the source to the output in bounded pieces
(a random-access source: its extents, copied kernel-side where the filesystem allows;
a classic stream or a compressed libvirt image: its one forward pass, each page handed
to its slot as its record passes), so memory follows neither the guest nor its
populated pages. The mapped-ram output is laid out up front by the composer and
formats/layout.py's ``place_block`` (as the writer does), its slots written by channel
threads as QEMU's multifd channels write them (``channels``; the main thread parses the
source), its bitmaps written from each block's pages in chunks at the end. A stream
output is written in order by the main thread (reading its pages ahead in channels
measured slower here). The device sections, the machine type and the section ids are
carried over byte for byte, so QEMU restores the output as it would the input.

A libvirt header in the input is kept (domain XML, cookie, was_running and the data
area's length as they are) with the format the output has: sparse for mapped-ram, raw
for a stream, or the compressor's for ``compress`` (libvirt compresses only classic
streams). Without one in the input, the output has none. Files are made by
mapper/output.py's rules, the QEVM magic last.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import FormatError
from ..formats import structs as S
from ..formats.bitmap import LITTLE_ENDIAN_64, BitmapLayout
from ..formats.constants import MAPPED_RAM_ALIGNMENT, QEVM_MAGIC, RamFlag
from ..formats.layout import BlockPlace
from ..formats.policy import COMPRESSED_FORMATS, MODE_CAPABILITIES, Mode
from .blocks import RamBlock, check_claim, read_exact
from .channels import Channels, check_count, pwrite_all
from .copy_plan import copy_range
from .encoder import DeviceState, StreamComposer
from .forward import IOV_MAX, FileWriter, ForwardSnapshot
from .images import open_image
from .output import OutputFile, Writeback, output_file, reraise_naming
from .snapshot import Snapshot

Progress = Callable[[int, int], None]
PIECE_BYTES = 1 << 20  # the most read at a time when streaming a block's pages (cache-sized)
COPY_RANGE_BYTES = 1 << 20  # extents at least this long are copied kernel-side
COPY_PIECE_BYTES = 4 << 20  # a long extent goes to the channels in pieces of this
ITEM_BYTES = 1 << 20  # page data of one channel item at most (FileWriter's batch: the cursor's window)
IN_FLIGHT_BYTES = 16 << 20  # page data queued or being written by the channels at most
DEFAULT_CHANNELS = 1  # the main thread writes: fastest on the 2-core test machine (bench_convert)
MAPPED_RAM_CAP = MODE_CAPABILITIES[Mode.MAPPED_RAM]  # the capability a mapped-ram output announces


def _check_page_sizes(src: Snapshot) -> None:
    """Both outputs have one page size for every block (QEMU's target page size)."""
    for block in src:
        if block.page_size != src.page_size:
            raise FormatError(
                block.entry_offset,
                f"block {block.name!r} to have the stream's page size {src.page_size}",
                str(block.page_size),
            )


def libvirt_prefix(src: Snapshot, fmt: str) -> bytes:
    """The input's libvirt header and data area, the header's format set to ``fmt``;
    empty without a libvirt header."""
    if src.libvirt is None:
        return b""
    schema = S.LibvirtHeaderLE if src.libvirt.byteorder == "little" else S.LibvirtHeaderBE
    raw = os.pread(src.fd, src.stream_start, 0)
    if len(raw) != src.stream_start:
        raise FormatError(len(raw), "the libvirt data area (the file was shorter when opened)", "its end")
    header = schema.parse(raw)
    header.format = fmt
    return schema.build(header) + raw[S.LIBVIRT_HEADER_SIZE :]


def _provisional_devices(src: Snapshot) -> DeviceState:
    """What the head and the block list need of the device state, known before the pages:
    machine type, RAM section id, footers (the sections themselves come at the end)."""
    ram_id = src._walker.ram_section_id
    return DeviceState(b"", [], ram_id if ram_id is not None else 0, src.machine_type, bool(src._walker.footers))


class _MappedRamOutput:
    """A mapped-ram file written page by page: head and block list first (QEVM magic
    zeroed), pages into their slots, then bitmaps, the tail, and the magic last."""

    def __init__(
        self, src: Snapshot, out_path: str | os.PathLike[str], prefix: bytes, overwrite: bool, layout: BitmapLayout
    ) -> None:
        self.src, self.layout = src, layout
        self.out = OutputFile(out_path, overwrite=overwrite, source_fd=src.fd)
        self.fd = self.out.fd
        try:
            comp = StreamComposer(src.page_size, capabilities=[MAPPED_RAM_CAP], devices=_provisional_devices(src))
            head = comp.head()
            self.magic_at = len(prefix)
            pwrite_all(self.fd, memoryview(prefix + bytes(len(QEVM_MAGIC)) + head[len(QEVM_MAGIC) :]), 0)
            blocks = [(b.name, b.used_length) for b in src]
            pieces, places, self.pos = comp.ram_start(len(prefix) + len(head), blocks, layout, MAPPED_RAM_ALIGNMENT)
            for offset, data in pieces:
                pwrite_all(self.fd, memoryview(data), offset)
            self.places: dict[str, BlockPlace] = {}
            for block, place in zip(src, places):
                assert place is not None
                self.places[block.name] = place
            self.round_end = comp.round_end()
        except BaseException as err:
            self.out.abort()
            reraise_naming(err, self.out.path)
            raise

    def finish(self) -> None:
        """Bitmaps from each block's pages, the stream's tail, the magic last."""
        for block in self.src:
            place = self.places[block.name]
            for first, present in block.present_chunks():  # first: a multiple of 8 words' bits
                lsb = np.packbits(present, bitorder="little")
                whole = -(-len(lsb) // self.layout.word_bytes) * self.layout.word_bytes
                lsb = np.concatenate([lsb, np.zeros(whole - len(lsb), dtype=np.uint8)])
                pwrite_all(self.fd, memoryview(self.layout.from_lsb(lsb).tobytes()), place.bitmap_offset + first // 8)
        comp = StreamComposer(
            self.src.page_size, capabilities=[MAPPED_RAM_CAP], devices=DeviceState.from_snapshot(self.src)
        )
        tail = self.round_end + comp.tail()
        pwrite_all(self.fd, memoryview(tail), self.pos)
        os.ftruncate(self.fd, self.pos + len(tail))
        self.out.commit(last=(self.magic_at, QEVM_MAGIC))


_Item = tuple[int, int, Callable[..., None], tuple[Any, ...]]  # output offset, bytes, the work, its arguments
# (output offset, bytes): called in the channel thread before each write; tests use it to
# delay a write or make it fail.
ChannelHook = Callable[[int, int], None]


class _SlotWriter:
    """The writes into a mapped-ram output's page slots, done by ``count`` channel threads
    (mapper/channels.py: one shared queue, each channel its own descriptor on the output),
    as QEMU's multifd channels fill a mapped-ram file; the main thread parses the source
    and hands the writes over. Writes between two syncs land in any order, so a write that
    could overlap one still in flight (it starts below the highest byte handed over since
    the last sync) waits for a sync first: a paused save's pages come in increasing order
    and never wait, a stream that sends pages again (a live save's next round) syncs once
    per pass back, as QEMU syncs its channels once per round.

    One channel is the main thread writing through ``fd`` as it goes (QEMU without
    multifd): a hand-off to one thread only costs CPU (bench/bench_convert.py).

    Memory: at most ``depth`` items wait and ``count`` are being written, each of at most
    ``item_bytes`` (IN_FLIGHT_BYTES shared out; a forward source's items are views of the
    cursor's windows, kept alive only while queued)."""

    def __init__(
        self, path: str, fd: int, count: int, writeback: Writeback, page_size: int, hook: ChannelHook | None = None
    ) -> None:
        check_count(count)
        depth = max(2, count)
        share = IN_FLIGHT_BYTES // (depth + count + 1)
        self.item_bytes = max(page_size, min(ITEM_BYTES, share) // page_size * page_size)
        self.writeback = writeback
        self._hook = hook
        self._high = 0  # end of the highest write handed over since the last sync
        self._fd = fd
        self.pool: Channels[_Item] | None = None
        if count > 1:
            self.pool = Channels(path, count, os.O_WRONLY, self._write, "convert", depth)

    def submit(self, at: int, nbytes: int, work: Callable[..., None], *args: Any) -> None:
        """Have a channel run ``work(its fd, *args)``, which writes ``nbytes`` of the output
        from ``at`` (and nothing outside them)."""
        if self.pool is None:
            self._write(self._fd, (at, nbytes, work, args))
        else:
            if at < self._high:
                self.pool.sync()
                self._high = 0
            self._high = max(self._high, at + nbytes)
            self.pool.submit((at, nbytes, work, args))
        self.writeback.wrote(nbytes)

    def _write(self, fd: int, item: _Item) -> None:
        at, nbytes, work, args = item
        if self._hook is not None:
            self._hook(at, nbytes)
        work(fd, *args)

    def put(self, at: int, parts: list[Any]) -> None:
        """FileWriter's ``put``: ``parts`` written one after the other from ``at``."""
        self.submit(at, sum(memoryview(p).nbytes for p in parts), _put_parts, at, parts)

    def finish(self) -> None:
        """Wait for every write (a channel's error is raised here)."""
        if self.pool is not None:
            self.pool.sync()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def _put_parts(fd: int, at: int, parts: list[Any]) -> None:
    pwrite_all(fd, FileWriter.gather(parts), at)


def _copy_pieces(fd: int, src_fd: int, src_at: int, dst_at: int, length: int) -> None:
    copy_range(src_fd, fd, src_at, dst_at, length)


def _read_and_place(fd: int, src_fd: int, lo: int, length: int, runs: list[tuple[int, int, int]], name: str) -> None:
    """Read ``length`` bytes of source from ``lo`` and write each run (offset in them,
    bytes, output offset) at its slots."""
    buf = memoryview(bytearray(length))
    read_exact(src_fd, buf, lo, f"pages of {name!r}")
    for start, nbytes, at in runs:
        pwrite_all(fd, buf[start : start + nbytes], at)


def _copy_block(block: RamBlock, place: BlockPlace, slots: _SlotWriter) -> Iterator[int]:
    """Hand the copy of ``block``'s stored pages into their slots to the channels; yields
    the bytes of each item. Long extents (a mapped-ram source) are copied kernel-side in
    COPY_PIECE_BYTES pieces; short ones (scattered pages) are read ``item_bytes`` of
    source at a time, each run of consecutive slots written with one pwrite."""
    ps, span = block.page_size, slots.item_bytes
    for firsts, counts, offsets in block.extent_arrays():
        ends = offsets + counts * ps
        long = counts * ps >= COPY_RANGE_BYTES
        i, n = 0, len(firsts)
        while i < n:
            if long[i]:
                src_at, dst_at = int(offsets[i]), place.page_offset(int(firsts[i]))
                length = int(counts[i]) * ps
                for k in range(0, length, COPY_PIECE_BYTES):
                    piece = min(COPY_PIECE_BYTES, length - k)
                    slots.submit(dst_at + k, piece, _copy_pieces, block.fd, src_at + k, dst_at + k, piece)
                    yield piece
                i += 1
                continue
            lo = int(offsets[i])
            j = max(i + 1, int(np.searchsorted(ends, lo + span, side="right")))
            stop = np.flatnonzero(long[i:j])  # a long extent ends the piece
            j = i + int(stop[0]) if len(stop) else j
            runs: list[tuple[int, int, int]] = []  # (offset in the piece, bytes, output offset)
            next_page = -1
            for first, count, offset in zip(firsts[i:j].tolist(), counts[i:j].tolist(), offsets[i:j].tolist()):
                if runs and first == next_page and runs[-1][0] + runs[-1][1] == offset - lo:
                    start, nbytes, at = runs[-1]
                    runs[-1] = (start, nbytes + count * ps, at)  # slots and source both go on
                else:
                    runs.append((offset - lo, count * ps, place.page_offset(first)))
                next_page = first + count
            length = int(ends[j - 1]) - lo
            first_at = min(at for _, _, at in runs)
            last_end = max(at + nbytes for _, nbytes, at in runs)
            slots.submit(first_at, last_end - first_at, _read_and_place, block.fd, lo, length, runs, block.name)
            yield int(counts[i:j].sum()) * ps
            i = j


def to_mapped_ram(
    src: Snapshot,
    out_path: str | os.PathLike[str],
    *,
    overwrite: bool = True,
    progress: Progress | None = None,
    layout: BitmapLayout = LITTLE_ENDIAN_64,
    channels: int = DEFAULT_CHANNELS,
    channel_hook: ChannelHook | None = None,
) -> None:
    """Rewrite ``src`` (either kind) as a QEMU 10 mapped-ram file, streaming its pages
    into their slots, through ``channels`` writer threads past one (see _SlotWriter). A libvirt
    input gives a sparse libvirt image."""
    check_count(channels)
    _check_page_sizes(src)
    for block in src:  # the output reserves every block's RAM, for a QEMU to restore
        try:
            check_claim(block.name, block.used_length)
        except MemoryError as err:
            raise OSError(errno.ENOMEM, f"{err}; not converted", src.path) from None
    out = _MappedRamOutput(src, out_path, libvirt_prefix(src, "sparse"), overwrite, layout)
    try:
        slots = _SlotWriter(out.out.temp_path, out.fd, channels, Writeback(out.fd), src.page_size, channel_hook)
        try:
            if isinstance(src, ForwardSnapshot):
                bases = {name: place.pages_offset for name, place in out.places.items()}
                writer = FileWriter(out.fd, bases, put=slots.put, batch=slots.item_bytes // src.page_size)
                src.consume(writer, progress)
                writer.flush()
            else:
                total = sum(b.populated for b in src) * src.page_size
                done = 0
                if progress:
                    progress(done, total)
                for block in src:
                    for handed in _copy_block(block, out.places[block.name], slots):
                        done += handed
                        if progress:
                            progress(done, total)
            slots.finish()
        finally:
            slots.close()
        out.finish()
    except BaseException as err:
        out.out.abort()
        reraise_naming(err, out.out.path)
        raise


# A CONTINUE PAGE record is its RAM word and the data (RamPageRecordHead without the
# name): built here without the schema, per page in a forward pass and per 8 MiB of pages
# as arrays, where the composer's schema costs some 20 us a record.
_CONTINUE_PAGE = int(RamFlag.CONTINUE | RamFlag.PAGE)
_WORD = struct.Struct(">Q")


class _RecordWriter:
    """A forward pass's pages as PAGE records (ZERO for a page whose data a later record
    cleared), CONTINUE while the block stays the same."""

    def __init__(self, out: Any, comp: StreamComposer) -> None:
        self.out, self.comp = out, comp
        self.last: str | None = None

    def page(self, block: RamBlock, page: int, data: memoryview) -> None:
        if block.name == self.last:
            self.out.write(_WORD.pack(page * block.page_size | _CONTINUE_PAGE))
            self.out.write(data)
        else:
            self.out.write(self.comp.page_record(block.name, page, data))
            self.last = block.name

    def zero(self, block: RamBlock, page: int) -> None:
        self.out.write(self.comp.page_record(None if block.name == self.last else block.name, page, None))
        self.last = block.name

    def run(self, block: RamBlock, pages: np.ndarray, rows: np.ndarray) -> None:
        if block.name != self.last:
            self.page(block, int(pages[0]), memoryview(rows[0]))
            pages, rows = pages[1:], rows[1:]
        records = np.empty((len(pages), 8 + block.page_size), dtype=np.uint8)
        words = pages.astype(np.uint64) * np.uint64(block.page_size) | np.uint64(_CONTINUE_PAGE)
        records[:, :8] = words.astype(">u8").view(np.uint8).reshape(-1, 8)
        records[:, 8:] = rows
        self.out.write(records.data)


def _stored_records(block: RamBlock) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """The pages the file holds for ``block``, PIECE_BYTES at a time, read straight into
    CONTINUE PAGE records: (bytes of page data read, records (n, 8 + page size) with
    their words set, which of them hold a non-zero page)."""
    ps = block.page_size
    per = max(1, PIECE_BYTES // ps)
    for ext in block.extents():
        for k in range(0, ext.count, per):
            count = min(per, ext.count - k)
            records = np.empty((count, 8 + ps), dtype=np.uint8)
            pages = np.arange(ext.first_page + k, ext.first_page + k + count, dtype=np.uint64)
            words = pages * np.uint64(ps) | np.uint64(_CONTINUE_PAGE)
            records[:, :8] = words.astype(">u8").view(np.uint8).reshape(-1, 8)
            offset = ext.file_offset + k * ps
            for at in range(0, count, IOV_MAX):
                views = [memoryview(row) for row in records[at : at + IOV_MAX, 8:]]
                want = len(views) * ps
                if os.preadv(block.fd, views, offset + at * ps) != want:  # a regular file reads whole
                    raise FormatError(
                        offset + at * ps, f"{want} bytes of {block.name!r}'s pages", "the end of the file"
                    )
            yield count * ps, records, records[:, 8:].view(np.uint64).any(axis=1)


def _write_stream(src: Snapshot, out: Any, progress: Progress | None) -> None:
    devices = _provisional_devices(src)
    capabilities = [c for c in src.capabilities if c not in MODE_CAPABILITIES.values()]  # a classic stream
    comp = StreamComposer(src.page_size, capabilities=capabilities, devices=devices)
    head = comp.head()
    pieces, _, _ = comp.ram_start(len(head), [(b.name, b.used_length) for b in src])
    out.write(head + b"".join(data for _, data in pieces))
    out.write(comp.part_start())
    if isinstance(src, ForwardSnapshot):
        src.consume(_RecordWriter(out, comp), progress)
    else:
        total = sum(b.populated for b in src) * src.page_size
        done = 0
        for block in src:
            named = False  # the block's first record carries its name, the others CONTINUE
            for nbytes, records, nonzero in _stored_records(block):
                if not nonzero.all():
                    records = records[nonzero]
                if len(records) and not named:
                    page = int(records[0, :8].view(">u8")[0]) // block.page_size
                    out.write(comp.page_record(block.name, page, records[0, 8:].data))
                    records, named = records[1:], True
                out.write(records.data)
                done += nbytes
                if progress:
                    progress(done, total)
    out.write(comp.section_end())
    tail = StreamComposer(src.page_size, capabilities=capabilities, devices=DeviceState.from_snapshot(src))
    out.write(tail.tail())


def to_stream(
    src: Snapshot,
    out_path: str | os.PathLike[str],
    *,
    overwrite: bool = True,
    progress: Progress | None = None,
    compress: str | None = None,
) -> None:
    """Rewrite ``src`` (either kind) as a classic stream: one PART section holding a PAGE
    record for every populated, non-zero page (the loader starts from zeroed RAM). Pages
    are streamed in bounded pieces, whatever RAM size the source claims. ``compress``
    (gzip, bzip2, xz, lzop, zstd): a libvirt image compressed as libvirt writes it."""
    _check_page_sizes(src)
    if compress is not None and compress not in COMPRESSED_FORMATS:
        raise ValueError(f"compress with one of {', '.join(COMPRESSED_FORMATS)}, not {compress!r}")
    if compress is not None and src.libvirt is None:
        raise ValueError(f"--compress {compress} makes a libvirt image: the input has no libvirt header to keep")
    prefix = libvirt_prefix(src, compress or "raw")
    with output_file(out_path, overwrite=overwrite, source_fd=src.fd) as fd:
        pwrite_all(fd, memoryview(prefix), 0)
        if compress is not None:
            from .compression import compressing  # noqa: PLC0415 - the compressors load only when used

            with compressing(fd, len(prefix), compress) as out:
                _write_stream(src, out, progress)
        else:
            os.lseek(fd, len(prefix), os.SEEK_SET)
            with os.fdopen(os.dup(fd), "wb", buffering=1 << 20) as out:
                _write_stream(src, _Counted(out, Writeback(fd)), progress)


class _Counted:
    """A file's ``write`` that tells a Writeback what went through it."""

    def __init__(self, out: Any, writeback: Writeback) -> None:
        self.out, self.writeback = out, writeback

    def write(self, data: Any) -> None:
        self.out.write(data)
        self.writeback.wrote(memoryview(data).nbytes)


def check_target(to: str, compress: str | None) -> Mode:
    """The output's mode; ValueError for a layout convert does not write, or compression
    of anything but a classic stream (libvirt compresses only those)."""
    try:
        mode = Mode(to)
    except ValueError:
        raise ValueError(f"convert to {' or '.join(repr(m.value) for m in Mode)}, not {to!r}") from None
    if compress is not None and mode is not Mode.STREAM:
        raise ValueError("--compress goes with --to stream (libvirt compresses only classic streams)")
    return mode


def _open_source(path: str | os.PathLike[str], mode: Mode, progress: Progress | None, open_args: Any) -> Snapshot:
    """The input; a classic stream going to mapped-ram opened for one forward pass, so that
    its pages go into their slots as the records pass (no page index in memory)."""
    src = open_image(path, progress=progress, **open_args)
    if mode is not Mode.MAPPED_RAM or isinstance(src, ForwardSnapshot) or not src.policy.pages_in_stream:
        return src
    src.close()
    args = {k: open_args.get(k) for k in ("offset", "page_size")}
    return ForwardSnapshot(path, progress=progress, **args)


def convert(
    src_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    to: str,
    *,
    channels: int = DEFAULT_CHANNELS,
    overwrite: bool = True,
    progress: Progress | None = None,
    compress: str | None = None,
    **open_args: Any,
) -> None:
    """``to`` is "mapped-ram" or "stream"; ``compress`` only with "stream" (see to_stream).
    The output is made by mapper/output.py's rules (``overwrite``: replace an existing
    file). ``channels`` (1 to 255, checked for either output; 1: the main thread): the threads that write a
    mapped-ram output's slots (see _SlotWriter); a stream output is one sequence of
    writes and does not use them."""
    mode = check_target(to, compress)
    check_count(channels)
    with _open_source(src_path, mode, progress, open_args) as src:
        if mode is Mode.MAPPED_RAM:
            to_mapped_ram(src, out_path, overwrite=overwrite, progress=progress, channels=channels)
        else:
            to_stream(src, out_path, overwrite=overwrite, progress=progress, compress=compress)
