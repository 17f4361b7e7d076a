"""dump writes its sections as it makes them from the packed log: its memory does not
grow with the number of sections and commands in the file (a hostile stream of millions
of 5-byte commands cost ~0.4 KiB each before), and its output is what it was.

The text goldens in tests/dump_golden/ were made by `mappedram dump FILE` with the code
before this change (b0c151c), the file's path replaced by {path}; their values are checked
here against the manifests and the file's own bytes, and --json against json.dump of
the library's describe()."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, fixture_file, load_manifest
from craft import one_page_stream

import mappedram
from mappedram.cli import EXIT_BROKEN_PIPE, main
from mappedram.formats import structs as S
from mappedram.formats.constants import SectionType, VmCommand
from mappedram.mapper.forward import ForwardSnapshot
from mappedram.mapper.source import CURSOR_WINDOW, Cursor
from mappedram.mapper.walker import MAX_PROBLEMS
from mappedram.textsafe import printable

PAGE = 4096
GOLDEN = REPO / "tests" / "dump_golden"
HANG = 600  # seconds: only a hang fails
LIBVIRT = "pc64-f-paused-mr-libvirt.bin"


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def expected_json(snap: mappedram.Snapshot, sections: bool) -> str:
    """What dump --json printed before it streamed: json.dump of the whole object, the
    sections as one list from the library's describe()."""
    info = snap.describe(sections=sections)
    info.setdefault("sections", None)
    info.setdefault("eof_offset", None)
    if info["vmdesc"] is not None:
        info["vmdesc"]["json_offset"] = info["vmdesc"]["offset"] + 5  # 0x06, be32 length
    info["problems"] = [{"offset": p.offset, "message": p.text} for p in snap.problems]
    return json.dumps(info, indent=2, ensure_ascii=True) + "\n"


# -- the output is unchanged ------------------------------------------------------------------
@pytest.mark.parametrize("sections", [True, False], ids=["sections", "no-sections"])
def test_json_equals_the_whole_object_dumped_at_once(fixture_name, sections):
    path = fixture_file(fixture_name)
    code, out, err = run_cli("dump", "--json", str(path), *([] if sections else ["--no-sections"]))
    assert code == 0 and err == ""
    with mappedram.open(path) as snap:
        assert out == expected_json(snap, sections)
    listed = json.loads(out)["sections"]
    assert (listed is None) == (not sections)
    if sections:
        assert listed[-1]["kind"] == "eof" and len(listed) > 10


def test_json_of_a_compressed_image(tmp_path):
    """A forward (one-pass) image streams its sections the same way."""
    image = tmp_path / "image.sav"
    assert main(["convert", str(fixture_file(LIBVIRT)), str(image), "--to", "stream", "--compress", "gzip"]) == 0
    code, out, _ = run_cli("dump", "--json", str(image))
    with ForwardSnapshot(image) as snap:
        assert code == 0 and out == expected_json(snap, True)
    assert json.loads(out)["libvirt"]["format"] == "gzip"


_LINE = re.compile(r"  +(0x[0-9a-f]+)  (\w+) +(.*?)(?:  payload (\d+) bytes)?$")
_TYPES = {
    "start": SectionType.SECTION_START,
    "part": SectionType.SECTION_PART,
    "end": SectionType.SECTION_END,
    "full": SectionType.SECTION_FULL,
    "command": SectionType.COMMAND,
    "eof": SectionType.EOF,
}


def test_text_equals_the_golden(fixture_name):
    path = fixture_file(fixture_name)
    golden = (GOLDEN / f"{fixture_name}.txt").read_text().replace("{path}", printable(str(path)))
    code, out, err = run_cli("dump", str(path))
    assert code == 0 and err == "" and out == golden
    lines = golden.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("sections:"))
    listing = lines[at + 1 : at + 1 + int(lines[at].split()[1])]
    assert lines[at + 1 + len(listing)].startswith("vmdesc:")
    check_listing(path, [_LINE.fullmatch(line).groups() for line in listing])
    check_blocks(lines, load_manifest(fixture_name))
    code, short, _ = run_cli("dump", "--no-sections", str(path))  # the same without the listing
    assert code == 0 and short.splitlines() == lines[:at] + lines[at + 1 + len(listing) :]


