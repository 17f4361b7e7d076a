"""The live mapped-ram writer: dirty rounds, channel threads, one sync per round.

Like QEMU 10 with mapped-ram (+ multifd): the file is laid out up front (block list,
MappedRamHeaders, 1 MiB-aligned page regions), every round writes the pages dirtied
since the previous one at their fixed offsets through the channels, the channels sync
once at the end of each round (never per batch, and no flush word enters the stream),
and ``complete()`` writes the last round, the bitmaps, the END section, the device
state and the description.

The writer is put together from parts, one guarantee each: the output file
(output.py: temporary name, magic last, fsync, rename; a failed or interrupted save
leaves any previous file untouched), dirty tracking (tracking.py), the page sink
(pagesink.py: batching, zero detection, bitmap bits, hole punching) and the order of
the stream's parts (encoder.StreamComposer).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from ..formats.bitmap import LITTLE_ENDIAN_64, BitmapLayout
from ..formats.constants import MAPPED_RAM_ALIGNMENT, QEVM_MAGIC
from ..formats.layout import MAX_PAGE_SIZE, MIN_PAGE_SIZE, BlockPlace, valid_page_size
from ..formats.policy import MODE_CAPABILITIES, POLICIES, Event, Mode, ModePolicy, Sync
from .channels import check_count, pwrite_all
from .encoder import DeviceState, StreamComposer
from .kernel_dirty import Unavailable
from .output import OutputFile, reraise_naming
from .pagesink import ChannelHook, PageSink, Slots
from .tracking import MODES, Tracker, TrackingMode, make_tracker

__all__ = ["DeviceState", "RoundStats", "SnapshotWriter"]

_log = logging.getLogger(__name__)
BATCH_BYTES = 8 << 20  # the most one channel item writes: on Linux 6.x, 1 MiB pwrites cost about
# twice the kernel time of 8 MiB ones into the page cache (bench/bench_mapper.py)
FINAL_HOLD_BYTES = 256 << 20  # complete(): the most of the final round's copies held back


@dataclass
class RoundStats:
    round: int
    pages_written: int
    pages_zeroed: int
    seconds: float


@dataclass
class _Block:
    data: np.ndarray  # uint8 view of the caller's buffer, no copy
    tracker: Tracker
    slots: Slots
    place: BlockPlace | None = None  # set when the head is written


class SnapshotWriter:
    """Save named buffers as a QEMU 10 mapped-ram snapshot, live, in dirty rounds.

    ``blocks``: name -> buffer (numpy array, mmap, bytearray...), each a multiple of
    ``page_size`` long; the writer reads them in place. ``dirty_tracking``: "kernel"
    has the kernel log the writes (Linux 6.7+, private anonymous memory such as numpy
    arrays; see mapper/kernel_dirty.py); "digest" compares per-page digests each round;
    "manual" trusts ``mark_dirty()`` calls, like KVM's dirty log; "auto" (the default)
    takes "kernel" for each block where it can, else "digest". ``tracking_mode`` says
    which each block got, ``tracking_note`` why "auto" fell back (also logged, INFO, to
    the ``mappedram.mapper.writer`` logger). ``alignment``: where page regions
    start (QEMU: 1 MiB; its loader only needs page alignment). ``prefix``: bytes kept
    in front of the stream, e.g. a libvirt header; the offsets in the file stay absolute.
    ``fsync``: flush the file and its directory before and after the rename (off: like
    QEMU, which leaves flushing to the caller). The file is made by mapper/output.py's
    rules: ``overwrite`` (default: a live save replaces the previous one atomically)
    allows replacing an existing file; ``source_fd``, the file the memory comes from
    (convert), may not be the output and bounds its mode (else 0600).

    For tests: ``policy`` is the mode's sync rule (one without the per-round sync shows
    why it is needed; the final round always syncs), ``channel_hook`` sees each channel
    item as it is handed over (see pagesink.ChannelHook).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        blocks: Mapping[str, Any],
        *,
        channels: int = 1,
        page_size: int = 4096,
        machine_type: str | None = None,
        prefix: bytes = b"",
        bitmap_layout: BitmapLayout = LITTLE_ENDIAN_64,
        dirty_tracking: TrackingMode = "auto",
        devices: DeviceState | None = None,
        switchover_start: bool = True,
        punch_holes: bool = True,
        batch_bytes: int = BATCH_BYTES,
        alignment: int = MAPPED_RAM_ALIGNMENT,
        fsync: bool = True,
        overwrite: bool = True,
        source_fd: int | None = None,
        policy: ModePolicy = POLICIES[Mode.MAPPED_RAM],
        channel_hook: ChannelHook | None = None,
    ) -> None:
        check_count(channels)
        if not valid_page_size(page_size):
            raise ValueError(f"page size {page_size} is not a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}")
        if alignment < page_size or alignment % page_size:
            raise ValueError(f"alignment {alignment} is not a multiple of the page size {page_size}")
        if dirty_tracking not in MODES:
            raise ValueError(f"dirty_tracking is one of {', '.join(map(repr, MODES))}, not {dirty_tracking!r}")
        if policy.mode is not Mode.MAPPED_RAM:
            raise ValueError(f"the writer writes mapped-ram, not {policy.mode.value}")
        self.path = os.fspath(path)
        self.page_size = page_size
        self.alignment = alignment
        self.fsync = fsync
        self.policy = policy
        self.layout = bitmap_layout
        self.switchover_start = switchover_start
        self.tracking = dirty_tracking
        self.tracking_mode: dict[str, str] = {}  # block -> "kernel", "digest" or "manual"
        self.tracking_note = ""  # why "auto" took digests for some block, one line
        self.rounds = 0
        self._composer = StreamComposer(
            page_size, capabilities=[MODE_CAPABILITIES[Mode.MAPPED_RAM]], machine=machine_type, devices=devices
        )
        self.machine_type = self._composer.machine
        self._digest_pool = ThreadPoolExecutor(max(1, min(channels, os.cpu_count() or 1)), "digest")
        self._blocks = self._wrap_blocks(blocks)
        self._done = False
        self._sink: PageSink | None = None
        self._out = OutputFile(self.path, overwrite=overwrite, source_fd=source_fd, sync=fsync)
        self._fd = self._out.fd
        try:
            self._stream_pos = self._write_head(prefix)
            self._sink = PageSink(
                self._out.temp_path,
                self._fd,
                page_size,
                channels=channels,
                batch_bytes=batch_bytes,
                punch_holes=punch_holes,
                channel_hook=channel_hook,
            )
        except BaseException as err:
            self.abort()
            reraise_naming(err, self.path)
            raise

    # -- setup --------------------------------------------------------------------
    def _wrap_blocks(self, blocks: Mapping[str, Any]) -> dict[str, _Block]:
        if not blocks:
            raise ValueError("a snapshot needs at least one RAM block")
        key = np.random.default_rng().integers(1, 2**63, self.page_size // 8, dtype=np.uint64) | 1
        out: dict[str, _Block] = {}
        fallbacks = []
        try:
            for name, buf in blocks.items():
                _check_name(name)
                data = np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)
                if len(data) % self.page_size:
                    raise ValueError(f"block {name!r}: {len(data)} bytes is not a multiple of {self.page_size}")
                pages = data.reshape(-1, self.page_size)
                try:
                    tracker, why = make_tracker(self.tracking, pages, key, self._digest_pool)
                except Unavailable as err:
                    raise Unavailable(f"block {name!r}: no kernel dirty tracking: {err}") from None
                out[name] = _Block(data, tracker, Slots(name, 0, np.zeros(len(pages), dtype=bool)))
                self.tracking_mode[name] = tracker.mode
                if why:
                    fallbacks.append(f"{name!r} ({why})")
            if not any(len(b.data) for b in out.values()):
                raise ValueError("a snapshot needs RAM: every block is empty")
        except BaseException:
            for blk in out.values():
                blk.tracker.close()
            raise
        if fallbacks:
            self.tracking_note = f"digest dirty tracking, not the kernel's, for {', '.join(fallbacks)}"
            _log.info("%s: %s", self.path, self.tracking_note)
        return out

    def _write_head(self, prefix: bytes) -> int:
        """Prefix, QEVM header, configuration, RAM START with the block list, EOS."""
        # The magic goes in last (complete()): until then the file is no QEMU stream, so a
        # save killed half-way can never pass for a valid snapshot.
        head = bytes(len(QEVM_MAGIC)) + self._composer.head()[len(QEVM_MAGIC) :]
        self._magic_at = len(prefix)
        pwrite_all(self._fd, memoryview(prefix + head), 0)
        blocks = [(name, len(b.data)) for name, b in self._blocks.items()]
        pieces, places, end = self._composer.ram_start(len(prefix) + len(head), blocks, self.layout, self.alignment)
        for offset, data in pieces:
            pwrite_all(self._fd, memoryview(data), offset)
        for blk, place in zip(self._blocks.values(), places):
            assert place is not None
            blk.place = place
            blk.slots.pages_offset = place.pages_offset
        return end

    # -- dirty tracking -------------------------------------------------------------
    def mark_dirty(self, block: str, pages: Any) -> None:
        """Tell the writer that ``pages`` (a page number, numbers, a slice or a bool mask)
        of ``block`` changed."""
        self._check_open()
        blk = self._blocks[block]
        blk.tracker.mark(_page_index(block, pages, len(blk.slots.saved)))

    # -- rounds ---------------------------------------------------------------------
    def save_round(self) -> RoundStats:
        """Write every page dirtied since the previous round (round 0: every page)."""
        self._check_open()
        return self._round(final=False)

    def _round(self, final: bool, on_copied: Callable[[], None] | None = None) -> RoundStats:
        began = time.perf_counter()
        sink = self._sink
        assert sink is not None
        sink.round = self.rounds
        sink.reset_counts()
        # A final round after earlier ones comes as copies (Tracker.round): hold them back
        # from the channels, whose queue is bounded, until the caller has been told.
        copies = final and self.rounds > 0
        held: list[tuple[Slots, np.ndarray, np.ndarray, np.ndarray]] = []
        held_bytes = 0
        for blk in self._blocks.values():
            for pages, rows, row_of in blk.tracker.round(final):
                if copies and held_bytes < FINAL_HOLD_BYTES:
                    held.append((blk.slots, pages, rows, row_of))
                    held_bytes += rows.nbytes
                else:
                    sink.put(blk.slots, pages, rows, row_of)
        if copies and on_copied is not None:
            on_copied()
        for item in held:
            sink.put(*item)
        if final or self.policy.sync_at(Event.ROUND_END) is Sync.LOCAL:
            sink.sync()  # the final round always: the bitmaps and the magic come after its pages
        if not copies and on_copied is not None:
            on_copied()
        if self.fsync and not final:
            os.fdatasync(self._fd)  # flush while the caller still runs: complete() has less to wait for
        self._append(self._composer.round_end())
        stats = RoundStats(self.rounds, sink.written, sink.zeroed, time.perf_counter() - began)
        self.rounds += 1
        return stats

    def _append(self, data: bytes) -> None:
        pwrite_all(self._fd, memoryview(data), self._stream_pos)
        self._stream_pos += len(data)

    @property
    def syncs(self) -> int:
        """Channel syncs so far: one per round."""
        return self._sink.syncs if self._sink else 0

    # -- completion -----------------------------------------------------------------
    def complete(self, on_copied: Callable[[], None] | None = None) -> RoundStats:
        """Final round (the caller has paused its writers), bitmaps, device state, EOF,
        description; fsync, then rename over the destination.

        ``on_copied`` is called as soon as the final round is out of the caller's buffers:
        after earlier rounds, once its pages are copied (up to FINAL_HOLD_BYTES of them are
        held back from the channels until then); in a one-shot save, once the channels
        have written them. The caller may resume its writers there; the rest (the writes,
        bitmaps, stream tail, fsync, rename) no longer counts as its downtime."""
        self._check_open()
        try:
            stats = self._round(final=True, on_copied=on_copied)
            for blk in self._blocks.values():
                assert blk.place is not None
                pwrite_all(self._fd, memoryview(self.layout.pack(blk.slots.saved)), blk.place.bitmap_offset)
            self._append(self._composer.tail(self.switchover_start))
            os.ftruncate(self._fd, self._stream_pos)
            self._close_workers()
            # everything but the magic is on disk before the magic is
            self._out.commit(last=(self._magic_at, QEVM_MAGIC))
            self._fd = -1
            self._done = True
        except BaseException as err:
            self.abort()
            reraise_naming(err, self.path)
            raise
        return stats

    def abort(self) -> None:
        """Drop the partial file; the destination is left as it was."""
        self._close_workers()
        self._out.abort()
        self._fd = -1
        self._done = True

    def _close_workers(self) -> None:
        self._digest_pool.shutdown(wait=True, cancel_futures=True)
        for blk in self._blocks.values():
            blk.tracker.close()
        if self._sink is not None:
            self._sink.close()

    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError("this save is already complete or aborted")

    def __enter__(self) -> "SnapshotWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.abort()


