"""The command line: option values, exit codes, --json on errors, escaped output, progress."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from craft import PAGE, patch, pattern_block, stream_claiming, write_snapshot

import mappedram
import mappedram.cli as cli
from mappedram import progress
from mappedram.cli import main
from mappedram.cli_args import parse_size
from mappedram.mapper import restore
from mappedram.mapper.convert import to_stream
from mappedram.progress import ProgressBar, end_line, human
from mappedram.textsafe import printable

EVIL = "\x1b[31m\nmappedram: F: valid\x1b]0;x\x07"


def usage_error(capsys, argv) -> str:
    """argparse's refusal: exit 2, one stderr line that says why."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    return line


@pytest.fixture
def small(tmp_path):
    return write_snapshot(tmp_path / "small.sav", {"pc.ram": pattern_block(8), "vga": pattern_block(2, seed=3)})


# -- option values -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, value",
    [("4096", 4096), ("0x1000", 4096), ("4K", 4096), ("4KiB", 4096), ("4kb", 4096), ("1M", 1 << 20), ("3G", 3 << 30)],
)
def test_sizes_take_hex_and_suffixes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--map", "pc.ram=zz"], "argument --map: expected BLOCK=ADDR with a number for ADDR, found 'pc.ram=zz'"),
        (
            ["--map", "pc.ram=18446744073709551616"],
            "argument --map: expected ADDR to be a guest-physical address below 0x10000000000000000, "
            "found 'pc.ram=18446744073709551616'",
        ),
        (
            ["--map", "vga=0x123"],
            "argument --map: expected ADDR to be a multiple of 4096 (the x86 page), found 'vga=0x123'",
        ),
        (["--map", "0xfd000000"], "argument --map: expected BLOCK=ADDR, e.g. vga.vram=0xfd000000, found '0xfd000000'"),
        (["--below-4g", "-1"], "argument --below-4g: expected a non-negative number of bytes"),
        (["--below-4g", "0x123"], "argument --below-4g: expected a multiple of 4096 (the x86 page) up to 4 GiB"),
        (["--below-4g", "5G"], "argument --below-4g: expected a multiple of 4096 (the x86 page) up to 4 GiB"),
        (["--offset", "-1"], "argument --offset: expected a non-negative number of bytes"),
        (["--offset", "0x8000000000000000"], "argument --offset: expected a file offset below 0x8000000000000000"),
        (
            ["--page-size", "0"],
            "argument --page-size: expected a power of two from 512 to 1073741824 (1 GiB), found '0'",
        ),
        (["--page-size", "3000"], "argument --page-size: expected a power of two from 512 to 1073741824"),
        (["--page-size", "2G"], "argument --page-size: expected a power of two from 512 to 1073741824"),
        (["--page-size", "9" * 5000], "argument --page-size: expected a non-negative number of bytes"),
    ],
)
def test_bad_option_values_are_usage_errors(capsys, small, tmp_path, argv, message):
    last = usage_error(capsys, ["export-elf", str(small), "-o", str(tmp_path / "core"), *argv])
    assert last.startswith("mappedram export-elf: " + message)
    assert not (tmp_path / "core").exists()


def test_map_past_the_64_bit_address_space(capsys, paused_mr, tmp_path):
    vram = "0000:00:02.0/vga.vram"  # 16 MiB
    argv = ["export-elf", str(paused_mr), "-o", str(tmp_path / "core"), "--map", f"{vram}=0xffffffffff000000"]
    assert main(argv) == 0  # ends exactly at 2^64
    capsys.readouterr()
    argv[-1] = f"{vram}=0xfffffffffffff000"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"mappedram: {paused_mr}: {vram} at 0xfffffffffffff000 (16777216 bytes) ends past the 64-bit address space\n"
    )
    argv += ["--map", f"{vram}=0x10000000000"]
    assert main(argv) == 2
    assert capsys.readouterr().err == "mappedram: --map names a block twice\n"