def check_listing(path: Path, rows: list[tuple[str, str, str, str | None]]) -> None:
    """The golden's section lines against the file's bytes: each element's type byte at
    its offset, names and ids from its header, each element ending where the next
    begins; the device sections as the file's VM description lists them."""
    data = path.read_bytes()
    devices = []
    for (offset, kind, detail, payload), following in zip(rows, rows[1:] + [None]):
        at = int(offset, 16)
        assert data[at] == _TYPES[kind], (offset, kind)
        if kind == "eof":
            assert following is None
            vmdesc = data[at + 1 :]
            assert vmdesc[0] == SectionType.VMDESCRIPTION
            description = json.loads(vmdesc[5 : 5 + int.from_bytes(vmdesc[1:5], "big")])
            continue
        head = 5  # type, be32 section id (or: type, be16 cmd, be16 length)
        if kind == "command":
            assert int(payload) == int.from_bytes(data[at + 3 : at + 5], "big")
            assert detail == VmCommand(int.from_bytes(data[at + 1 : at + 3], "big")).name.lower()
        else:
            section_id = int(re.search(r"\bid (\d+)", detail).group(1))
            assert section_id == int.from_bytes(data[at + 1 : at + 5], "big")
        if kind in ("start", "full"):
            n = data[at + 5]
            idstr = data[at + 6 : at + 6 + n].decode()
            instance = int.from_bytes(data[at + 6 + n : at + 10 + n], "big")
            version = int.from_bytes(data[at + 10 + n : at + 14 + n], "big")
            assert detail == f"{idstr} id {section_id} instance {instance} v{version}"
            head += 1 + n + 8
            if idstr != "ram":
                devices.append((idstr, instance, version))
        end = at + head + int(payload)
        if kind != "command" and data[end] == SectionType.SECTION_FOOTER:
            end += 5
        assert end == int(following[0], 16), (offset, kind)
    listed = [
        (d["name"], d.get("instance_id", 0), d.get("version", v))
        for d, (_, _, v) in zip(description["devices"], devices)
    ]
    assert devices == listed and len(devices) == len(description["devices"])


def check_blocks(lines: list[str], manifest: dict) -> None:
    """The golden's block table against the manifest (QEMU's info ramblock and the
    file's geometry as make.py read it)."""
    first = next(i for i, line in enumerate(lines) if line.split()[:2] == ["block", "used_length"]) + 1
    for line, block in zip(lines[first:], manifest["blocks"], strict=False):
        words = line.split()
        assert words[0] == block["name"] and int(words[1]) == block["used_length"]
        present, total = words[2].split("/")
        assert int(total) == block["used_length"] // manifest["target_page_size"]
        assert present == str(block.get("pages_present", present))  # a stream's manifest does not count them
        if "bitmap_offset" in block and manifest["format"] == "mapped-ram":
            assert [int(w, 16) for w in words[-2:]] == [block["bitmap_offset"], block["pages_offset"]]
    assert lines[first + len(manifest["blocks"])].startswith("sections:")


def test_hostile_names_and_problems(tmp_path):
    """Names that must be escaped and problems, streamed: --json equals json.dump of the
    whole object; the text escapes each name and lists the problems after the sections."""
    names = ["dev\x1b[31m", "ligne\u2028two", "été", "x" * 255]

    def middle(comp):
        enc = comp.encoder
        devices = b"".join(
            enc.section_full(SectionType.SECTION_FULL, 10 + i, name, i, 1) + enc.footer(10 + i)
            for i, name in enumerate(names)
        )
        return devices + _command(0x1234) * 3

    path = one_page_stream(tmp_path / "hostile.bin", middle)
    code, out, _ = run_cli("dump", "--json", str(path))
    with mappedram.open(path) as snap:
        assert code == 0 and out == expected_json(snap, True)
        offsets = [s.offset for s in snap.sections if s.kind == "full"]
    info = json.loads(out)
    assert [s["idstr"] for s in info["sections"] if s["kind"] == "full"] == names
    assert len(info["problems"]) == 3 and "found cmd 0x1234" in info["problems"][0]["message"]
    code, text, _ = run_cli("dump", str(path))
    lines = text.splitlines()
    for i, (name, at) in enumerate(zip(names, offsets)):
        assert f"  {at:#12x}  full     {printable(name)} id {10 + i} instance {i} v1  payload 0 bytes" in lines
    assert "\x1b" not in text and "\u2028" not in text and "été" in text
    assert lines[-3:] == [f"warning: offset {p['offset']:#x}: {p['message']}" for p in info["problems"]]


