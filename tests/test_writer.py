"""The live writer and the parallel restore: rounds, ordering, syncs, zero pages, safety."""

from __future__ import annotations

import dataclasses
import mmap
import os
import threading
import time

import numpy as np
import pytest
from craft import PAGE, pattern_block, write_snapshot

import mappedram
from mappedram.formats.policy import POLICIES, Event, Mode
from mappedram.mapper import kernel_dirty
from mappedram.mapper.writer import SnapshotWriter


def _workload(
    buffers: dict[str, np.ndarray],
    stop: threading.Event,
    writer: SnapshotWriter | None,
    seed: int,
    ticked: threading.Event | None = None,
) -> None:
    """Keep changing random pages (sometimes zeroing them) until told to stop; ``ticked``
    is set after each batch of changes."""
    rng = np.random.default_rng(seed)
    names = list(buffers)
    while not stop.is_set():
        name = names[rng.integers(len(names))]
        pages = buffers[name].reshape(-1, PAGE)
        for page in rng.integers(0, len(pages), 16):
            if rng.random() < 0.2:
                pages[page] = 0
            else:
                pages[page, rng.integers(0, PAGE, 8)] = rng.integers(1, 256, 8, dtype=np.uint8)
            if writer is not None:
                writer.mark_dirty(name, page)
        if ticked is not None:
            ticked.set()
        time.sleep(0)


@pytest.mark.parametrize("channels", [1, 2, 4])
@pytest.mark.parametrize("tracking", ["digest", "manual"])
def test_live_save_matches_final_state(tmp_path, channels, tracking):
    buffers = {"pc.ram": pattern_block(2048, zero=tuple(range(100, 300))), "vga": pattern_block(64, seed=5)}
    path = tmp_path / "live.sav"
    stop, ticked = threading.Event(), threading.Event()
    with SnapshotWriter(path, buffers, channels=channels, dirty_tracking=tracking, fsync=False) as writer:
        worker = threading.Thread(
            target=_workload, args=(buffers, stop, writer if tracking == "manual" else None, channels, ticked)
        )
        worker.start()
        try:
            written = []
            for _ in range(8):  # each round after the workload changed something, however busy the machine
                assert ticked.wait(60), "the workload thread made no change in 60 s"
                ticked.clear()
                written.append(writer.save_round().pages_written)
        finally:
            stop.set()
            worker.join()
        final = writer.complete()  # the "guest" is paused: last round
        assert writer.syncs == writer.rounds == 9  # one sync per round, none per batch
    assert written[0] >= 1800  # round 0: every non-zero page
    assert max(written[1:]) < written[0] and sum(written[1:]) > 0  # later rounds: pages the workload touched
    assert final.round == 8
    restored = mappedram.restore(path, channels=channels)
    for name, data in buffers.items():
        assert np.array_equal(restored[name], data), name
    report = mappedram.verify(path)
    assert report.ok, report.problems
    with mappedram.open(path) as snap:
        parts = [s for s in snap.sections if s.kind == "part"]
        assert len(parts) == 9  # one EOS-only PART per round, like QEMU's iterations


def _ordering_run(tmp_path, sync_per_round: bool) -> tuple[bytes, bytes, bytes]:
    """Round 1's write of page 5 is slow and carries the bytes of its time; round 2
    rewrites the page quickly on another channel. Returns (old, new, in the file)."""
    data = pattern_block(64)
    path = tmp_path / f"order-{sync_per_round}.sav"
    victim = 5

    def slow_old_copy(block, round_, first, count, view):
        if round_ == 1 and first <= victim < first + count:
            return bytes(view), 0.3  # the bytes of round 1, written 0.3 s later
        return view, 0.0

    policy = POLICIES[Mode.MAPPED_RAM]
    if not sync_per_round:
        policy = dataclasses.replace(policy, syncs={e: s for e, s in policy.syncs.items() if e is not Event.ROUND_END})
    with SnapshotWriter(
        path, {"pc.ram": data}, channels=2, batch_bytes=PAGE, policy=policy, channel_hook=slow_old_copy
    ) as writer:
        pages = data.reshape(-1, PAGE)
        writer.save_round()  # round 0
        pages[victim, :4] = [1, 1, 1, 1]
        old = bytes(pages[victim])
        writer.save_round()  # round 1: the slow write of `old`
        pages[victim, :4] = [2, 2, 2, 2]
        new = bytes(pages[victim])
        writer.save_round()  # round 2: `new`, fast
        writer.complete()
        assert writer.syncs == (4 if sync_per_round else 1)  # rounds 0-2 and the final one, or the final only
    with mappedram.open(path) as snap:
        return old, new, bytes(snap.block("pc.ram").page(victim))


def test_round_sync_keeps_newest_page(tmp_path):
    old, new, got = _ordering_run(tmp_path, sync_per_round=True)
    assert got == new


def test_without_round_sync_an_old_page_overtakes(tmp_path):
    """Proof that the test above can fail: without the per-round sync the stale page wins."""
    old, new, got = _ordering_run(tmp_path, sync_per_round=False)
    assert got == old != new


