"""The findings of the independent review (notes/review-findings.md), each with a test
that fails without its fix."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import stat
import subprocess
import sys
from xml.etree import ElementTree

import pytest
from conftest import fixture_file
from craft import patch, pattern_block, write_snapshot

import mappedram
from mappedram.cli import main
from mappedram.mapper.encoder import DeviceState
from mappedram.visual import diff, plot, report

pytest.importorskip("matplotlib")

# The picture/page commands, each given (input A, input B, output).
VISUAL = {
    "plot": lambda a, b, out: ["plot", a, "-o", out],
    "report": lambda a, b, out: ["report", a, "-o", out],
    "diff-plot": lambda a, b, out: ["diff", a, b, "--plot", out],
}


@pytest.fixture
def pair(tmp_path):
    a = write_snapshot(tmp_path / "a.sav", {"pc.ram": pattern_block(8, zero=(2,))})
    b = write_snapshot(tmp_path / "b.sav", {"pc.ram": pattern_block(8, zero=(3,))})
    return a, b


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _one_error_line(capsys, path, text):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"mappedram: {path}: ") and text in err, err


# -- 1. the pictures and the report never replace an input ----------------------------------
@pytest.mark.parametrize("kind, which", [("plot", "a"), ("report", "a"), ("diff-plot", "a"), ("diff-plot", "b")])
@pytest.mark.parametrize("via", ["same", "symlink", "hardlink"])
def test_visual_output_onto_an_input_refused(pair, tmp_path, capsys, kind, via, which):
    target = pair[0] if which == "a" else pair[1]
    before = _sha(target)
    out = {"same": target, "symlink": tmp_path / "l.svg", "hardlink": tmp_path / "h.svg"}[via]
    if via == "symlink":
        out.symlink_to(target)
    elif via == "hardlink":
        os.link(target, out)
    if kind != "report" and via == "same":  # the picture's name must end in .png/.svg
        out = tmp_path / "s.png"
        os.rename(target, out)
        target = out
        pair = (out, pair[1]) if which == "a" else (pair[0], out)
    assert main([*VISUAL[kind](str(pair[0]), str(pair[1]), str(out)), "--force"]) == 2
    _one_error_line(capsys, out, "is the input file")
    assert _sha(target) == before and mappedram.verify(target).ok


@pytest.mark.parametrize("kind", VISUAL)
def test_visual_output_refused_before_the_work(pair, tmp_path, capsys, monkeypatch, kind):
    def not_reached(*args, **kwargs):
        raise AssertionError("the work began before the output was checked")

    monkeypatch.setattr(plot, "snapshot_figure", not_reached)
    monkeypatch.setattr(report, "render_report", not_reached)
    monkeypatch.setattr(diff, "diff", not_reached)  # the commands import their modules when they run
    out = tmp_path / "exists.svg"
    out.write_bytes(b"keep me")
    assert main(VISUAL[kind](str(pair[0]), str(pair[1]), str(out))) == 2
    _one_error_line(capsys, out, "exists; give --force")
    assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize("kind", VISUAL)
def test_visual_output_no_more_readable_than_its_inputs(pair, tmp_path, capsys, kind):
    old = os.umask(0)
    try:
        os.chmod(pair[0], 0o640)
        os.chmod(pair[1], 0o604)
        out = tmp_path / "out.svg"
        assert main(VISUAL[kind](str(pair[0]), str(pair[1]), str(out))) in (0, 1)
    finally:
        os.umask(old)
    expected = {"plot": 0o640, "report": 0o640, "diff-plot": 0o600}[kind]
    assert stat.S_IMODE(os.stat(out).st_mode) == expected


# -- 2. names from the VM description are escaped in dump --state and in the report ---------
RENAMED = {"env.regs": "\x1bXY", "env.eip": "\u20282"}  # an ESC; a line separator


@pytest.fixture(scope="module")
def renamed_fields(tmp_path_factory):
    """fixture A's devices, whose description names two cpu fields with control characters."""
    with mappedram.open(fixture_file("pc64-a-paused-mr.bin")) as snap:
        devices = DeviceState.from_snapshot(snap)
    descriptions = copy.deepcopy(devices.descriptions)
    cpu = next(d for d in descriptions if d["name"] == "cpu")
    for f in cpu["fields"]:
        f["name"] = RENAMED.get(f["name"], f["name"])
    devices = dataclasses.replace(devices, descriptions=descriptions)
    path = tmp_path_factory.mktemp("vd") / "vd.sav"
    return write_snapshot(path, {"pc.ram": pattern_block(4)}, devices=devices, machine_type=devices.machine_type)


