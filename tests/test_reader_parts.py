"""The reader in parts: a file that shrinks under an open Snapshot, the layout stated once,
the copy plan, and the facade's public attributes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, fixture_file

MR = "pc64-a-paused-mr.bin"
STREAM = "pc64-d-paused-legacy.bin"

# Runs in a child process, so that a SIGBUS shows as a negative return code instead of
# killing pytest. Opens one Snapshot per operation, shrinks the file, then runs each
# operation and prints what it did: "ok" or the exception's class and text.
_SHRINK_SCRIPT = r"""
import json, os, sys
import numpy as np
import mappedram
from mappedram.mapper.verify import block_sha256

path, cut, walked, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
OPS = ["page", "read", "read_into", "restore_into", "extents", "extract", "sha256", "verify"]
snaps = {op: mappedram.open(path) for op in OPS}
first = snaps["page"]
name = max(first.blocks.values(), key=lambda b: b.used_length).name
if walked:
    for snap in snaps.values():
        snap.sections  # the whole stream walked, the page index built, before the cut
with open(path, "r+b") as f:
    f.truncate(cut)

def last_page(snap):
    block = snap.block(name)
    ext = list(block.extents())[-1]
    return block.page(ext.first_page + ext.count - 1)

ops = {
    "page": lambda s: len(last_page(s)),
    "read": lambda s: s.block(name).read(),
    "read_into": lambda s: s.block(name).read_into(np.zeros(s.block(name).used_length, np.uint8)),
    "restore_into": lambda s: s.restore_into({name: np.zeros(s.block(name).used_length, np.uint8)}, channels=2),
    "extents": lambda s: sum(e.count for e in s.block(name).extents()),
    "extract": lambda s: mappedram.extract(s, name, os.path.join(out_dir, "out.raw")),
    "sha256": lambda s: block_sha256(s.block(name)),
    "verify": lambda s: mappedram.verify(path, hash_blocks=True).ok or "not valid",
}
result = {}
for op in OPS:
    try:
        value = ops[op](snaps[op])
        result[op] = ["ok", str(value)[:80]]
    except (mappedram.FormatError, OSError) as err:
        result[op] = [type(err).__name__, str(err)]
print(json.dumps(result))
"""


def _shrink(tmp_path: Path, fixture: str, fraction: float, walked: bool) -> dict[str, list[str]]:
    path = tmp_path / "shrinking.sav"
    shutil.copyfile(fixture_file(fixture), path)
    cut = int(path.stat().st_size * fraction)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _SHRINK_SCRIPT, str(path), str(cut), "1" if walked else "0", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def _assert_refused(result: dict[str, list[str]], ops: list[str]) -> None:
    for op in ops:
        kind, text = result[op]
        if op == "verify":
            assert kind == "ok" and text == "not valid", (op, kind, text)
            continue
        assert kind in ("FormatError", "OSError"), (op, kind, text)
        assert "offset" in text and "expected" in text, (op, text)


DATA_OPS = ["page", "read", "read_into", "restore_into", "extract", "sha256", "verify"]


@pytest.mark.parametrize("fraction", [0.5, 0.0])
def test_mapped_ram_file_shrinking_under_an_open_snapshot(tmp_path, fraction):
    result = _shrink(tmp_path, MR, fraction, walked=False)
    _assert_refused(result, DATA_OPS)
    if fraction == 0.0:  # the bitmaps are gone too
        _assert_refused(result, ["extents"])
    else:  # the bitmaps sit in the first half: the extents are still readable
        assert result["extents"][0] == "ok" and int(result["extents"][1]) > 0
    assert not (tmp_path / "out.raw").exists()  # the failed extract left nothing behind


@pytest.mark.parametrize("fraction", [0.5, 0.0])
@pytest.mark.parametrize("walked", [False, True])
def test_stream_file_shrinking_under_an_open_snapshot(tmp_path, fraction, walked):
    result = _shrink(tmp_path, STREAM, fraction, walked)
    _assert_refused(result, DATA_OPS if walked else [*DATA_OPS, "extents"])
    if walked:  # the index was built before the cut: it still says where the pages were
        assert result["extents"][0] == "ok" and int(result["extents"][1]) > 0
    assert not (tmp_path / "out.raw").exists()