def test_zero_pages_clear_bits_and_punch_holes(tmp_path):
    data = pattern_block(256)
    path = tmp_path / "zero.sav"
    with SnapshotWriter(path, {"pc.ram": data}, punch_holes=True) as writer:
        writer.save_round()
        data[10 * PAGE : 20 * PAGE] = 0
        stats = writer.save_round()
        assert (stats.pages_written, stats.pages_zeroed) == (0, 10)
        writer.complete()
    with mappedram.open(path) as snap:
        block = snap.block("pc.ram")
        assert block.populated == 246
        assert not block.present()[10:20].any()
        assert np.array_equal(block.read(), data)
        slot = block.pages_offset + 10 * PAGE
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.lseek(fd, slot, os.SEEK_HOLE) == slot  # the stale slot was punched out
        finally:
            os.close(fd)


def test_stale_slots_kept_without_punching(tmp_path):
    data = pattern_block(32)
    path = tmp_path / "stale.sav"
    with SnapshotWriter(path, {"pc.ram": data}, punch_holes=False) as writer:
        writer.save_round()
        before = bytes(data[3 * PAGE : 4 * PAGE])
        data[3 * PAGE : 4 * PAGE] = 0
        writer.complete()
    with mappedram.open(path) as snap:
        block = snap.block("pc.ram")
        assert snap.read_bytes(block.pages_offset + 3 * PAGE, PAGE) == before  # old bytes remain
        assert bytes(block.page(3)) == bytes(PAGE)  # but the clear bit wins
        assert np.array_equal(mappedram.restore(path)["pc.ram"], data)


def test_failed_save_leaves_previous_file(tmp_path):
    path = write_snapshot(tmp_path / "vm.sav", {"pc.ram": pattern_block(16)})
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        with SnapshotWriter(path, {"pc.ram": pattern_block(16, seed=9)}, channels=2) as writer:
            writer.save_round()
            raise RuntimeError("boom")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.sav"]  # no partial file left


def test_channel_error_aborts_save(tmp_path):
    """An error inside a channel thread reaches complete() at the sync, and aborts."""
    path = write_snapshot(tmp_path / "vm.sav", {"pc.ram": pattern_block(16)})
    before = path.read_bytes()
    not_a_buffer = lambda *args: (object(), 0.0)  # noqa: E731  # the channel's write fails
    writer = SnapshotWriter(path, {"pc.ram": pattern_block(16, seed=3)}, channels=2, channel_hook=not_a_buffer)
    with pytest.raises(TypeError):
        writer.complete()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.sav"]


def test_restore_syncs_once_for_the_whole_load(paused_mr):
    with mappedram.open(paused_mr) as snap:
        targets = {b.name: np.zeros(b.used_length, dtype=np.uint8) for b in snap}
        stats = snap.restore_into(targets, channels=4)
        assert stats.syncs == 1 and len(targets) == 9
        assert stats.bytes_read == sum(b.populated * b.page_size for b in snap)
        for block in snap:
            assert np.array_equal(targets[block.name], block.read())


def test_restore_into_mmap_and_raw_file(paused_mr, tmp_path):
    raw = tmp_path / "pc.ram.raw"
    with mappedram.open(paused_mr) as snap:
        block = snap.block("pc.ram")
        with open(raw, "wb") as f:
            f.truncate(block.used_length)
        with open(raw, "r+b") as f, mmap.mmap(f.fileno(), block.used_length) as mm:
            seen = []
            snap.restore_into({"pc.ram": mm}, channels=2, progress=lambda done, total: seen.append((done, total)))
            mm.flush()
        assert seen[-1][0] == seen[-1][1] == block.populated * block.page_size
        assert raw.read_bytes() == block.read().tobytes()
        scratch = bytearray(b"\xff" * block.used_length)
        snap.restore_into({"pc.ram": scratch}, channels=3)
        assert bytes(scratch) == raw.read_bytes()
        with pytest.raises(ValueError, match="holds 10 bytes"):
            snap.restore_into({"pc.ram": bytearray(10)})


def test_device_state_passthrough(paused_mr, tmp_path):
    """Rewrite the RAM of a QEMU snapshot; the device sections come through unchanged."""
    with mappedram.open(paused_mr) as src:
        devices = mappedram.DeviceState.from_snapshot(src)
        blocks = {b.name: b.read() for b in src}
        src_devices = [
            (d.idstr, d.instance_id, d.version_id, src.read_bytes(d.offset, d.end - d.offset)) for d in src.devices
        ]
        src_desc = src.vmdesc["devices"]
    blocks["pc.ram"][0x200000:0x200004] = [0xDE, 0xAD, 0xBE, 0xEF]
    out = write_snapshot(tmp_path / "rewritten.sav", blocks, channels=4, devices=devices)
    assert mappedram.verify(out).ok
    with mappedram.open(out) as snap:
        assert snap.machine_type == "pc-i440fx-10.0"
        assert [
            (d.idstr, d.instance_id, d.version_id, snap.read_bytes(d.offset, d.end - d.offset)) for d in snap.devices
        ] == src_devices
        assert snap.vmdesc["devices"] == src_desc
        assert [s.command for s in snap.sections if s.kind == "command"] == ["switchover_start"]
        for name, data in blocks.items():
            assert np.array_equal(snap.block(name).read(), data)
        with mappedram.open(paused_mr) as src:  # QEMU's layout, byte for byte offsets
            assert [(b.bitmap_offset, b.pages_offset) for b in snap] == [(b.bitmap_offset, b.pages_offset) for b in src]