# -- memory does not follow the element count -------------------------------------------------
def _command(cmd: int, data: bytes = b"") -> bytes:
    return bytes([SectionType.COMMAND]) + S.CommandBody.build({"cmd": cmd, "data": data})


def mixed(path: Path, units: int) -> Path:
    """``units`` times: two SWITCHOVER_START commands (5 bytes each), a RAM PART section
    (EOS only, 18 bytes) and a device FULL section delimited by its footer (20 bytes)."""

    def middle(comp):
        enc = comp.encoder
        command = _command(VmCommand.SWITCHOVER_START)
        part = comp.round_end()
        return b"".join(
            command * 2 + part + enc.section_full(SectionType.SECTION_FULL, 10 + i, "d", 0, 1) + enc.footer(10 + i)
            for i in range(units)
        )

    return one_page_stream(path, middle)


# dump in a child, its peak RSS (VmHWM) beside that of a child that only imports the CLI;
# the output goes to a file, which holds nothing in the process. (Not tracemalloc: it
# makes each of the encoder's small allocations ten times dearer.)
_CHILD = """
import re, sys
from mappedram.cli import main
out, args = sys.argv[1], sys.argv[2:]
code = None
if args:
    with open(out, "w") as sys.stdout:
        code = main(args)
hwm = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) << 10
print(code, hwm, file=sys.__stdout__)
"""


