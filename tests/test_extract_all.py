"""extract --all: every block, desc.json, state.json and blocks.json in one directory."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from craft import PAGE, pattern_block, write_snapshot
from test_verdicts import ignore_shared_file

import mappedram
from mappedram.cli import main
from mappedram.mapper.extract_all import safe_names
from mappedram.mapper.output import TEMP_SUFFIX


def load_map(directory: Path) -> dict:
    return json.loads((directory / "blocks.json").read_text())


def assert_blocks_equal(path: Path, directory: Path) -> dict:
    """Every block file holds exactly block.read(); returns the map."""
    summary = load_map(directory)
    with mappedram.open(path) as snap:
        assert list(summary["blocks"]) == list(snap.blocks)
        for name, entry in summary["blocks"].items():
            block = snap.block(name)
            assert (entry["used_length"], entry["pages_present"], entry["in_file"]) == (
                block.used_length,
                block.populated,
                block.in_file,
            )
            if entry["path"] is None:
                continue
            out = directory / entry["path"]
            assert out.parent == directory
            assert np.array_equal(np.fromfile(out, dtype=np.uint8), block.read()), name
    return summary


def test_real_file_every_block_desc_and_state(tmp_path, paused_mr, capsys):
    out = tmp_path / "all"
    assert main(["extract", str(paused_mr), "--all", "-o", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    summary = assert_blocks_equal(paused_mr, out)
    assert summary["blocks"]["0000:00:02.0/vga.vram"]["path"] == "0000_00_02.0_vga.vram.raw"
    assert summary["blocks"]["/rom@etc/acpi/tables"]["path"] == "_rom_etc_acpi_tables.raw"
    assert f"0000:00:02.0/vga.vram: {out}/0000_00_02.0_vga.vram.raw" in lines
    with mappedram.open(paused_mr) as snap:
        assert json.loads((out / "desc.json").read_text()) == snap.vmdesc
        vram = snap.block("0000:00:02.0/vga.vram")
        assert vram.populated < vram.num_pages  # the clear pages are holes in its file
        assert os.stat(out / summary["blocks"][vram.name]["path"]).st_blocks * 512 < vram.used_length
        state = json.loads((out / "state.json").read_text())
        cpu = next(d for d in state["devices"] if d["idstr"] == "cpu" and d["instance_id"] == 0)
        assert cpu["fields"]["env.cr[3]"] == snap.device_state("cpu", 0)["env.cr[3]"]
    assert main(["dump", "--state", "--json", str(paused_mr)]) == 0
    assert capsys.readouterr().out == (out / "state.json").read_text()  # what dump prints, byte for byte
    assert main(["dump", "--desc", str(paused_mr)]) == 0
    assert capsys.readouterr().out == (out / "desc.json").read_text()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["blocks.json", "desc.json", "state.json"] + [e["path"] for e in summary["blocks"].values()]
    )


HOSTILE = [
    "../x",
    "a/b:c",
    "a_b_c",  # the same safe name as the one before
    "A/B:C",  # the same again, but for case
    "..",
    ".hidden",
    "esc\x1b[31mred\nline",
    "blocks.json",
    "é" * 127,  # 254 bytes of UTF-8
    "n" * 255,
]


def test_hostile_names_stay_inside_and_apart(tmp_path, capsys):
    blocks = {name: pattern_block(2, seed=i + 1) for i, name in enumerate(HOSTILE)}
    path = write_snapshot(tmp_path / "hostile.sav", blocks)
    out = tmp_path / "all"
    assert main(["extract", str(path), "--all", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "\x1b" not in printed and "esc\\x1b[31mred\\x0aline" in printed
    summary = assert_blocks_equal(path, out)
    paths = [e["path"] for e in summary["blocks"].values()]
    assert len({p.lower() for p in paths}) == len(HOSTILE)  # distinct, even without case
    assert all(p.endswith(".raw") and not p.startswith(".") and "/" not in p for p in paths)
    assert all(len(p.encode()) <= 255 for p in paths)
    assert paths[:6] == ["_._x.raw", "a_b_c.raw", "a_b_c~2.raw", "A_B_C~3.raw", "_..raw", "_hidden.raw"]
    assert summary["blocks"]["blocks.json"]["path"] == "blocks.json.raw"
    assert sorted(tmp_path.iterdir()) == sorted([out, path])  # nothing written outside OUT


def test_safe_names_rules():
    assert safe_names(["", ".", "a b", "x~2", "x"]) == {
        "": "_.raw",
        ".": "_~2.raw",  # a leading dot becomes "_", which "" took
        "a b": "a_b.raw",
        "x~2": "x_2.raw",  # "~" is not kept: no sanitised name looks like a disambiguated one
        "x": "x.raw",
    }


def test_existing_files_need_force(tmp_path, paused_mr, capsys):
    out = tmp_path / "all"
    out.mkdir()
    (out / "unrelated").write_text("kept")
    assert main(["extract", str(paused_mr), "--all", "-o", str(out)]) == 0  # an existing directory is fine
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
    capsys.readouterr()
    assert main(["extract", str(paused_mr), "--all", "-o", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].endswith("exists; give --force to replace it"), err
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()} == before
    assert main(["extract", str(paused_mr), "--all", "-o", str(out), "--force"]) == 0
    after = {p.name: p.stat().st_ino for p in out.iterdir()}
    assert after.keys() == before.keys() and after["pc.ram.raw"] != before["pc.ram.raw"][0]
    assert (out / "unrelated").read_text() == "kept"
    assert not [p for p in out.iterdir() if p.name.endswith(TEMP_SUFFIX)]


def test_one_existing_file_refuses_everything(tmp_path, paused_mr, capsys):
    out = tmp_path / "all"
    out.mkdir()
    (out / "state.json").write_text("mine")
    assert main(["extract", str(paused_mr), "--all", "-o", str(out)]) == 2
    assert "state.json: exists; give --force" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["state.json"]  # nothing written before the refusal
    assert (out / "state.json").read_text() == "mine"
    with mappedram.open(paused_mr) as snap, pytest.raises(FileExistsError):
        mappedram.extract_all(snap, out, overwrite=False)


@pytest.mark.parametrize("mode, dir_mode", [(0o600, 0o700), (0o640, 0o750), (0o644, 0o755)])
def test_modes_follow_the_input(tmp_path, mode, dir_mode):
    path = write_snapshot(tmp_path / "in.sav", {"pc.ram": pattern_block(4)})
    path.chmod(mode)
    out = tmp_path / "all"
    old = os.umask(0o022)
    try:
        with mappedram.open(path) as snap:
            mappedram.extract_all(snap, out)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == mode, p


def test_a_file_as_directory_is_refused(tmp_path, paused_mr, capsys):
    out = tmp_path / "file"
    out.write_text("x")
    assert main(["extract", str(paused_mr), "--all", "-o", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"mappedram: {out}: is not a directory; name a directory to write into"]
    assert main(["extract", str(paused_mr), "--all", "-o", str(tmp_path / "no" / "such")]) == 2
    assert "No such file or directory" in capsys.readouterr().err


def test_ignore_shared_block_listed_not_written(tmp_path, capsys):
    path = ignore_shared_file(tmp_path / "shared.sav")
    out = tmp_path / "all"
    assert main(["extract", str(path), "--all", "-o", str(out)]) == 0
    assert "mem-shared: not in the file (x-ignore-shared)" in capsys.readouterr().out
    summary = assert_blocks_equal(path, out)
    assert summary["blocks"]["mem-shared"] == {
        "path": None,
        "in_file": False,
        "used_length": 256 * PAGE,
        "page_size": PAGE,
        "pages_present": 0,
    }
    assert (summary["desc"], summary["state"]) == (None, None)  # the file has no VM description
    assert sorted(p.name for p in out.iterdir()) == ["blocks.json", "pc.ram.raw"]


def test_progress_is_one_bar_over_all_blocks(tmp_path):
    blocks = {"a": pattern_block(300), "b": pattern_block(500, zero=tuple(range(100)))}
    path = write_snapshot(tmp_path / "two.sav", blocks)
    calls = []
    with mappedram.open(path) as snap:
        mappedram.extract_all(snap, tmp_path / "all", progress=lambda d, t: calls.append((d, t)))
    total = (300 + 400) * PAGE
    assert {t for _, t in calls} == {total}
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == total and len(calls) > 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--all", "--block", "pc.ram"], "argument --block: not allowed with argument --all"),
        ([], "one of the arguments --block --all is required"),
        (["--all", "--stale"], "--stale takes one --block, not --all"),
    ],
)
def test_usage(tmp_path, paused_mr, capsys, args, message):
    try:
        code = main(["extract", str(paused_mr), "-o", str(tmp_path / "x"), *args])
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x").exists()


def test_a_nul_in_a_name_from_the_file(tmp_path, capsys):
    """QEMU ends a name at a NUL, but the file may hold one: it becomes "_" like any control."""
    from craft import block_info, patch

    path = write_snapshot(tmp_path / "nul.sav", {"abXcd": pattern_block(2)})
    patch(path, block_info(path, "abXcd")["entry_offset"] + 3, b"\0")
    out = tmp_path / "all"
    assert main(["extract", str(path), "--all", "-o", str(out)]) == 0
    assert "ab\\x00cd: " in capsys.readouterr().out
    assert assert_blocks_equal(path, out)["blocks"]["ab\0cd"]["path"] == "ab_cd.raw"