def test_block_claiming_to_end_past_2_64_is_the_files_fault(capsys, tmp_path):
    claim = (1 << 64) - (1 << 20)
    legacy = stream_claiming(tmp_path, claim)  # a classic stream may claim RAM it does not hold
    with mappedram.open(legacy) as snap:
        entry = snap.block("pc.ram").entry_offset
    assert main(["export-elf", str(legacy), "-o", str(tmp_path / "core"), "--below-4g", "1M"]) == 1
    assert capsys.readouterr().err == (
        f"mappedram: {legacy}: offset {entry:#x} ({entry}): expected 'pc.ram' to fit below 2^64 from 0x100000000, "
        f"found {claim - (1 << 20)} bytes\n"
    )
    assert not (tmp_path / "core").exists()


def test_below_4g_with_a_suffix(capsys, paused_mr, tmp_path):
    assert main(["export-elf", str(paused_mr), "-o", str(tmp_path / "core"), "--below-4g", "32M"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "PT_LOAD 0x000100000000-0x000102000000  pc.ram +0x2000000" in lines  # 32 MiB from 4 GiB up
    assert "PT_LOAD 0x0000000c0000-0x000002000000  pc.ram +0xc0000" in lines


def test_page_size_contradicting_the_file_is_refused(capsys, small, tmp_path):
    assert main(["dump", "--page-size", "8192", str(small)]) == 2
    assert capsys.readouterr().err == (
        f"mappedram: {small}: --page-size 8192 contradicts the page size 4096 in the mapped-ram header of "
        "block 'pc.ram'; the option is for classic streams that do not record it\n"
    )
    assert main(["verify", "--page-size", "8K", str(small)]) == 2
    assert "contradicts the page size 4096" in capsys.readouterr().err
    out = tmp_path / "pc.ram.raw"
    assert main(["extract", str(small), "--block", "pc.ram", "-o", str(out), "--page-size", "512"]) == 2
    assert "contradicts the page size 4096" in capsys.readouterr().err and not out.exists()
    assert main(["dump", "--page-size", "4K", str(small)]) == 0  # agreeing is fine
    assert "page size:     4096" in capsys.readouterr().out.splitlines()
    legacy = tmp_path / "legacy.sav"  # records no page size: the option is honoured
    with mappedram.open(small) as snap:
        to_stream(snap, legacy)
    assert main(["verify", "--page-size", "4096", str(legacy)]) == 0


# -- --json ------------------------------------------------------------------------------
def test_json_on_a_missing_file(capsys, tmp_path):
    missing = str(tmp_path / "missing.sav")
    for command in ("dump", "verify"):
        assert main([command, "--json", missing]) == 2
        out, err = capsys.readouterr()
        assert json.loads(out) == {
            "file": missing,
            "error": {"exit_code": 2, "offset": None, "message": f"{missing}: No such file or directory"},
        }
        assert err == f"mappedram: {missing}: No such file or directory\n"


def test_json_on_a_malformed_file(capsys, tmp_path):
    bad = tmp_path / "bad.sav"
    bad.write_bytes(b"QEVX" + bytes(60))
    assert main(["dump", "--json", str(bad)]) == 1
    out, err = capsys.readouterr()
    error = json.loads(out)["error"]
    assert error["exit_code"] == 1 and error["offset"] == 0
    assert "expected the QEVM magic" in error["message"] and error["message"] in err


def test_json_no_sections_keeps_every_key(capsys, small):
    assert main(["dump", "--json", str(small)]) == 0
    full = json.loads(capsys.readouterr().out)
    assert main(["dump", "--json", "--no-sections", str(small)]) == 0
    short = json.loads(capsys.readouterr().out)
    assert list(short) == list(full)
    assert short["sections"] is None and short["eof_offset"] is None
    assert isinstance(full["sections"], list) and full["eof_offset"] > 0
    assert {k: v for k, v in short.items() if k not in ("sections", "eof_offset")} == {
        k: v for k, v in full.items() if k not in ("sections", "eof_offset")
    }


def test_vmdesc_offsets_agree(capsys, small):
    with mappedram.open(small) as snap:
        marker, length = snap.vmdesc_location
        raw = snap.read_bytes(marker, 5 + length)
    assert raw[0] == 0x06 and json.loads(raw[5:])["page_size"] == 4096
    assert main(["dump", "--json", str(small)]) == 0
    vm = json.loads(capsys.readouterr().out)["vmdesc"]
    assert vm == {"offset": marker, "json_length": length, "json_offset": marker + 5}
    assert main(["dump", str(small)]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line == f"vmdesc:        {length} bytes of JSON at {marker + 5:#x} (element at {marker:#x})"


def test_json_output_is_ascii_with_controls_escaped(capsys, tmp_path):
    path = write_snapshot(tmp_path / "evil.sav", {EVIL: pattern_block(1)}, machine_type=EVIL)
    assert main(["dump", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.isascii() and "\x1b" not in out and "\x07" not in out
    info = json.loads(out)
    assert info["machine_type"] == EVIL and info["blocks"][0]["name"] == EVIL


# -- escaping ----------------------------------------------------------------------------
def test_printable():
    assert printable("pc.ram") == "pc.ram"
    assert printable("a\nb\x1b[31m\x7f") == "a\\x0ab\\x1b[31m\\x7f"
    assert printable("é ü 日本") == "é ü 日本"  # printable non-ASCII stays
    assert printable("\u202eevil\u2028\udcff") == "\\u202eevil\\u2028\\udcff"  # bidi override, separator, surrogate


def test_names_from_the_file_cannot_forge_lines(capsys, tmp_path):
    clean = write_snapshot(tmp_path / "clean.sav", {"pc.ram": pattern_block(2), "x": pattern_block(1)})
    evil = write_snapshot(
        tmp_path / "evil.sav", {"pc.ram": pattern_block(2), EVIL: pattern_block(1)}, machine_type=EVIL
    )
    for argv in (["dump"], ["verify", "--hash"]):
        assert main([*argv, str(clean)]) == 0
        expected = capsys.readouterr().out.splitlines()
        assert main([*argv, str(evil)]) == 0
        out, err = capsys.readouterr()
        lines = out.splitlines()
        assert len(lines) == len(expected) and err == ""
        assert "\x1b" not in out and "\x07" not in out
        assert not any(line.startswith("mappedram:") for line in lines)
    assert printable(EVIL) in out  # the hash line names the block, escaped


def test_an_error_line_with_a_hostile_section_name_stays_one_line(capsys, tmp_path, paused_mr):
    with mappedram.open(paused_mr) as snap:
        devices = mappedram.DeviceState.from_snapshot(snap)
    path = write_snapshot(tmp_path / "dev.sav", {"pc.ram": pattern_block(2)}, devices=devices, alignment=PAGE)
    with mappedram.open(path) as snap:
        sec = next(s for s in snap.devices if s.idstr == "0000:00:00.0/I440FX")
        cut = snap.vmdesc_location[0]
    hostile = EVIL.encode()[:19].ljust(19, b"x")
    patch(path, sec.offset + 1 + 4 + 1, hostile)  # the idstr, same length
    patch(path, sec.end - 4, (0xDEAD).to_bytes(4, "big"))  # its footer names another section
    os.truncate(path, cut)  # no description: sections are delimited by their footers
    assert main(["dump", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "\x1b" not in err and "\x07" not in err
    assert err.startswith(f"mappedram: {path}: offset ") and printable(hostile.decode()) in err
    assert "expected the footer of section \\x1b[31m\\x0amappedram: F:, found none before the end" in err


# -- broken pipe, interrupts and the progress bar -------------------------------------------
def test_broken_pipe_exits_141_without_a_traceback(paused_mr):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    code = "import sys; from mappedram.cli import main; sys.exit(main())"
    proc = subprocess.run(
        [sys.executable, "-c", code, "dump", str(paused_mr)],
        stdout=write_end,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    os.close(write_end)
    assert proc.returncode == cli.EXIT_BROKEN_PIPE == 141
    assert proc.stderr == b""


def test_interrupt_ends_the_progress_line(capsys, small, tmp_path, monkeypatch):
    def interrupted(snap, name, out, progress, **_):
        progress(PAGE, 8 * PAGE)
        raise KeyboardInterrupt

    monkeypatch.setattr(restore, "extract", interrupted)  # the command imports it when it runs
    argv = ["extract", str(small), "--block", "pc.ram", "-o", str(tmp_path / "o"), "--progress"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.startswith("\rextract pc.ram [###") and err.endswith("\nmappedram: interrupted\n")
    assert err.count("\n") == 2


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_redraws_often_and_reads_well(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    stream = io.StringIO()
    bar = ProgressBar("extract pc.ram", enabled=True, stream=stream)
    total = 4 << 30
    draws = []
    for i in range(101):  # called every 20 ms for 2 s
        clock.now = 100.0 + i * 0.02
        before = stream.tell()
        bar(total * i // 100, total)
        if stream.tell() != before:
            draws.append(clock.now)
    gaps = [b - a for a, b in zip(draws, draws[1:])]
    assert max(gaps) <= 0.2 + 1e-9 and len(draws) >= 10
    assert draws[-1] == clock.now  # the last call always draws
    lines = stream.getvalue().split("\r")
    assert lines[-1].rstrip() == (
        "extract pc.ram [##############################] 100.0%  4.0 GiB of 4.0 GiB  2.0 GiB/s"
    )
    assert "2.0 GiB of 4.0 GiB  2.0 GiB/s  0:01 left" in stream.getvalue()
    bar.close()
    assert stream.getvalue().endswith("\n")
    bar.close()
    end_line(stream)
    assert stream.getvalue().count("\n") == 1  # a line is ended once


def test_progress_disabled_or_unused_writes_nothing():
    stream = io.StringIO()
    ProgressBar("x", enabled=False, stream=stream)(1, 2)
    with ProgressBar("y", enabled=True, stream=stream):
        pass
    assert stream.getvalue() == ""


def test_human():
    assert [human(n) for n in (0, 1023, 1024, 1536 << 20, 5 << 40, 3 << 50)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 GiB",
        "5.0 TiB",
        "3072.0 TiB",
    ]


@pytest.mark.parametrize("command", ["dump", "verify", "extract", "convert", "export-elf"])
def test_help_explains_exit_codes_and_sizes(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([command, "-h"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "exit codes:" in out and "141" in out and "decimal sizes may end in K, M, G, T" in out


def test_a_hostile_section_name_in_the_dump_stays_on_its_line(capsys, tmp_path, paused_mr):
    with mappedram.open(paused_mr) as snap:
        devices = mappedram.DeviceState.from_snapshot(snap)
    path = write_snapshot(tmp_path / "dev.sav", {"pc.ram": pattern_block(2)}, devices=devices, alignment=PAGE)
    assert main(["dump", str(path)]) == 0
    clean = capsys.readouterr().out.splitlines()
    with mappedram.open(path) as snap:
        sec = next(s for s in snap.devices if s.idstr == "0000:00:00.0/I440FX")
    hostile = EVIL.encode()[:19].ljust(19, b"x")
    patch(path, sec.offset + 1 + 4 + 1, hostile)  # the idstr, same length: the footer still delimits it
    assert main(["dump", str(path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    warnings = [line for line in lines if line.startswith("warning: ")]
    assert len(warnings) == 1 and "in the VM description's order" in warnings[0]
    assert len(lines) == len(clean) + 1 and "\x1b" not in out
    section_line = f"  {sec.offset:#12x}  full     {printable(hostile.decode())} id {sec.section_id} instance 0"
    assert any(line.startswith(section_line) for line in lines), section_line