# -- what the writer refuses -------------------------------------------------------------------
def test_mark_dirty_checks_pages(tmp_path):
    data = pattern_block(16)
    writer = SnapshotWriter(tmp_path / "vm.sav", {"pc.ram": data}, dirty_tracking="manual")
    try:
        writer.save_round()
        for bad in (-1, 16, [3, -2], [0, 99], slice(-1, None), slice(0, 17), np.ones(15, dtype=bool), 2.5):
            with pytest.raises(ValueError, match="pc.ram"):
                writer.mark_dirty("pc.ram", bad)
        assert writer.save_round().pages_written == 0  # nothing was marked by the refused calls
        data[15 * PAGE] ^= 1
        writer.mark_dirty("pc.ram", 15)
        data[2 * PAGE] ^= 1
        writer.mark_dirty("pc.ram", slice(2, 4))
        assert writer.save_round().pages_written == 3
        writer.complete()
    finally:
        writer.abort()
    with pytest.raises(RuntimeError, match="already complete"):
        writer.mark_dirty("pc.ram", 0)
    assert np.array_equal(mappedram.restore(tmp_path / "vm.sav")["pc.ram"], data)


@pytest.mark.parametrize(
    "blocks, kw, message",
    [
        ({"pc.ram": bytearray(0)}, {}, "every block is empty"),
        ({"a": bytearray(0), "b": bytearray(0)}, {}, "every block is empty"),
        ({"pc.ram": bytearray(PAGE)}, {"page_size": 1 << 31}, "from 512 to 1073741824"),
        ({"pc.ram": bytearray(PAGE)}, {"page_size": 3000}, "power of two"),
        ({"pc\0ram": bytearray(PAGE)}, {}, "NUL"),
        ({"pc.ram": bytearray(PAGE), "pc.ram\0x": bytearray(PAGE)}, {}, "NUL"),
        ({"x" * 256: bytearray(PAGE)}, {}, "256 bytes long"),
        ({"é" * 128: bytearray(PAGE)}, {}, "256 bytes long"),
        ({"": bytearray(PAGE)}, {}, "0 bytes long"),
    ],
)
def test_writer_refuses_what_the_reader_would(tmp_path, blocks, kw, message):
    with pytest.raises(ValueError, match=message):
        SnapshotWriter(tmp_path / "vm.sav", blocks, **kw)
    assert os.listdir(tmp_path) == []


def test_empty_block_beside_ram_and_longest_name(tmp_path):
    name = "n" * 255
    blocks = {"pc.ram": pattern_block(8), "empty": bytearray(0), name: pattern_block(2, seed=3)}
    path = write_snapshot(tmp_path / "vm.sav", blocks)
    assert mappedram.verify(path).ok
    restored = mappedram.restore(path)
    assert len(restored["empty"]) == 0 and np.array_equal(restored[name], blocks[name])


@pytest.mark.parametrize("tracking", ["manual", "digest", "kernel"])
@pytest.mark.parametrize("one_shot", [False, True])
def test_writes_after_on_copied_are_not_saved(tmp_path, tracking, one_shot):
    """The caller resumes its writers in ``on_copied``: the file holds the memory of the
    moment complete() began. After earlier rounds the final round's pages are copies, so
    on_copied comes before any of them reaches a channel; a one-shot save copies nothing,
    so on_copied waits for the channels."""
    if tracking == "kernel" and kernel_dirty.why_unavailable():
        pytest.skip(f"no kernel dirty tracking here: {kernel_dirty.why_unavailable()}")
    data = pattern_block(512, zero=tuple(range(10, 20)))
    pages = data.reshape(-1, PAGE)
    events: list[str] = []

    def hook(block, round_, first, count, view):
        events.append("item")
        return view, 0.0

    def resume():
        events.append("on_copied")
        pages[:] = 0xEE  # the guest runs again and writes everywhere

    path = tmp_path / "resume.sav"
    with SnapshotWriter(path, {"ram": data}, channels=2, dirty_tracking=tracking, channel_hook=hook) as writer:
        if not one_shot:
            writer.save_round()
            pages[[3, 4, 5, 200, 511], 7] += 1
            pages[15, 0] = 9  # a zero page gets data
            pages[100] = 0  # and a data page becomes zero
            if tracking == "manual":
                writer.mark_dirty("ram", [3, 4, 5, 15, 100, 200, 511])
        expected = data.copy()
        events.clear()
        writer.complete(on_copied=resume)
    assert events.count("on_copied") == 1 and "item" in events
    if one_shot:
        assert events[-1] == "on_copied"
    else:
        assert events[0] == "on_copied"
    assert np.array_equal(mappedram.restore(path)["ram"], expected)