def _check_name(name: str) -> None:
    """A name QEMU's loader finds: 1 to 255 bytes, no NUL (QEMU's idstr ends at a NUL, so
    two names equal up to one would be the same block)."""
    if not isinstance(name, str):
        raise TypeError(f"a block name is a str, not {type(name).__name__}")
    raw = name.encode()
    if b"\0" in raw:
        raise ValueError(f"block name {name!r} holds a NUL byte")
    if not 1 <= len(raw) <= 255:
        raise ValueError(f"block name {name!r} is {len(raw)} bytes long, not 1 to 255")


def _page_index(block: str, pages: Any, count: int) -> Any:
    """``pages`` (a page number, numbers, a slice or a bool mask of ``count``) checked to
    name pages in [0, count): no negative numbers counting from the end, no clipping."""
    if isinstance(pages, slice):
        bounds = [v for v in (pages.start, pages.stop) if v is not None]
        if any(not 0 <= v <= count for v in bounds) or (pages.step is not None and pages.step < 1):
            raise ValueError(f"block {block!r}: page slice {pages} is not within 0 to {count}")
        return pages
    index = np.asarray(pages)
    if index.dtype == bool:
        if index.shape != (count,):
            raise ValueError(f"block {block!r}: a page mask has {count} entries, not {index.shape}")
        return index
    if index.size and not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"block {block!r}: page numbers are integers, not {index.dtype}")
    if index.size and (index.min() < 0 or index.max() >= count):
        bad = index[(index < 0) | (index >= count)].flat[0]
        raise ValueError(f"block {block!r} has pages 0 to {count - 1}, not {bad}")
    return index
