"""Kernel dirty tracking (userfaultfd async write-protect + PAGEMAP_SCAN): every write is
caught, a round's data is consistent, the fallback is taken and said, nothing lingers.

Without the kernel features (Linux < 6.7, userfaultfd refused) these tests skip, saying
why; under CI (CI=true) they must run: CI's machines are of this kind, which has them."""

from __future__ import annotations

import gc
import logging
import mmap
import os
import threading

import numpy as np
import pytest
from craft import PAGE, pattern_block

import mappedram
from mappedram.mapper import kernel_dirty
from mappedram.mapper.kernel_dirty import OS_PAGE
from mappedram.mapper.writer import SnapshotWriter


@pytest.fixture(autouse=True)
def _kernel_support():
    why = kernel_dirty.why_unavailable()
    if why and os.environ.get("CI"):
        pytest.fail(f"CI's machines have kernel dirty tracking, this one not: {why}")
    if why:
        pytest.skip(f"no kernel dirty tracking here: {why}")


def _file_pages(path) -> np.ndarray:
    return mappedram.restore(path)["ram"]


def _uffd_state(data) -> tuple[bool, int]:
    """(some mapping under ``data`` is userfaultfd-WP-registered (VmFlags uw), how many of
    its OS pages carry the uffd-wp bit (pagemap bit 57))."""
    addr = np.frombuffer(data, dtype=np.uint8).ctypes.data
    start, end = addr // OS_PAGE * OS_PAGE, -(-(addr + len(data)) // OS_PAGE) * OS_PAGE
    registered = False
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo < end and hi > start
            elif inside and line.startswith("VmFlags:"):
                registered |= "uw" in line.split()[1:]
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(start // OS_PAGE * 8)
        entries = np.frombuffer(f.read((end - start) // OS_PAGE * 8), dtype=np.uint64)
    return registered, int(((entries >> np.uint64(57)) & np.uint64(1)).sum())


def test_auto_takes_the_kernel_and_says_so(tmp_path, caplog):
    data = pattern_block(256)
    with caplog.at_level(logging.INFO, logger="mappedram"):
        with SnapshotWriter(tmp_path / "vm.sav", {"ram": data}) as writer:
            assert writer.tracking == "auto"
            assert writer.tracking_mode == {"ram": "kernel"}
            assert writer.tracking_note == ""
            assert _uffd_state(data)[0]  # really registered with the kernel
            writer.complete()
    assert not caplog.records  # nothing to say when every block got the kernel's tracking


def test_writes_from_other_threads_during_rounds(tmp_path):
    """A thread keeps writing while the rounds run, while the channels copy; some of its
    writes hit pages of the round being written. The file equals the buffer at complete()."""
    data = pattern_block(2048, zero=tuple(range(500, 900)))
    pages = data.reshape(-1, PAGE)
    stop = threading.Event()
    counts = []

    def work():
        rng = np.random.default_rng(7)
        while not stop.is_set():
            for page in rng.integers(0, len(pages), 32):
                pages[page, rng.integers(0, PAGE, 4)] = rng.integers(0, 256, 4, dtype=np.uint8)

    with SnapshotWriter(tmp_path / "vm.sav", {"ram": data}, channels=3, fsync=False) as writer:
        assert writer.tracking_mode == {"ram": "kernel"}
        worker = threading.Thread(target=work)
        worker.start()
        try:
            counts = [writer.save_round().pages_written for _ in range(10)]
        finally:
            stop.set()
            worker.join()
        writer.complete()
    assert sum(counts[1:]) > 0
    assert np.array_equal(_file_pages(tmp_path / "vm.sav"), data)


def test_exact_pages_of_untouched_memory_views_and_readv(tmp_path):
    """Each kind of write dirties exactly the pages it touched: memory never touched
    before (UFFD_FEATURE_WP_UNPOPULATED), numpy views, slices and dtype views, and a
    kernel write into the buffer (readv from a pipe)."""
    data = np.zeros(4096 * PAGE, dtype=np.uint8)  # calloc'ed: never touched, no page behind it
    pages = data.reshape(-1, PAGE)
    with SnapshotWriter(tmp_path / "vm.sav", {"ram": data}, fsync=False) as writer:
        assert writer.tracking_mode == {"ram": "kernel"}
        assert writer.save_round().pages_written == 0

        def round_(expect: set[int]) -> None:
            stats = writer.save_round()
            assert stats.pages_written + stats.pages_zeroed == len(expect), sorted(expect)

        pages[[3, 3000, 4095], 17] = 1  # untouched pages, first write ever
        round_({3, 3000, 4095})
        pages[100:200:10, 5:9] = 2  # a strided slice
        round_(set(range(100, 200, 10)))
        data.view(np.uint32)[(50 * PAGE + PAGE - 4) // 4] = 0xFFFFFFFF  # last word of page 50
        round_({50})
        data[1234 * PAGE - 1 : 1234 * PAGE + 1] = 7  # one write across a page boundary
        round_({1233, 1234})
        read_end, write_end = os.pipe()
        try:
            os.write(write_end, b"\x99" * (2 * PAGE + 10))
            os.readv(read_end, [memoryview(data)[777 * PAGE + 5 : 779 * PAGE + 15]])  # the kernel writes
        finally:
            os.close(read_end)
            os.close(write_end)
        round_({777, 778, 779})
        round_(set())
        writer.complete()
    assert np.array_equal(_file_pages(tmp_path / "vm.sav"), data)


def test_more_written_ranges_than_one_scan_reports():
    """PAGEMAP_SCAN fills at most its vector of ranges and says where it stopped: the
    log goes on from there, so no range is lost and every one is armed again."""
    mem = mmap.mmap(-1, 64 * OS_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = np.frombuffer(mem, dtype=np.uint8).ctypes.data
    log = kernel_dirty.WriteLog(start, start + len(mem), regions=4)
    try:
        log.protect()
        written = [1, 3, 5, 6, 9, 20, 22, 40, 41, 42, 63]
        for page in written:
            mem[page * OS_PAGE + 9] = 1
        ranges = (log.collect() - start) // OS_PAGE
        assert ranges.tolist() == [[1, 2], [3, 4], [5, 7], [9, 10], [20, 21], [22, 23], [40, 43], [63, 64]]
        assert len(log.collect()) == 0  # all armed again
        mem[22 * OS_PAGE] = 2
        assert ((log.collect() - start) // OS_PAGE).tolist() == [[22, 23]]
    finally:
        log.close()
    assert _uffd_state(mem) == (False, 0)


def test_discarded_pages_read_zero_and_are_caught(tmp_path):
    """madvise(MADV_DONTNEED) on private anonymous memory: the pages read back zero."""
    size = 64 * OS_PAGE
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    data = np.frombuffer(mem, dtype=np.uint8)
    data[:] = 5
    with SnapshotWriter(tmp_path / "vm.sav", {"ram": mem}, fsync=False) as writer:
        assert writer.tracking_mode == {"ram": "kernel"}
        writer.save_round()
        mem.madvise(mmap.MADV_DONTNEED, 10 * OS_PAGE, 3 * OS_PAGE)
        assert not data[10 * OS_PAGE : 13 * OS_PAGE].any()
        stats = writer.save_round()
        assert (stats.pages_written, stats.pages_zeroed) == (0, 3 * OS_PAGE // PAGE)
        writer.complete()
    assert bytes(_file_pages(tmp_path / "vm.sav")) == bytes(mem)


def test_direct_io_into_the_buffer_is_caught(tmp_path):
    """An O_DIRECT read: the device writes the pages, pinned by the kernel beforehand."""
    source = tmp_path / "disk.img"
    source.write_bytes(b"\x42" * 8 * OS_PAGE)
    try:
        fd = os.open(source, os.O_RDONLY | os.O_DIRECT)
    except OSError as err:
        pytest.skip(f"no O_DIRECT on {tmp_path}: {err.strerror}")
    mem = mmap.mmap(-1, 64 * OS_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        with SnapshotWriter(tmp_path / "vm.sav", {"ram": mem}, fsync=False) as writer:
            assert writer.tracking_mode == {"ram": "kernel"}
            writer.save_round()
            assert os.preadv(fd, [memoryview(mem)[10 * OS_PAGE : 13 * OS_PAGE]], 0) == 3 * OS_PAGE
            assert writer.save_round().pages_written == 3 * OS_PAGE // PAGE
            writer.complete()
    finally:
        os.close(fd)
    assert bytes(_file_pages(tmp_path / "vm.sav")) == bytes(mem)


def test_a_page_written_during_its_own_copy_is_saved_next_round(tmp_path):
    """The round collects and re-arms the written pages BEFORE copying them: a write that
    lands while the page is being copied and written out is logged for the next round.
    Here a channel sees the page's round-1 bytes and, before they reach the file, the
    page changes to B (a "guest" write racing the copy); the final file holds B."""
    data = pattern_block(64)
    pages = data.reshape(-1, PAGE)
    victim, bystander = 9, 40
    raced = []

    def race(block, round_, first, count, view):
        if round_ == 1 and first <= victim < first + count and not raced:
            pages[victim, :4] = [0xB, 0xB, 0xB, 0xB]  # after the round's copy, before its write
            pages[bystander, :4] = [0xC, 0xC, 0xC, 0xC]  # a page of no dirty set yet
            raced.append(bytes(view))
        return view, 0.0

    with SnapshotWriter(tmp_path / "vm.sav", {"ram": data}, batch_bytes=PAGE, channel_hook=race) as writer:
        assert writer.tracking_mode == {"ram": "kernel"}
        writer.save_round()
        pages[victim, :4] = [0xA, 0xA, 0xA, 0xA]
        assert writer.save_round().pages_written == 1  # round 1 writes A, then the race
        assert raced and raced[0][:4] == b"\x0a" * 4  # the channel had the A bytes
        assert writer.save_round().pages_written == 2  # round 2: the victim (B) and the bystander
        writer.complete()
    saved = _file_pages(tmp_path / "vm.sav").reshape(-1, PAGE)
    assert bytes(saved[victim, :4]) == b"\x0b" * 4 and bytes(saved[bystander, :4]) == b"\x0c" * 4
    assert np.array_equal(saved, pages)


def test_a_b_a_during_a_round(tmp_path):
    """A page changed and changed back while its round copies it is saved with the
    bytes it has when the rounds end, whatever the copy caught in between."""
    data = pattern_block(32)
    pages = data.reshape(-1, PAGE)
    original = pages[5].copy()

    def flip(block, round_, first, count, view):
        if round_ == 1 and first <= 5 < first + count:
            pages[5, 100:108] ^= 0xFF
            torn = bytes(pages[first : first + count].reshape(-1))  # what a live copy would see now
            pages[5, 100:108] ^= 0xFF
            return torn, 0.0  # the file gets the in-between bytes this round
        return view, 0.0

    with SnapshotWriter(tmp_path / "vm.sav", {"ram": data}, batch_bytes=PAGE, channel_hook=flip) as writer:
        writer.save_round()
        pages[5, 0] ^= 1
        writer.save_round()
        pages[5, 0] ^= 1  # back to the original bytes
        assert writer.save_round().pages_written == 1  # written: the file holds the in-between ones
        writer.complete()
    assert np.array_equal(_file_pages(tmp_path / "vm.sav").reshape(-1, PAGE)[5], original)


@pytest.mark.parametrize("page_size", [512, 4096, 16384])
@pytest.mark.parametrize("offset", [0, 16, 2056, 4000])
def test_page_sizes_and_offsets(tmp_path, page_size, offset):
    """A buffer that does not start on an OS page (numpy's malloc'ed arrays start 16
    bytes in; the OS page across a page boundary holding a short end or a short start of
    a page), writer pages smaller and larger than the OS page: each round writes the
    pages that changed, no fewer and no more; writes to memory just outside the buffer,
    on the OS pages it shares, are not the buffer's."""
    count = 96
    host = np.zeros(count * page_size + 3 * OS_PAGE, dtype=np.uint8)
    base = -host.ctypes.data % OS_PAGE + OS_PAGE + offset  # page-aligned, then ``offset`` in
    data = host[base : base + count * page_size]
    data[:] = np.random.default_rng(3).integers(1, 256, len(data), dtype=np.uint8)
    pages = data.reshape(-1, page_size)
    rng = np.random.default_rng(page_size + offset)
    with SnapshotWriter(tmp_path / "vm.sav", {"ram": data}, page_size=page_size, fsync=False) as writer:
        assert writer.tracking_mode == {"ram": "kernel"}
        writer.save_round()
        for _ in range(4):
            ends, starts = rng.integers(0, count, 3), rng.integers(0, count, 3)
            pages[ends, -1] ^= 1  # a last byte, a first byte: alone in an OS page they share
            pages[starts, 0] ^= 1
            touched = np.unique(np.r_[0, count - 1, rng.integers(0, count, 8)])
            for page in touched:
                pages[page, rng.integers(0, page_size)] ^= 1
            touched = np.unique(np.r_[touched, ends, starts])
            host[base - 1] += 1  # the neighbours of the buffer's edge pages
            host[base + len(data)] += 1
            assert writer.save_round().pages_written == len(touched)
        host[base - 8 : base] = 9
        assert writer.save_round().pages_written == 0
        writer.complete()
    assert np.array_equal(_file_pages(tmp_path / "vm.sav"), data)


def test_fallback_for_memory_the_kernel_cannot_track(tmp_path, caplog):
    """A file-backed mapping, shared anonymous memory (Python's default anonymous mmap)
    and a buffer that holds no whole OS page: "auto" takes digests for them, says why in
    tracking_note and in the log, and saves them right; "kernel" refuses them by name."""
    backing = tmp_path / "backing.raw"
    backing.write_bytes(bytes(16 * PAGE))
    with open(backing, "r+b") as f:
        filemap = mmap.mmap(f.fileno(), 16 * PAGE)
    shared = mmap.mmap(-1, 16 * PAGE)
    host = np.ones(3 * OS_PAGE, dtype=np.uint8)
    start = -host.ctypes.data % OS_PAGE + 100
    small = host[start : start + PAGE]  # straddles two OS pages, holds neither whole
    blocks = {"file": filemap, "shared": shared, "small": small, "ram": pattern_block(64)}
    with caplog.at_level(logging.INFO, logger="mappedram"):
        with SnapshotWriter(tmp_path / "vm.sav", blocks, fsync=False) as writer:
            assert writer.tracking_mode == {"file": "digest", "shared": "digest", "small": "digest", "ram": "kernel"}
            note = writer.tracking_note
            assert f"'file' (its memory is a file-backed mapping ({backing}))" in note
            assert "'shared' (its memory is shared" in note and "'small' (it holds no whole page" in note
            writer.save_round()
            filemap[PAGE : PAGE + 3] = b"abc"
            shared[5 * PAGE] = 7
            small[100] = 2
            assert writer.save_round().pages_written == 3
            writer.complete()
    assert [r.getMessage() for r in caplog.records] == [f"{tmp_path / 'vm.sav'}: {note}"]
    restored = mappedram.restore(tmp_path / "vm.sav")
    for name, buf in blocks.items():
        assert bytes(restored[name]) == bytes(buf), name
    for name, buf, why in [
        ("file", filemap, "file-backed mapping"),
        ("shared", shared, "its memory is shared"),
        ("small", small, "no whole page"),
    ]:
        with pytest.raises(ValueError, match=f"block '{name}': no kernel dirty tracking: .*{why}"):
            SnapshotWriter(tmp_path / "k.sav", {"ok": pattern_block(8), name: buf}, dirty_tracking="kernel")
    assert not (tmp_path / "k.sav").exists()


def test_memory_already_tracked_falls_back(tmp_path):
    """A buffer another writer tracks (one userfaultfd per range) gets digests; the
    first writer's tracking is not disturbed."""
    data = pattern_block(64)
    with SnapshotWriter(tmp_path / "a.sav", {"ram": data}) as first:
        with SnapshotWriter(tmp_path / "b.sav", {"ram": data}) as second:
            assert first.tracking_mode == {"ram": "kernel"} and second.tracking_mode == {"ram": "digest"}
            assert "tracked by another userfaultfd" in second.tracking_note
            with pytest.raises(ValueError, match="tracked by another userfaultfd"):
                SnapshotWriter(tmp_path / "c.sav", {"ram": data}, dirty_tracking="kernel")
            first.save_round()
            data[3 * PAGE] ^= 1
            assert first.save_round().pages_written == 1
            second.complete()
        first.complete()
    for name in ("a.sav", "b.sav"):
        assert np.array_equal(mappedram.restore(tmp_path / name)["ram"], data)


@pytest.mark.parametrize("end", ["complete", "abort", "exit", "failed init"])
def test_no_tracking_left_behind(tmp_path, end):
    """After complete(), abort(), leaving the with block, or a constructor that fails on a
    later block, the memory is plain again: not registered, no write-protected page."""
    data = pattern_block(256)
    data[:] = 1
    if end == "failed init":
        with pytest.raises(ValueError, match="not a multiple"):
            SnapshotWriter(tmp_path / "vm.sav", {"ram": data, "bad": bytearray(100)})
    else:
        writer = SnapshotWriter(tmp_path / "vm.sav", {"ram": data})
        writer.save_round()
        addr = data.ctypes.data
        inside = ((addr + len(data)) // OS_PAGE) - (-(-addr // OS_PAGE))
        assert _uffd_state(data) == (True, inside)  # armed: every whole OS page of the buffer
        data[::PAGE] = 2
        if end == "complete":
            writer.complete()
        elif end == "abort":
            writer.abort()
        else:
            with writer:
                pass
    assert _uffd_state(data) == (False, 0)
    data[:] = 3  # and it is ordinary memory
    assert (data == 3).all()


def test_a_forgotten_writer_leaves_no_tracking(tmp_path):
    """A writer dropped without complete() or abort(): once collected, its buffer is
    plain memory again (the kernel log closes itself)."""
    data = pattern_block(64)
    writer = SnapshotWriter(tmp_path / "vm.sav", {"ram": data})
    writer.save_round()
    assert _uffd_state(data)[0]
    del writer
    gc.collect()
    assert _uffd_state(data) == (False, 0)


def test_explicit_modes_and_bad_mode(tmp_path):
    data = pattern_block(16)
    for mode in ("kernel", "digest", "manual"):
        with SnapshotWriter(tmp_path / "vm.sav", {"ram": data}, dirty_tracking=mode) as writer:
            assert writer.tracking_mode == {"ram": mode}
            writer.complete()
    with pytest.raises(ValueError, match="'auto', 'kernel', 'digest', 'manual'.*not 'soft-dirty'"):
        SnapshotWriter(tmp_path / "x.sav", {"ram": data}, dirty_tracking="soft-dirty")


def test_why_unavailable_names_the_missing_piece(monkeypatch):
    """Without the features, the reason names them (a kernel that reports no features)."""
    kernel_dirty.why_unavailable.cache_clear()
    real_ioctl = kernel_dirty._ioctl

    def old_kernel(fd, request, arg):
        if request == kernel_dirty.UFFDIO_API:
            if arg.features:
                raise OSError(22, "Invalid argument")
            arg.features = 0
            return 0
        return real_ioctl(fd, request, arg)

    monkeypatch.setattr(kernel_dirty, "_ioctl", old_kernel)
    try:
        why = kernel_dirty.why_unavailable()
    finally:
        kernel_dirty.why_unavailable.cache_clear()
    assert why is not None and "lacks UFFD_FEATURE_WP_ASYNC and UFFD_FEATURE_WP_UNPOPULATED" in why
    assert "Linux 6.7" in why
    monkeypatch.undo()
    assert kernel_dirty.why_unavailable() is None
