"""The live mapped-ram writer: dirty rounds, channel threads, one sync per round.

Like QEMU 10 with mapped-ram (+ multifd): the file is laid out up front (block list,
MappedRamHeaders, 1 MiB-aligned page regions), every round writes the pages dirtied
since the previous one at their fixed offsets through the channels, the channels sync
once at the end of each round (never per batch, and no flush word enters the stream),
and ``complete()`` writes the last round, the bitmaps, the END section, the device
state and the description. The file is written under a temporary name and renamed over
the destination only when complete and fsynced: a failed or interrupted save leaves
any previous file untouched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

import numpy as np

from ..formats.bitmap import LITTLE_ENDIAN_64, BitmapLayout
from ..formats.constants import (
    CAP_MAPPED_RAM,
    MAPPED_RAM_ALIGNMENT,
    QEVM_MAGIC,
    RAM_IDSTR,
    RamFlag,
    SectionType,
    VmCommand,
)
from ..formats.layout import BlockPlace, place_block
from ..formats.policy import POLICIES, Event, Mode, Sync
from .channels import Channels, pwrite_all
from .encoder import StreamEncoder, configuration_vmdesc

DEFAULT_MACHINE = "pc-i440fx-10.0"
DEFAULT_RAM_SECTION_ID = 2
BATCH_BYTES = 8 << 20  # the most one channel item writes: on Linux 6.x, 1 MiB pwrites cost about
# twice the kernel time of 8 MiB ones into the page cache (bench/bench_mapper.py)
_SCAN_PAGES = 8192  # pages digested, zero-checked and queued at a time (32 MiB of 4 KiB pages)

# Test hook, called as a batch is handed to the channels: (block, round, first page,
# page count, data) -> (the data the channel will write, seconds it waits first). It
# models a channel that took its bytes at dispatch but whose write lands late.
DelayHook = Callable[[str, int, int, int, memoryview], tuple[Any, float]]
_Batch = tuple["_Block", np.ndarray, Any, float]  # block, page numbers, their bytes (rows), delay
_GROUP_RUNS = 512  # short runs gathered into one channel item at most


@dataclass(frozen=True)
class DeviceState:
    """Non-RAM sections taken unchanged from an existing snapshot."""

    sections: bytes  # headers, payloads and footers, in stream order
    descriptions: list[dict[str, Any]]  # their entries of the VM description
    ram_section_id: int
    machine_type: str | None
    footers: bool

    @classmethod
    def from_snapshot(cls, snap: Any) -> "DeviceState":
        """Every section of ``snap`` that is not RAM, a command or EOF."""
        parts = []
        for sec in snap.sections:
            if sec.kind in ("command", "eof") or sec.idstr == RAM_IDSTR:
                continue
            parts.append(snap.read_bytes(sec.offset, sec.end - sec.offset))
        devices = (snap.vmdesc or {}).get("devices", [])
        ram = next(s for s in snap.sections if s.idstr == RAM_IDSTR)
        return cls(b"".join(parts), list(devices), ram.section_id, snap.machine_type, snap.section_footers)


@dataclass
class RoundStats:
    round: int
    pages_written: int
    pages_zeroed: int
    seconds: float


@dataclass
class _Block:
    name: str
    data: np.ndarray  # uint8 view of the caller's buffer, no copy
    place: BlockPlace
    pages: np.ndarray  # (num_pages, page_size) view
    saved: np.ndarray  # bool per page: the bit that goes into the file bitmap
    dirty: np.ndarray | None = None  # bool per page, for manual tracking
    digests: np.ndarray | None = None  # uint64 per page, for digest tracking
    lock: threading.Lock = field(default_factory=threading.Lock)


def _punch_hole_fn() -> Callable[[int, int, int], None] | None:
    """fallocate(PUNCH_HOLE | KEEP_SIZE), or None where the C library lacks it."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    fallocate = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if fallocate is None:
        return None
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

    def punch(fd: int, offset: int, length: int) -> None:
        if fallocate(fd, 0x02 | 0x01, offset, length) != 0:  # PUNCH_HOLE | KEEP_SIZE
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise OSError(err, os.strerror(err))

    return punch