def test_dump_state_escapes_field_names(renamed_fields, capsys):
    assert mappedram.verify(renamed_fields).ok
    assert main(["dump", str(renamed_fields), "--state"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u2028" not in out
    lines = out.split("\n")
    assert any(line.strip().startswith("\\x1bXY: [0x") for line in lines)
    assert any(line.strip().startswith("\\u20282: 0x") for line in lines)
    assert all(line.isprintable() for line in lines)


def test_report_escapes_control_characters(renamed_fields, tmp_path, monkeypatch):
    monkeypatch.setattr(report.plot, "snapshot_figure", _no_matplotlib)
    page, verdict = report.render_report(renamed_fields)
    assert verdict.ok
    assert "\\x1bXY" in page and "\\u20282" in page  # in the devices table's first fields
    assert all(ch.isprintable() or ch == "\n" for ch in page)


def _no_matplotlib(snap):
    raise plot.MissingMatplotlib("no picture in this test")


# -- 3. only a regular file is read: a FIFO does not hang, a device is not "malformed" ---------
def test_fifo_input_refused_without_hanging(tmp_path):
    fifo = tmp_path / "ff"
    os.mkfifo(fifo)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for argv in (["dump", str(fifo)], ["verify", str(fifo), "--json"], ["report", str(fifo), "-o", "r.html"]):
        run = subprocess.run(
            [sys.executable, "-m", "mappedram", *argv],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=60,
        )
        assert run.returncode == 2, run
        assert "not a regular file (a FIFO or pipe)" in run.stdout + run.stderr
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("path, kind", [("/dev/zero", "a character device"), ("/dev/urandom", "a character device")])
def test_device_input_refused(capsys, path, kind):
    assert main(["dump", path]) == 2
    assert capsys.readouterr().err == f"mappedram: {path}: not a regular file ({kind}); give the snapshot file\n"


def test_directory_and_fifo_refused_by_the_library(tmp_path, pair):
    fifo = tmp_path / "ff"
    os.mkfifo(fifo)
    for path, kind in ((tmp_path, "a directory"), (fifo, "a FIFO or pipe")):
        with pytest.raises(OSError, match=rf"not a regular file \({kind}\)") as err:
            mappedram.open(path)
        assert err.value.filename == str(path)
    with pytest.raises(OSError, match="a FIFO or pipe"):
        mappedram.diff(pair[0], fifo)
    with mappedram.open(pair[0]) as snap:  # a regular file reads as before
        assert os.get_blocking(snap.fd) and snap.block("pc.ram").populated == 7


# -- 4. names reach matplotlib escaped; its warnings do not reach stderr; the SVG is XML ------
EVIL = "evil\nmappedram: x.bin: valid\x1b[31m"


@pytest.fixture(scope="module")
def evil_names(tmp_path_factory):
    """Blocks named with a newline and ESC, 250 characters, and a NUL (patched in: the
    writer refuses it)."""
    path = tmp_path_factory.mktemp("evil") / "evil.sav"
    write_snapshot(path, {EVIL: pattern_block(4), "x" * 250: pattern_block(1), "xNy": pattern_block(2)})
    with mappedram.open(path) as snap:
        entry = snap.block("xNy").entry_offset  # the name's length byte, then the name
    patch(path, entry + 2, b"\0")
    with mappedram.open(path) as snap:
        assert "x\0y" in snap.blocks
    return path


@pytest.mark.parametrize("kind", ["plot", "diff-plot", "report"])
def test_pictures_of_evil_names(evil_names, tmp_path, kind):
    out = tmp_path / ("out.html" if kind == "report" else "out.svg")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    argv = VISUAL[kind](str(evil_names), str(evil_names), str(out))
    run = subprocess.run([sys.executable, "-m", "mappedram", *argv], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # no matplotlib warning (missing glyph, layout) on success
    data = out.read_text()
    assert "\x1b" not in data and "\0" not in data
    if kind == "report":
        assert "x\\x00y" in data and "evil\\x0amappedram: x.bin: valid\\x1b[31m" in data
    else:
        ElementTree.parse(out)  # well-formed XML
        if kind == "plot":
            assert "x\\x00y" in data and "evil\\x0amappedram: x.bin: valid\\x1b[31m" in data


# -- 5. plot and report stay bounded with thousands of blocks ---------------------------------
# VmHWM: this process's peak RSS (ru_maxrss would carry the forking parent's over exec)
MEASURE = """
import sys
from mappedram.cli import main
code = main(sys.argv[1:])
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(code, hwm.split()[1])  # KiB
"""


@pytest.fixture(scope="module")
def many_blocks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("many")
    one = pattern_block(1)
    a = write_snapshot(directory / "a.sav", {f"b{i}": one for i in range(3000)})
    b = write_snapshot(directory / "b.sav", {f"b{i}": one if i % 3 else pattern_block(1, seed=2) for i in range(3000)})
    return a, b


@pytest.mark.parametrize("kind", VISUAL)
def test_many_blocks_bounded_memory(many_blocks, tmp_path, kind):
    out = tmp_path / ("out.html" if kind == "report" else "out.svg")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    argv = VISUAL[kind](str(many_blocks[0]), str(many_blocks[1]), str(out))
    run = subprocess.run(  # the timeout only stops a runaway child: nothing here is timed
        [sys.executable, "-c", MEASURE, *argv], capture_output=True, text=True, env=env, timeout=600
    )
    code, peak_kib = map(int, run.stdout.split()[-2:])
    assert code == (1 if kind == "diff-plot" else 0), run.stderr
    assert peak_kib < 300 << 10, f"peak RSS {peak_kib >> 10} MiB"
    text = out.read_text()
    if kind == "plot":
        assert "the 24 largest blocks drawn; 2976 smaller blocks not drawn" in text
        assert "smaller parts not drawn" in text
    elif kind == "diff-plot":
        assert "1000 pages differ" in text and "976 more blocks differ in fewer pages, not drawn" in text
    else:
        assert text.count("<tr>") > 3000  # the tables list every block; only the picture is capped


# -- 6. option values: diff --workers bounded, --hash-zeros implies --hash, diff --offset ------
@pytest.mark.parametrize("value", ["0", "-1", "100000", "x"])
def test_diff_workers_out_of_range(pair, capsys, value):
    with pytest.raises(SystemExit) as stop:
        main(["diff", str(pair[0]), str(pair[1]), "--workers", value])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"expected a number from 1 to 64, found '{value}'" in err and err.count("\n") <= 3  # usage + the line
    with pytest.raises(ValueError, match="from 1 to 64"):
        mappedram.diff(pair[0], pair[1], workers=int(value) if value != "x" else 0)


def test_hash_zeros_implies_hash(pair, capsys):
    assert main(["verify", str(pair[0]), "--hash", "--hash-zeros"]) == 0
    both = capsys.readouterr().out
    assert main(["verify", str(pair[0]), "--hash-zeros"]) == 0
    assert capsys.readouterr().out == both
    ram = mappedram.restore(pair[0])["pc.ram"]
    assert both == f"{hashlib.sha256(ram.tobytes()).hexdigest()}  pc.ram\n{pair[0]}: valid\n"


def test_diff_offset_applies_to_both_files(tmp_path, capsys):
    prefix = b"\xa5" * (3 << 20)  # past the first MiB: not found without --offset
    a = write_snapshot(tmp_path / "a.sav", {"pc.ram": pattern_block(8, zero=(2,))}, prefix=prefix)
    b = write_snapshot(tmp_path / "b.sav", {"pc.ram": pattern_block(8, zero=(5,))}, prefix=prefix)
    assert main(["diff", str(a), str(b)]) == 2
    capsys.readouterr()
    assert main(["diff", str(a), str(b), "--offset", str(len(prefix)), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result == mappedram.diff(a, b, offset=len(prefix)).describe()
    (ram,) = result["blocks"]
    assert (ram["name"], ram["pages_differ"], ram["runs"]) == ("pc.ram", 2, [[2, 1], [5, 1]])


# -- 7. extract --all refuses before writing anything when an entry is the input -------------
@pytest.mark.parametrize("name", ["blocks.json", "desc.json", "state.json", "pc.ram.raw"])
def test_extract_all_input_among_the_outputs(tmp_path, capsys, name):
    src = fixture_file("pc64-a-paused-mr.bin")
    before = _sha(src)
    out = tmp_path / "d3"
    out.mkdir()
    (out / name).symlink_to(src)
    assert main(["extract", str(src), "--all", "-o", str(out), "--force"]) == 2
    _one_error_line(capsys, out / name, "is the input file")
    assert sorted(p.name for p in out.iterdir()) == [name]  # nothing written
    assert _sha(src) == before


def test_library_arguments_are_the_callers_mistake_not_the_files(paused_mr):
    """A bad argument is a ValueError/IndexError naming the argument, never a FormatError
    that blames the file, and never a quiet wrong answer."""
    with pytest.raises(ValueError, match="page_size: expected a power of two"):
        mappedram.open(paused_mr, page_size=3)
    with mappedram.open(paused_mr) as snap:
        for bad in (123, -4096, (1 << 32) + 4096):
            with pytest.raises(ValueError, match="below_4g_size: expected a multiple of 4096"):
                mappedram.PhysicalView(snap, below_4g_size=bad)
        view = mappedram.PhysicalView(snap)
        with pytest.raises(ValueError, match="at least 0 bytes"):
            view.read(0, -1)
        ram = snap.block("pc.ram")
        for index in (-1, ram.num_pages):
            with pytest.raises(IndexError, match=f"page {index} outside block 'pc.ram'"):
                ram.page_offset(index)
            with pytest.raises(IndexError):
                ram.page(index)