def cli_rss(out: Path, *args: str) -> tuple[int, int]:
    """The exit code of ``mappedram ARGS`` and its peak RSS above that of an interpreter
    that imported the CLI."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    results = []
    for argv in ([], args):
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(out), *argv], capture_output=True, text=True, env=env, timeout=HANG
        )
        assert proc.returncode == 0 and (proc.stderr == "" or args[0] == "verify"), proc.stderr[-2000:]
        code, hwm = proc.stdout.split()
        results.append((code, int(hwm)))
    assert results[0][0] == "None"
    return int(results[1][0]), results[1][1] - results[0][1]


def dump_rss(out: Path, *args: str) -> int:
    code, rss = cli_rss(out, "dump", *args)
    assert code == 0
    return rss


UNITS = 5_000  # x4 elements; the big file has 4 times as many


@pytest.fixture(scope="module")
def streams(tmp_path_factory) -> dict[int, Path]:
    folder = tmp_path_factory.mktemp("many")
    return {units: mixed(folder / f"mixed-{units}.bin", units) for units in (UNITS, 4 * UNITS)}


@pytest.mark.parametrize("mode", [[], ["--json"]], ids=["text", "json"])
def test_dump_memory_does_not_grow_with_the_elements(streams, tmp_path, mode):
    """20,000 and 80,000 elements: dump's peak RSS grows by less than 32 bytes an element
    (the packed log's row is about the element's size in the file; the dict each cost
    ~390 bytes before: 22.8 MB more for the big file) and stays under 8 MiB above the
    bare interpreter (30 MiB before); the output is complete."""
    rss = {}
    for units, path in streams.items():
        out = tmp_path / f"out-{units}"
        rss[units] = dump_rss(out, *mode, str(path))
        elements = 4 * units + 4  # RAM START, the tail's command, RAM END, EOF
        text = out.read_text()
        if mode:
            listed = json.loads(text)["sections"]
            assert len(listed) == elements and listed[-1]["kind"] == "eof"
            assert [s["kind"] for s in listed[1:5]] == ["command", "command", "part", "full"]
        else:
            assert f"sections:      {elements}\n" in text and text.count("  full     d id ") == units
        assert rss[units] < 8 << 20, rss
    assert rss[4 * UNITS] - rss[UNITS] < 32 * 4 * (3 * UNITS), rss


def test_commands_of_distinct_kinds(tmp_path):
    """Unknown commands, each (cmd, length) pair once: the walker keeps the verdict of a
    bounded number of pairs (one kept for each cost ~400 bytes: 16.6 MB for 40,000)."""
    rss = {}
    for count in (UNITS * 2, UNITS * 8):
        commands = b"".join(_command(0x100 + i // 2, bytes(i % 2)) for i in range(count))
        path = one_page_stream(tmp_path / f"cmds-{count}.bin", lambda c, commands=commands: commands)
        rss[count] = dump_rss(tmp_path / "out", str(path))
        warnings = [line for line in (tmp_path / "out").read_text().splitlines() if line.startswith("warning:")]
        assert len(warnings) == MAX_PROBLEMS + 1 and warnings[0].endswith("found cmd 0x100")
        assert f"found {count - MAX_PROBLEMS} more from here on (not listed)" in warnings[-1]
        assert rss[count] < 8 << 20, rss
    assert rss[UNITS * 8] - rss[UNITS * 2] < 32 * UNITS * 6, rss


def test_device_sections_are_a_view(paused_mr):
    """``snap.devices`` is a view of the packed log: the FULL sections but RAM's, as the
    VM description lists them, by iteration, length, index and slice."""
    with mappedram.open(paused_mr) as snap:
        expected = [s for s in snap.sections if s.kind == "full" and s.idstr != "ram"]
        devices = snap.devices
        assert [s.idstr for s in devices] == [d["name"] for d in snap.vmdesc["devices"]]
        assert list(devices) == expected and len(devices) == len(expected) == 33 and devices == expected
        assert devices[0] == expected[0] and devices[-1] == expected[-1] and devices[3:6] == expected[3:6]
        with pytest.raises(IndexError):
            devices[len(expected)]


def test_verify_memory_does_not_grow_with_device_sections(tmp_path):
    """10,000 and 40,000 device sections (footer-delimited, not in the description):
    verify counts them against the description without a Section object each (a list of
    them cost ~300 bytes a section: 12 MB for 40,000)."""
    rss = {}
    for count in (UNITS * 2, UNITS * 8):

        def devices(comp, count=count):
            enc = comp.encoder
            return b"".join(
                enc.section_full(SectionType.SECTION_FULL, 10 + i, "d", 0, 1) + enc.footer(10 + i) for i in range(count)
            )

        path = one_page_stream(tmp_path / f"devices-{count}.bin", devices)
        code, rss[count] = cli_rss(tmp_path / "out", "verify", str(path))
        assert code == 1 and f"expected {count} device entries in the VM description" in (tmp_path / "out").read_text()
        assert rss[count] < 8 << 20, rss
    assert rss[UNITS * 8] - rss[UNITS * 2] < 32 * UNITS * 6, rss


def test_no_sections_does_not_walk(streams, tmp_path):
    """--no-sections reads the RAM block list and stops: the same small peak for both."""
    rss = []
    for path in streams.values():
        rss.append(dump_rss(tmp_path / "out", "--json", "--no-sections", str(path)))
        info = json.loads((tmp_path / "out").read_text())
        assert info["sections"] is None and info["eof_offset"] is None
    assert abs(rss[1] - rss[0]) < 1 << 20 and max(rss) < 4 << 20, rss


@pytest.mark.parametrize("mode", [[], ["--json"]], ids=["text", "json"])
def test_reader_leaving_mid_listing_exits_141(streams, mode):
    """`mappedram dump F | head -c 64K`: the reader goes while the sections are written."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    code = "import sys; from mappedram.cli import main; sys.exit(main())"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "dump", *mode, str(streams[4 * UNITS])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    head = proc.stdout.read(64 << 10)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=HANG) == EXIT_BROKEN_PIPE == 141 and err == b""
    assert len(head) == 64 << 10 and (
        b"  command  switchover_start" in head or b'"command": "switchover_start"' in head
    )


def test_footer_search_refills_the_window_once_a_mib():
    """A footer search asks the cursor for the bytes it holds: a million short device
    sections delimited by their footers each refilled (copied) a whole MiB window before,
    (dump of 100,000 such sections and 200,000 commands: 30 s, now 4 s). Here 3 MiB of
    20-byte sections: one refill per MiB."""
    section = b"\x04" + bytes(14) + b"\x7e\x00\x00\x00\x0a"  # FULL ... footer of id 10
    data = section * ((3 << 20) // len(section))
    fetched = []

    def fetch(offset: int, length: int) -> bytes:
        fetched.append(length)
        return data[offset : offset + length]

    cursor = Cursor(fetch, len(data), 0)
    found = 0
    while (at := cursor.find(b"\x7e\x00\x00\x00\x0a", 1, lambda _, after: True)) >= 0:
        cursor.skip_to(at + 5, "the next section")
        found += 1
    assert found == len(data) // len(section) and cursor.pos == len(data)
    assert len(fetched) <= len(data) // CURSOR_WINDOW + 2 and sum(fetched) == len(data), len(fetched)
