"""Crash safety: a save killed at any point, or failing on a full disk, never costs the
previous file, and nothing it leaves behind passes for a valid snapshot."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from craft import pattern_block, write_snapshot

import mappedram

SAVER = textwrap.dedent(
    """
    import resource, signal, sys, time
    import numpy as np
    import mappedram
    path, limit = sys.argv[1], int(sys.argv[2])
    if limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    data = np.full(32 << 20, 7, dtype=np.uint8)
    try:
        with mappedram.SnapshotWriter(path, {"pc.ram": data}, channels=2) as writer:
            for i in range(6):
                data[i * 4096 :: 1 << 20] += 1
                writer.save_round()
                time.sleep(0.05)
            writer.complete()
    except OSError as err:
        print(f"save failed: {err.strerror}", file=sys.stderr)
        sys.exit(1)
    """
)


@pytest.fixture
def previous(tmp_path):
    path = write_snapshot(tmp_path / "vm.sav", {"pc.ram": pattern_block(32)})
    return path, path.read_bytes()


def _is_the_complete_save(path):
    expected = np.full(32 << 20, 7, dtype=np.uint8)
    for i in range(6):
        expected[i * 4096 :: 1 << 20] += 1
    return np.array_equal(mappedram.restore(path)["pc.ram"], expected)


def _leftovers(directory, keep):
    return [p for p in directory.iterdir() if p.name != keep.name]


def test_sigkill_at_many_points(previous, tmp_path):
    path, before = previous
    replaced = 0
    for delay in (0.05, 0.15, 0.3, 0.45, 0.6, 0.8, 1.0, 1.3, 1.7, 2.5):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path), "0"])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        report = mappedram.verify(path)
        assert report.ok, (delay, report.problems)
        if path.read_bytes() != before:  # the save got to its rename: the new file is whole
            replaced += 1
            assert _is_the_complete_save(path)
            before = path.read_bytes()
        for partial in _leftovers(tmp_path, path):
            assert partial.name.endswith(".partial")
            if mappedram.verify(partial).ok:  # killed between its last write and the rename:
                assert _is_the_complete_save(partial)  # then it is whole, never half-written
            partial.unlink()
    assert replaced < 10  # most kills landed before the end


def test_disk_full_keeps_previous_file(previous, tmp_path):
    path, before = previous
    run = subprocess.run([sys.executable, "-c", SAVER, str(path), str(8 << 20)], capture_output=True, text=True)
    assert run.returncode == 1
    assert "save failed: File too large" in run.stderr
    assert path.read_bytes() == before
    assert _leftovers(tmp_path, path) == []
    assert mappedram.verify(path).ok


def test_stale_partial_never_verifies(tmp_path):
    """A writer that stops before complete() leaves a file with no QEVM magic."""
    path = tmp_path / "never.sav"
    writer = mappedram.SnapshotWriter(path, {"pc.ram": pattern_block(8)})
    writer.save_round()
    partial = next(p for p in tmp_path.iterdir() if p.name.endswith(".partial"))
    report = mappedram.verify(partial)
    assert [(p.offset, p.text.split(",")[0]) for p in report.problems] == [
        (0, "expected the QEVM magic (a QEMU migration stream)")
    ]
    writer.abort()
    assert not os.listdir(tmp_path)