_PUNCH = _punch_hole_fn()


class SnapshotWriter:
    """Save named buffers as a QEMU 10 mapped-ram snapshot, live, in dirty rounds.

    ``blocks``: name -> buffer (numpy array, mmap, bytearray...), each a multiple of
    ``page_size`` long; the writer reads them in place. ``dirty_tracking``: "digest"
    finds dirty pages by comparing per-page digests each round; "manual" trusts
    ``mark_dirty()`` calls, like KVM's dirty log. ``alignment``: where page regions
    start (QEMU: 1 MiB; its loader only needs page alignment). ``prefix``: bytes kept
    in front of the stream, e.g. a libvirt header; the offsets in the file stay absolute.
    ``fsync``: flush the file and its directory before and after the rename (off: like
    QEMU, which leaves flushing to the caller).
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
        dirty_tracking: Literal["digest", "manual"] = "digest",
        devices: DeviceState | None = None,
        switchover_start: bool = True,
        punch_holes: bool = True,
        batch_bytes: int = BATCH_BYTES,
        alignment: int = MAPPED_RAM_ALIGNMENT,
        fsync: bool = True,
    ) -> None:
        if page_size < 512 or page_size & (page_size - 1):
            raise ValueError(f"page size {page_size} is not a power of two >= 512")
        if alignment < page_size or alignment % page_size:
            raise ValueError(f"alignment {alignment} is not a multiple of the page size {page_size}")
        self.alignment = alignment
        self.fsync = fsync
        if dirty_tracking not in ("digest", "manual"):
            raise ValueError("dirty_tracking is 'digest' or 'manual'")
        self.path = os.fspath(path)
        self.page_size = page_size
        self.policy = POLICIES[Mode.MAPPED_RAM]
        self.layout = bitmap_layout
        self.devices = devices
        self.machine_type = machine_type or (devices.machine_type if devices else None) or DEFAULT_MACHINE
        self.switchover_start = switchover_start
        self.punch_holes = punch_holes and _PUNCH is not None
        self.batch_bytes = max(page_size, batch_bytes - batch_bytes % page_size)
        self.tracking = dirty_tracking
        self.rounds = 0
        self._encoder = StreamEncoder(page_size, footers=devices.footers if devices else True)
        self._ram_id = devices.ram_section_id if devices else DEFAULT_RAM_SECTION_ID
        self._sync_per_round = True  # private debug switch: the ordering stress test turns it off
        self._delay_hook: DelayHook | None = None  # private test hook, see tests/test_writer.py
        self._digest_key = np.random.default_rng().integers(1, 2**63, page_size // 8, dtype=np.uint64) | 1
        self._blocks = self._wrap_blocks(blocks, len(prefix))
        self._digest_pool = ThreadPoolExecutor(max(1, min(channels, os.cpu_count() or 1)), "digest")
        self._counts = [0, 0]  # pages written, pages found zero in this round
        self._counts_lock = threading.Lock()
        self._done = False
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, self._tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.", suffix=".partial", dir=directory)
        self._fd = fd
        self._channels: Channels[_Batch] | None = None
        try:
            self._stream_pos = self._write_head(prefix)
            depth = 2 * _SCAN_PAGES * page_size // self.batch_bytes  # two scan chunks in flight
            self._channels = Channels(self._tmp, channels, os.O_WRONLY, self._channel_write, "save", depth)
        except BaseException:
            self.abort()
            raise

    # -- setup --------------------------------------------------------------------
    def _wrap_blocks(self, blocks: Mapping[str, Any], start: int) -> dict[str, _Block]:
        if not blocks:
            raise ValueError("a snapshot needs at least one RAM block")
        out = {}
        for name, buf in blocks.items():
            data = np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)
            if len(data) % self.page_size:
                raise ValueError(f"block {name!r}: {len(data)} bytes is not a multiple of {self.page_size}")
            if len(name.encode()) > 255:
                raise ValueError(f"block name {name!r} is longer than 255 bytes")
            num_pages = len(data) // self.page_size
            out[name] = _Block(
                name,
                data,
                place=None,  # type: ignore[arg-type]  # placed in _write_head
                pages=data.reshape(num_pages, self.page_size),
                saved=np.zeros(num_pages, dtype=bool),
                dirty=np.ones(num_pages, dtype=bool) if self.tracking == "manual" else None,
            )
        return out

    def _write_head(self, prefix: bytes) -> int:
        """Prefix, QEVM header, configuration, RAM START with the block list, EOS."""
        enc = self._encoder
        caps = [CAP_MAPPED_RAM]
        # The magic goes in last (complete()): until then the file is no QEMU stream, so a
        # save killed half-way can never pass for a valid snapshot.
        head = bytes(len(QEVM_MAGIC)) + enc.header()[len(QEVM_MAGIC) :] + enc.configuration(self.machine_type, caps)
        self._magic_at = len(prefix)
        total = sum(len(b.data) for b in self._blocks.values())
        head += enc.ram_start(self._ram_id) + enc.ram_word(total, RamFlag.MEM_SIZE)
        pwrite_all(self._fd, memoryview(prefix + head), 0)
        pos = len(prefix) + len(head)
        for blk in self._blocks.values():
            blk.place = place_block(blk.name, len(blk.data), self.page_size, pos, self.layout, self.alignment)
            entry = enc.block_entry(blk.name, len(blk.data), blk.place)
            pwrite_all(self._fd, memoryview(entry), pos)
            pos = blk.place.resume_offset
        tail = enc.ram_word(0, RamFlag.EOS) + enc.footer(self._ram_id)
        pwrite_all(self._fd, memoryview(tail), pos)
        self._vmdesc_config = configuration_vmdesc(self.machine_type, caps)
        return pos + len(tail)

    # -- dirty tracking -------------------------------------------------------------
    def mark_dirty(self, block: str, pages: Any) -> None:
        """Tell the writer that ``pages`` (indices, a slice or a bool mask) of ``block`` changed."""
        blk = self._blocks[block]
        if blk.dirty is None:
            raise RuntimeError("mark_dirty() needs dirty_tracking='manual'")
        with blk.lock:
            blk.dirty[pages] = True

    def _take_manual_dirty(self, blk: _Block) -> np.ndarray:
        """The pages marked since the last round; the marks are reset BEFORE the pages are
        written, so a change racing with the write is marked again and saved next round."""
        assert blk.dirty is not None
        with blk.lock:
            dirty, blk.dirty = blk.dirty, np.zeros_like(blk.dirty)
        return dirty

    def _dirty_rows(
        self, blk: _Block, start: int, end: int, manual: np.ndarray | None, final: bool, digests: Any = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The dirty pages of [start, end): (page numbers, rows holding their bytes, row
        index of each page). Rows are the live buffer, or for digest tracking in a
        round that is not the last, a staged copy whose digest is the one remembered.

        Why the copy: with digests, a page written live could change during the write
        and change back afterwards; its digest would then match while the file holds
        the in-between bytes. Writing the exact bytes that were digested rules that out.
        With manual tracking (every change is marked, like KVM's dirty log) and in the
        last round (the caller has paused its writers), pages are written in place.
        """
        live = blk.pages[start:end]
        if manual is not None:
            pos = np.flatnonzero(manual[start:end])
            return pos + start, live, pos
        if blk.digests is None and final:
            pos = np.arange(end - start)  # a one-shot save: every page, no digests needed
            return pos + start, live, pos
        digests = digests.result() if digests is not None else np.dot(live.view(np.uint64), self._digest_key)
        if blk.digests is None:
            blk.digests = np.zeros(len(blk.pages), dtype=np.uint64)
            pos = np.arange(end - start)
        else:
            pos = np.flatnonzero(digests != blk.digests[start:end])
        if final:
            return pos + start, live, pos
        staged = live[pos]  # a copy of the dirty pages only
        blk.digests[start + pos] = np.dot(staged.view(np.uint64), self._digest_key)
        return pos + start, staged, np.arange(len(pos))

    # -- rounds ---------------------------------------------------------------------
    def save_round(self, *, _final: bool = False) -> RoundStats:
        """Write every page dirtied since the previous round (round 0: every page).

        The main thread finds the dirty pages a chunk at a time and hands runs of them to
        the channels; each channel drops the zero pages of its batch (clearing their bits,
        as multifd_send_zero_page_detect does), writes the rest and sets their bits."""
        self._check_open()
        began = time.perf_counter()
        assert self._channels is not None
        self._counts = [0, 0]
        for blk in self._blocks.values():
            manual = self._take_manual_dirty(blk) if blk.dirty is not None else None
            chunks = [(s, min(len(blk.pages), s + _SCAN_PAGES)) for s in range(0, len(blk.pages), _SCAN_PAGES)]
            # numpy's dot releases the GIL: digest the chunks ahead, on the other cores
            needed = manual is None and not (_final and blk.digests is None)
            ahead = (
                [self._digest_pool.submit(np.dot, blk.pages[s:e].view(np.uint64), self._digest_key) for s, e in chunks]
                if needed
                else [None] * len(chunks)
            )
            for (start, end), digests in zip(chunks, ahead):
                pages, rows, row_of = self._dirty_rows(blk, start, end, manual, _final, digests)
                self._queue_rows(blk, pages, rows, row_of)
        if self.policy.sync_at(Event.ROUND_END) is Sync.LOCAL and (self._sync_per_round or _final):
            self._channels.sync()  # the debug switch never skips the final round's sync
        if self.fsync and not _final:
            os.fdatasync(self._fd)  # flush while the caller still runs: complete() has less to wait for
        part = self._encoder.ram_eos_section(SectionType.SECTION_PART, self._ram_id)
        self._append(part)
        written, zeroed = self._counts
        stats = RoundStats(self.rounds, written, zeroed, time.perf_counter() - began)
        self.rounds += 1
        return stats

    def _queue_rows(self, blk: _Block, pages: np.ndarray, rows: np.ndarray, row_of: np.ndarray) -> None:
        """Hand the dirty pages to the channels: long runs as views of ``rows`` in pieces of
        ``batch_bytes``; short runs gathered (copied) into one item of up to ``batch_bytes``
        and GROUP_RUNS runs, so scattered pages do not cost a queue hand-off each."""
        per_batch = self.batch_bytes // self.page_size
        group: list[int] = []  # indices into pages/row_of
        runs = 0
        for a, b in _consecutive(pages, row_of):
            if b - a >= per_batch:
                for i in range(a, b, per_batch):
                    row = int(row_of[i])
                    count = min(per_batch, b - i)
                    self._submit(blk, pages[i : i + count], rows[row : row + count])
                continue
            group.extend(range(a, b))
            runs += 1
            if len(group) >= per_batch or runs >= _GROUP_RUNS:
                self._submit(blk, pages[group], rows[row_of[group]])
                group, runs = [], 0
        if group:
            self._submit(blk, pages[group], rows[row_of[group]])

    def _submit(self, blk: _Block, pages: np.ndarray, rows: np.ndarray) -> None:
        assert self._channels is not None
        data: Any = rows
        delay = 0.0
        if self._delay_hook is not None:
            data, delay = self._delay_hook(blk.name, self.rounds, int(pages[0]), len(pages), rows.reshape(-1).data)
        self._channels.submit((blk, pages, data, delay))

    def _channel_write(self, fd: int, item: _Batch) -> None:
        blk, pages, data, delay = item
        if delay:
            time.sleep(delay)
        ps = self.page_size
        rows = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8).reshape(-1, ps)
        zero = _zero_pages(rows)
        stale = zero & blk.saved[pages]  # items of one round never share a page
        blk.saved[pages] = ~zero
        if self.punch_holes and stale.any():
            self._punch(blk, pages[stale])
        keep = np.flatnonzero(~zero)
        for a, b in _consecutive(pages[keep], keep):
            lo, hi = int(keep[a]), int(keep[b - 1]) + 1
            pwrite_all(fd, rows[lo:hi].reshape(-1).data, blk.place.pages_offset + int(pages[lo]) * ps)
        with self._counts_lock:
            self._counts[0] += len(keep)
            self._counts[1] += len(rows) - len(keep)

    def _punch(self, blk: _Block, pages: np.ndarray) -> None:
        assert _PUNCH is not None
        for a, b in _consecutive(pages, pages):
            _PUNCH(self._fd, blk.place.pages_offset + int(pages[a]) * self.page_size, (b - a) * self.page_size)

    def _append(self, data: bytes) -> None:
        pwrite_all(self._fd, memoryview(data), self._stream_pos)
        self._stream_pos += len(data)

    @property
    def syncs(self) -> int:
        """Channel syncs so far: one per round."""
        return self._channels.syncs if self._channels else 0

    # -- completion -----------------------------------------------------------------
    def complete(self, on_copied: Callable[[], None] | None = None) -> RoundStats:
        """Final round (the caller has paused its writers), bitmaps, device state, EOF,
        description; fsync, then rename over the destination.

        ``on_copied`` is called as soon as the final round is out of the caller's buffers
        (the channels have synced): the caller may resume its writers there, and the rest
        (bitmaps, stream tail, fsync, rename) no longer counts as its downtime."""
        self._check_open()
        try:
            stats = self.save_round(_final=True)
            if on_copied is not None:
                on_copied()
            for blk in self._blocks.values():
                pwrite_all(self._fd, memoryview(self.layout.pack(blk.saved)), blk.place.bitmap_offset)
            enc = self._encoder
            tail = b""
            if self.switchover_start:
                tail += enc.command(VmCommand.SWITCHOVER_START)
            tail += enc.ram_eos_section(SectionType.SECTION_END, self._ram_id)
            tail += self.devices.sections if self.devices else b""
            tail += enc.eof(
                {
                    "configuration": self._vmdesc_config,
                    "page_size": self.page_size,
                    "devices": self.devices.descriptions if self.devices else [],
                }
            )
            self._append(tail)
            os.ftruncate(self._fd, self._stream_pos)
            if self.fsync:
                os.fsync(self._fd)  # everything but the magic is on disk before the magic is
            pwrite_all(self._fd, memoryview(QEVM_MAGIC), self._magic_at)
            if self.fsync:
                os.fdatasync(self._fd)
            self._close_files()
            os.replace(self._tmp, self.path)
            if self.fsync:
                _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
            self._done = True
        except BaseException:
            self.abort()
            raise
        return stats

    def abort(self) -> None:
        """Drop the partial file; the destination is left as it was."""
        self._close_files()
        if not self._done:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass
            self._done = True

    def _close_files(self) -> None:
        self._digest_pool.shutdown(wait=True, cancel_futures=True)
        if self._channels is not None:
            self._channels.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _check_open(self) -> None:
        if self._done or self._fd < 0:
            raise RuntimeError("this save is already complete or aborted")

    def __enter__(self) -> "SnapshotWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.abort()


def _zero_pages(rows: np.ndarray) -> np.ndarray:
    """Which pages (rows) are all zero. A page whose first or last word is non-zero is
    settled by that word alone (as QEMU's buffer_is_zero looks at the ends first), so a
    dense buffer costs two words a page instead of a full scan."""
    words = rows.view(np.uint64)
    nonzero = (words[:, 0] != 0) | (words[:, -1] != 0)
    unsure = np.flatnonzero(~nonzero)
    for a, b in _consecutive(unsure, unsure):
        lo, hi = int(unsure[a]), int(unsure[b - 1]) + 1
        nonzero[lo:hi] = words[lo:hi].any(axis=1)
    return ~nonzero


def _consecutive(pages: np.ndarray, rows: np.ndarray) -> list[tuple[int, int]]:
    """[a, b) index ranges over which both arrays step by exactly one."""
    if not len(pages):
        return []
    breaks = np.flatnonzero((np.diff(pages) != 1) | (np.diff(rows) != 1)) + 1
    edges = [0, *breaks.tolist(), len(pages)]
    return list(zip(edges[:-1], edges[1:]))


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
