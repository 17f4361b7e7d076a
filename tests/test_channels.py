"""Channel threads: any allowed count completes, bad counts are refused, failures and
Ctrl-C end cleanly (no hang, no leaked descriptor, no partial file)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from craft import pattern_block, write_snapshot

import mappedram
from mappedram.cli import main
from mappedram.mapper.channels import MAX_CHANNELS, Channels
from mappedram.mapper.writer import SnapshotWriter


def _open_fds():
    return sorted(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("channels", [1, 8, 9, 16, 33])
def test_writer_and_restore_with_many_channels(tmp_path, channels):
    """More channels than queue slots (8 with the default batch): every thread gets its stop."""
    data = pattern_block(3000, zero=tuple(range(50, 90)))
    path = tmp_path / "vm.sav"
    before = _open_fds()
    with SnapshotWriter(path, {"pc.ram": data}, channels=channels) as writer:
        writer.save_round()
        data[5 * 4096] ^= 0xFF
        writer.complete()
    assert mappedram.verify(path).ok
    assert np.array_equal(mappedram.restore(path, channels=channels)["pc.ram"], data)
    assert _open_fds() == before


@pytest.mark.parametrize("channels", ["16", "33"])
def test_cli_convert_with_many_channels(tmp_path, channels):
    src = write_snapshot(tmp_path / "in.sav", {"pc.ram": pattern_block(512)})
    stream = tmp_path / "s.sav"
    back = tmp_path / "m.sav"
    assert main(["convert", str(src), str(stream), "--to", "stream"]) == 0
    assert main(["convert", str(stream), str(back), "--to", "mapped-ram", "--channels", channels]) == 0
    assert mappedram.verify(back).ok
    assert np.array_equal(mappedram.restore(back)["pc.ram"], mappedram.restore(src)["pc.ram"])


@pytest.mark.parametrize("count", ["0", "-3", "256", "100000", "0x100"])
def test_cli_refuses_bad_channel_counts(tmp_path, capsys, count):
    src = write_snapshot(tmp_path / "in.sav", {"pc.ram": pattern_block(4)})
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(src), str(tmp_path / "out"), "--to", "mapped-ram", "--channels", count])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (
        f"mappedram convert: argument --channels: expected a number from 1 to {MAX_CHANNELS}, found {count!r}"
        " (see mappedram convert -h)\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.sav"]


@pytest.mark.parametrize("count", [0, -3, MAX_CHANNELS + 1, 100000, 2.0, True])
def test_library_refuses_bad_channel_counts(tmp_path, count):
    before = _open_fds()
    with pytest.raises(ValueError, match=f"channels: a number from 1 to {MAX_CHANNELS}"):
        SnapshotWriter(tmp_path / "vm.sav", {"pc.ram": pattern_block(4)}, channels=count)
    src = write_snapshot(tmp_path / "in.sav", {"pc.ram": pattern_block(4)})
    with pytest.raises(ValueError, match="channels: a number"):
        mappedram.restore(src, channels=count)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.sav"]
    assert _open_fds() == before


def test_out_of_descriptors_fails_cleanly(tmp_path):
    """Opening the channels runs out of descriptors part-way: the real error surfaces, the
    threads started so far stop, every descriptor opened is closed, no file is left."""
    before = _open_fds()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(before) + 40, hard))
    try:
        with pytest.raises(OSError) as err:
            SnapshotWriter(tmp_path / "vm.sav", {"pc.ram": pattern_block(64)}, channels=MAX_CHANNELS)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert err.value.errno == 24  # EMFILE, not "cannot join thread before it is started"
    assert err.value.filename == str(tmp_path / "vm.sav")  # the file asked for, not the temporary one
    assert _open_fds() == before
    assert os.listdir(tmp_path) == []


def test_channel_error_with_many_channels_ends(tmp_path):
    """A failing work item with a full queue: sync re-raises, close still ends."""

    def fail(fd, item):
        raise RuntimeError(f"item {item}")

    path = tmp_path / "f"
    path.write_bytes(b"")
    before = _open_fds()
    pool = Channels(str(path), 20, os.O_RDONLY, fail, depth=2)
    try:
        for i in range(50):
            try:
                pool.submit(i)
            except RuntimeError:
                break
        with pytest.raises(RuntimeError, match="item"):
            pool.sync()
    finally:
        pool.close()
    assert _open_fds() == before


INTERRUPTED = textwrap.dedent(
    r"""
    import os, sys, threading, time
    import mappedram.mapper.convert as c
    from mappedram.cli import main
    real = c.copy_range
    def slow(*args):  # a slow disk under convert's page copy
        os.write(1, b"writing\n")
        time.sleep(1)
        real(*args)
    c.copy_range = slow
    sys.exit(main(["convert", sys.argv[1], sys.argv[2], "--to", "mapped-ram", "--channels", "16"]))
    """
)


def interrupted(script: str, *args: object) -> tuple[int, str]:
    """Run ``script`` with ``args`` in a child, send it SIGINT once it prints "writing";
    its exit code and stderr."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "writing\n"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr


def test_ctrl_c_during_convert(tmp_path):
    src = write_snapshot(tmp_path / "in.sav", {"pc.ram": pattern_block(8192)})  # 32 MiB: 4 items
    code, stderr = interrupted(INTERRUPTED, src, tmp_path / "out.sav")
    assert code == 130, stderr
    assert stderr == "mappedram: interrupted\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.sav"]  # no output, no .partial
