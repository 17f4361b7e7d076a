"""convert --channels N: a mapped-ram output's slot writes (and a mapped-ram source's
extent reads) run in N channel threads. Outputs are byte-identical whatever N and restore
as QEMU restored the input; a page sent again lands after its earlier write; a failing
write leaves no output; every descriptor is closed; bad counts are refused in one line."""

from __future__ import annotations

import errno
import filecmp
import os
import resource
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from conftest import fixture_file, load_manifest
from craft import pattern_block, write_snapshot
from test_channels import interrupted
from test_compressed import LEGACY, PAGE, peak_rss_kib, write_image

import mappedram
from mappedram.cli import main
from mappedram.mapper.channels import MAX_CHANNELS
from mappedram.mapper.convert import to_mapped_ram
from mappedram.mapper.encoder import DeviceState, StreamComposer
from mappedram.mapper.forward import ForwardSnapshot

CHANNELS = (1, 2, 4, 9)
FIXTURES = {
    "classic": LEGACY,
    "mapped-ram": "pc64-a-paused-mr.bin",
    "multifd": "pc64-b-paused-mr-mfd4.bin",
    "live": "pc64-c-live-mr-mfd4.bin",
    "libvirt": "pc64-f-paused-mr-libvirt.bin",
    "8k-pages": "sun4u-64-h-paused-mr.bin",
}


def _open_fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


def _qemu_hashes(name: str) -> dict[str, str]:
    return {b["name"]: b["sha256"] for b in load_manifest(name)["blocks"] if "sha256" in b}


def _devices(path) -> bytes:
    with mappedram.open(path) as snap:
        return DeviceState.from_snapshot(snap).sections


def _convert_each(src, tmp_path, counts=CHANNELS) -> list:
    outs = []
    for count in counts:
        out = tmp_path / f"out{count}.sav"
        mappedram.convert(src, out, "mapped-ram", channels=count)
        outs.append(out)
    return outs


# -- the same output whatever the channel count ----------------------------------------------
@pytest.mark.parametrize("kind", FIXTURES)
def test_fixture_outputs_are_identical_for_any_channel_count(kind, tmp_path):
    name = FIXTURES[kind]
    src = fixture_file(name)
    before = _open_fds()
    outs = _convert_each(src, tmp_path)
    assert _open_fds() == before
    for out in outs[1:]:
        assert filecmp.cmp(outs[0], out, shallow=False), out.name
    report = mappedram.verify(outs[0], hash_blocks=True)
    assert report.ok, report.problems
    qemu = _qemu_hashes(name)
    assert qemu and {n: report.hashes[n] for n in qemu} == qemu  # the RAM QEMU restored from the input
    assert _devices(outs[0]) == _devices(src)
    with mappedram.open(src) as a, mappedram.open(outs[0]) as b:
        assert [(x.name, x.populated) for x in a] == [(y.name, y.populated) for y in b]  # the bitmaps


@pytest.mark.parametrize("fmt", ["gzip", "zstd"])
def test_compressed_image_outputs_are_identical_for_any_channel_count(fmt, tmp_path):
    image = write_image(tmp_path / f"in.{fmt}", fmt, fixture_file(LEGACY).read_bytes())
    outs = _convert_each(image, tmp_path)
    for out in outs[1:]:
        assert filecmp.cmp(outs[0], out, shallow=False), out.name
    report = mappedram.verify(outs[0], hash_blocks=True)
    assert report.ok and {n: report.hashes[n] for n in _qemu_hashes(LEGACY)} == _qemu_hashes(LEGACY)


def test_scattered_pages_of_a_mapped_ram_file(tmp_path):
    """Short extents (two pages, then a hole) are read and placed by the channels, in
    items small enough for 255 channels to share the in-flight bound."""
    data = pattern_block(3000, zero=tuple(range(2, 3000, 3)))
    src = write_snapshot(tmp_path / "in.sav", {"pc.ram": data})
    outs = _convert_each(src, tmp_path, (1, 9, MAX_CHANNELS))
    for out in outs:
        assert filecmp.cmp(outs[0], out, shallow=False), out.name
        assert np.array_equal(mappedram.restore(out)["pc.ram"], data)
    with mappedram.open(outs[0]) as snap:
        assert snap.block("pc.ram").populated == 2000


# -- the channels do the writes --------------------------------------------------------------
@pytest.mark.parametrize("kind, count", [("mapped-ram", 4), ("classic", 9)])
def test_the_writes_run_in_that_many_channels_at_once(kind, count, tmp_path):
    """The first ``count`` writes wait for each other at a barrier: it opens only when
    ``count`` channel threads are writing at the same time."""
    barrier = threading.Barrier(count, timeout=60)
    lock = threading.Lock()
    writers: list[str] = []

    def hook(at: int, nbytes: int) -> None:
        with lock:
            writers.append(threading.current_thread().name)
            first = len(writers) <= count
        if first:
            barrier.wait()

    src = fixture_file(FIXTURES[kind])
    out = tmp_path / "out.sav"
    with _source(kind, src) as snap:
        to_mapped_ram(snap, out, channels=count, channel_hook=hook)
    assert len(writers) > count
    assert set(writers[:count]) == {f"convert-{i}" for i in range(count)}
    assert filecmp.cmp(out, _convert_each(src, tmp_path, (1,))[0], shallow=False)


