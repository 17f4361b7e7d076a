"""tests/fixtures/make.py, run again: its fresh save has the structure of the committed twin.

The guest's counters run, so the files are not byte-identical; what QEMU decides (layout,
blocks, offsets, which pages are saved, the firmware and ROM blocks) and the guest's stamps
must be the same. Without QEMU 10 and GNU as this skips; under CI (CI=true) it must run.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import numpy as np
import pytest
from conftest import REPO, fixture_file, load_manifest
from qemu_vm import qemu_binary

import mappedram

if qemu_binary() is None or shutil.which("as") is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI needs qemu-system-x86_64 >= 10 and GNU as: run .ci/install-qemu")
    pytest.skip("needs qemu-system-x86_64 >= 10.0 and GNU as (see .ci/install-qemu)", allow_module_level=True)

pytestmark = pytest.mark.qemu

NAME = "pc64-a-paused-mr"
SAME = (
    "machine_type",
    "format",
    "stream_start",
    "libvirt",
    "capabilities_in_stream",
    "configuration_subsections",
    "target_page_size",
    "ram_total",
    "stamps",
)
SAME_PER_BLOCK = ("name", "used_length", "page_size", "bitmap_offset", "pages_offset", "pages_total", "pages_present")


def load_make():
    spec = importlib.util.spec_from_file_location("fixtures_make", REPO / "tests" / "fixtures" / "make.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    make = load_make()
    return make.make(make.SPECS[NAME], tmp_path_factory.mktemp("regen"))


def test_manifest_structure_matches_committed(regenerated):
    _, new = regenerated
    old = load_manifest(f"{NAME}.bin")
    assert {k: new[k] for k in SAME} == {k: old[k] for k in SAME}
    per_block = [[{k: b[k] for k in SAME_PER_BLOCK} for b in m["blocks"]] for m in (new, old)]
    assert per_block[0] == per_block[1]
    # firmware, ROMs, ACPI tables and the VGA text screen are the same every boot; main RAM is not
    main = old["stamps"]["block"]
    assert [b["sha256"] for b in new["blocks"] if b["name"] != main] == [
        b["sha256"] for b in old["blocks"] if b["name"] != main
    ]
    # Not the file's size: device state carries optional subsections that QEMU sends only when
    # needed (timer and RTC state differ from boot to boot on a busy machine).


def test_stamped_pages_match_committed(regenerated):
    path, new = regenerated
    stamps = new["stamps"]
    pages = slice(stamps["first_page"], stamps["end_page"])

    def stamp_words(p):
        with mappedram.open(p) as snap:
            block = snap.block(stamps["block"])
            return block.read().view("<u4").reshape(block.num_pages, -1)[pages, 1:4]

    fresh, committed = stamp_words(path), stamp_words(fixture_file(f"{NAME}.bin"))
    assert np.array_equal(fresh, committed)
    assert (fresh[:, 0] == 0x4D415250).all()  # the stamps, not two equal blanks
    assert mappedram.verify(path).ok