def _source(kind: str, path):
    """What convert reads: a classic stream in one forward pass, a mapped-ram file by its extents."""
    return ForwardSnapshot(path) if kind == "classic" else mappedram.open(path)


def _two_rounds() -> tuple[bytes, np.ndarray]:
    """A classic stream that sends pages 0-63 of 'a', then (a live save's next round)
    pages 0-31 again with other bytes and a ZERO record for page 40; and what 'a' restores to."""
    comp = StreamComposer(PAGE)
    head = comp.head()
    pieces, _, _ = comp.ram_start(len(head), [("a", 64 * PAGE)])
    ram = np.zeros((64, PAGE), dtype=np.uint8)
    body, name = b"", "a"
    for page in range(64):
        ram[page] = page + 1
        body += comp.page_record(name, page, ram[page].tobytes())
        name = None
    body += comp.section_end() + comp.part_start()
    for page in range(32):
        ram[page] = 200 + page
        body += comp.page_record(None if page else "a", page, ram[page].tobytes())
    body += comp.page_record(None, 40, None)
    ram[40] = 0
    stream = head + b"".join(p for _, p in pieces) + comp.part_start() + body + comp.section_end() + comp.tail()
    return stream, ram.reshape(-1)


@pytest.mark.parametrize("fmt", [None, "xz"])
def test_a_page_sent_again_lands_after_its_earlier_write(fmt, tmp_path):
    """Each output range's first write waits in its channel: without a sync before the
    second round, the round's newer bytes would be overwritten by the late older ones."""
    stream, ram = _two_rounds()
    src = tmp_path / "two.sav"
    if fmt is None:
        src.write_bytes(stream)
    else:
        write_image(src, fmt, stream)
    seen: set[int] = set()  # pages written
    lock = threading.Lock()

    def late_first_writes(at: int, nbytes: int) -> None:
        pages = set(range(at // PAGE, (at + nbytes) // PAGE))
        with lock:
            first = not pages <= seen
            seen.update(pages)
        if first:
            threading.Event().wait(0.3)

    out = tmp_path / "out.sav"
    with ForwardSnapshot(src) as snap:
        to_mapped_ram(snap, out, channels=MAX_CHANNELS, channel_hook=late_first_writes)
    assert np.array_equal(mappedram.restore(out)["a"], ram)
    with mappedram.open(out) as snap:
        assert snap.block("a").populated == 63  # page 40's bit is clear
    assert np.array_equal(mappedram.restore(src)["a"], ram)  # the input restores the same


# -- failures, descriptors, bad counts ---------------------------------------------------------
@pytest.mark.parametrize("kind", ["mapped-ram", "classic"])
def test_a_failing_write_in_a_channel_leaves_no_output(kind, tmp_path):
    calls = []

    def full_disk(at: int, nbytes: int) -> None:
        calls.append(at)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    before = _open_fds()
    out = tmp_path / "out.sav"
    src = fixture_file(FIXTURES[kind])
    with _source(kind, src) as snap, pytest.raises(OSError) as err:
        to_mapped_ram(snap, out, channels=4, channel_hook=full_disk)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(out)  # the output, not the temporary
    assert os.listdir(tmp_path) == []  # no output, no .partial
    assert _open_fds() == before


FILE_SIZE_LIMIT = textwrap.dedent(
    """
    import resource, sys
    from mappedram.cli import main
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # a write past it: EFBIG
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.mark.parametrize("kind", ["mapped-ram", "classic"])
@pytest.mark.parametrize("limit", [4 << 20, 512 << 10])
def test_a_file_size_limit_is_one_line_and_exit_2(kind, limit, tmp_path):
    """One 8 MiB block: its pages start at 1 MiB and its tail is written after them, so a
    4 MiB limit fails a channel's write of pages; 512 KiB fails the first piece of layout."""
    src = write_snapshot(tmp_path / "in.sav", {"pc.ram": pattern_block(2048)})
    if kind == "classic":
        mappedram.convert(src, tmp_path / "in.stream", "stream")
        os.replace(tmp_path / "in.stream", src)
    out = tmp_path / "out.sav"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    argv = ["convert", str(src), str(out), "--to", "mapped-ram", "--channels", "4"]
    proc = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMIT, str(limit), *argv], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"mappedram: {out}: {os.strerror(errno.EFBIG)}\n"
    assert proc.stdout == ""
    assert os.listdir(tmp_path) == ["in.sav"]
    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] != limit  # the limit was the child's


@pytest.mark.parametrize("count", [0, -1, MAX_CHANNELS + 1, 2.0, True, "4"])
@pytest.mark.parametrize("to", ["mapped-ram", "stream"])
def test_library_refuses_channel_counts_out_of_range(count, to, tmp_path):
    src = fixture_file(FIXTURES["mapped-ram"])
    before = _open_fds()
    with pytest.raises(ValueError, match=f"^channels: a number from 1 to {MAX_CHANNELS}, not "):
        mappedram.convert(src, tmp_path / "out.sav", to, channels=count)
    assert os.listdir(tmp_path) == []
    assert _open_fds() == before


@pytest.mark.parametrize("count", ["0", "256"])
def test_cli_refuses_channel_counts_out_of_range_in_one_line(count, tmp_path, capsys):
    src = fixture_file(FIXTURES["classic"])
    with pytest.raises(SystemExit) as exit_:
        main(["convert", str(src), str(tmp_path / "out.sav"), "--to", "mapped-ram", "--channels", count])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--channels: expected a number from 1 to {MAX_CHANNELS}, found {count!r}" in err
    assert os.listdir(tmp_path) == []


# -- progress and memory -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mapped-ram", "classic"])
def test_progress_moves_with_channels(kind, tmp_path):
    seen: list[tuple[int, int]] = []
    src = fixture_file(FIXTURES[kind])
    mappedram.convert(src, tmp_path / "out.sav", "mapped-ram", channels=4, progress=lambda d, t: seen.append((d, t)))
    done = [d for d, _ in seen]
    assert len(seen) > 8 and done == sorted(done)
    assert len({t for _, t in seen}) == 1 and done[-1] == seen[-1][1]


def test_memory_with_the_most_channels_stays_bounded(tmp_path):
    """A dense 256 MiB guest from either layout into mapped-ram with 255 channels: the
    in-flight pages are shared out among the channels, so peak RSS is about that of one."""
    data = pattern_block(256 << 8)
    src = write_snapshot(tmp_path / "in.sav", {"pc.ram": data})
    stream = tmp_path / "s.sav"
    mappedram.convert(src, stream, "stream")
    del data
    peaks = {}
    for what, path in (("mapped-ram", src), ("stream", stream)):
        for count in (1, MAX_CHANNELS):
            out = tmp_path / f"out-{what}-{count}.sav"
            rss, code = peak_rss_kib("convert", str(path), str(out), "--to", "mapped-ram", "--channels", str(count))
            assert code == 0
            peaks[what, count] = rss
        assert filecmp.cmp(tmp_path / f"out-{what}-1.sav", out, shallow=False)
        os.unlink(out)
    for what in ("mapped-ram", "stream"):
        one, most = peaks[what, 1], peaks[what, MAX_CHANNELS]
        assert most < 100 << 10 and most < one + (40 << 10), (what, one, most)


INTERRUPTED = textwrap.dedent(
    r"""
    import os, sys, time
    import mappedram.mapper.convert as c
    from mappedram.cli import main
    real = c._put_parts
    def slow(*args):  # a slow disk under the channels' writes of a forward pass
        os.write(1, b"writing\n")
        time.sleep(1)
        real(*args)
    c._put_parts = slow
    sys.exit(main(["convert", sys.argv[1], sys.argv[2], "--to", "mapped-ram", "--channels", "3"]))
    """
)


def test_ctrl_c_during_a_forward_pass_with_channels(tmp_path):
    """The main thread is blocked handing over writes (the queue is full) when Ctrl-C
    comes: exit 130 with one line, no output, no temporary file."""
    code, stderr = interrupted(INTERRUPTED, fixture_file(FIXTURES["classic"]), tmp_path / "out.sav")
    assert code == 130, stderr
    assert stderr == "mappedram: interrupted\n"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind", ["mapped-ram", "classic"])
def test_writeback_starts_every_32_mib_handed_to_the_channels(kind, tmp_path, monkeypatch):
    """output.Writeback still has the disk start on the output once per WRITEBACK_BYTES
    of pages, counted as the main thread hands them over."""
    from mappedram.mapper import output

    started: list[int] = []
    monkeypatch.setattr(output, "sync_file_range", lambda: started.append)
    src = fixture_file(FIXTURES[kind])
    with mappedram.open(src) as snap:
        page_bytes = sum(b.populated * b.page_size for b in snap)
    mappedram.convert(src, tmp_path / "out.sav", "mapped-ram", channels=4)
    assert page_bytes >= output.WRITEBACK_BYTES and len(started) == page_bytes // output.WRITEBACK_BYTES
    assert all(isinstance(fd, int) for fd in started)
