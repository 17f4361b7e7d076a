"""Bounded cost: files made of many small elements (blocks, commands, sections, records),
built with the schemas, are opened, dumped and verified in a child process under
tracemalloc. Each must end in success or FormatError, with peak memory at most twice
the file's size plus 32 MiB (the fuzz harness's bound). Timeouts only catch hangs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from craft import one_page_stream

import mappedram
from mappedram.cli import main
from mappedram.formats import structs as S
from mappedram.formats.constants import CAP_MAPPED_RAM, RamFlag, SectionType, VmCommand
from mappedram.formats.layout import HEADER_SIZE, BlockPlace
from mappedram.mapper.encoder import StreamComposer
from mappedram.mapper.ram_section import MAX_BLOCKS
from mappedram.mapper.verify import block_sparse_digest
from mappedram.mapper.walker import MAX_PROBLEMS

PAGE = 4096
HANG = 600  # seconds: generous, only a hang fails

# open and verify, then dump, in one process: the peak of Python allocations of the
# first two is bounded. dump's own peak is reported, not bounded: here its output goes to
# a StringIO (tests/test_dump_memory.py bounds dump writing to a file).
_CHILD = """
import contextlib, io, json, sys, tracemalloc
import mappedram
from mappedram.cli import main
path, dump = sys.argv[1], sys.argv[2] == "dump"
tracemalloc.start()
out = {}
try:
    with mappedram.open(path) as snap:
        out["blocks"] = len(snap.blocks)
        out["sections"] = len(snap.sections)
    report = mappedram.verify(path)
    out["valid"] = report.ok
    out["problems"] = [[p.offset, p.text] for p in report.problems]
except mappedram.FormatError as err:
    out["error"] = [err.offset, str(err)]
out["peak"] = tracemalloc.get_traced_memory()[1]
if dump:
    tracemalloc.reset_peak()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        out["dump"] = main(["dump", path])
    out["dump_peak"] = tracemalloc.get_traced_memory()[1]
print(json.dumps(out))
"""


def run_bounded(path: Path, dump: bool = True) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), "dump" if dump else "-"], capture_output=True, text=True, timeout=HANG
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    bound = 2 * path.stat().st_size + (32 << 20)
    assert out["peak"] <= bound, f"peak {out['peak']} bytes over the bound {bound}"
    return out


def _command(cmd: int, data: bytes = b"") -> bytes:
    return bytes([SectionType.COMMAND]) + S.CommandBody.build({"cmd": cmd, "data": data})


def empty_blocks(path: Path, count: int) -> Path:
    """``count`` blocks of used_length 0 (each 40-odd bytes: entry, header, a gap byte),
    then the block that holds MEM_SIZE's one page."""
    comp = StreamComposer(PAGE, capabilities=[CAP_MAPPED_RAM])
    enc = comp.encoder
    out = bytearray(comp.head() + enc.ram_start(comp.ram_id) + enc.ram_word(PAGE, RamFlag.MEM_SIZE))
    for i in range(count + 1):
        name, length = (f"b{i}", 0) if i < count else ("pc.ram", PAGE)
        header = len(out) + 1 + len(name) + 8
        bitmap = header + HEADER_SIZE
        pages = bitmap + 1 if not length else -(-(bitmap + 8) // PAGE) * PAGE
        out += enc.block_entry(name, length, BlockPlace(name, length, PAGE, len(out), header, bitmap, 8, pages))
        out += bytes(pages + length - len(out))
    path.write_bytes(bytes(out) + comp.section_end() + comp.tail())
    return path


def test_many_commands(tmp_path):
    count = 150_000  # 0.75 MB of SWITCHOVER_START: one Section object each cost 39 MiB
    out = run_bounded(
        one_page_stream(tmp_path / "cmds.bin", lambda c: _command(VmCommand.SWITCHOVER_START) * count), False
    )
    assert out["valid"]
    assert out["sections"] == count + 4  # RAM START, the commands, the tail's command, RAM END, EOF


def test_problems_are_capped(tmp_path):
    count = 5_000
    out = run_bounded(one_page_stream(tmp_path / "bad.bin", lambda c: _command(0x1234) * count))
    problems = out["problems"]
    assert not out["valid"] and len(problems) == MAX_PROBLEMS + 1
    assert "found cmd 0x1234" in problems[0][1]
    first_unlisted = problems[-2][0] + 5  # the commands are 5 bytes apart
    assert problems[-1] == [
        first_unlisted,
        f"expected at most {MAX_PROBLEMS} problems, found {count - MAX_PROBLEMS} more from here on (not listed)",
    ]


def test_many_part_sections(tmp_path):
    count = 15_000  # mapped-ram PART sections: EOS only, 18 bytes each
    out = run_bounded(one_page_stream(tmp_path / "parts.bin", lambda c: c.round_end() * count))
    assert out["valid"] and out["sections"] == count + 4


def test_many_device_sections(tmp_path):
    """FULL sections the VM description does not list, delimited by their footers."""
    count = 10_000

    def devices(comp):
        enc = comp.encoder
        return b"".join(
            enc.section_full(SectionType.SECTION_FULL, 10 + i, f"dev{i}", 0, 1) + enc.footer(10 + i)
            for i in range(count)
        )

    out = run_bounded(one_page_stream(tmp_path / "devs.bin", devices))
    assert out["dump"] == 0 and out["sections"] == count + 4


def test_many_zero_records(tmp_path):
    count = 100_000  # CONTINUE|ZERO records of 9 bytes, in a classic stream

    def records(comp):
        return (
            comp.part_start()
            + comp.page_record("pc.ram", 0, None)
            + comp.page_record(None, 0, None) * (count - 1)
            + comp.section_end()
        )

    out = run_bounded(one_page_stream(tmp_path / "zeros.bin", records, mapped=False))
    assert out["valid"] and out["dump"] == 0


def test_many_blocks_under_the_cap(tmp_path):
    out = run_bounded(empty_blocks(tmp_path / "blocks.bin", MAX_BLOCKS - 1))
    assert out["blocks"] == MAX_BLOCKS and out["dump"] == 0


def test_blocks_past_the_cap(tmp_path):
    path = empty_blocks(tmp_path / "too-many.bin", MAX_BLOCKS + 10)
    out = run_bounded(path, False)
    offset, text = out["error"]
    entry = len(StreamComposer(PAGE, capabilities=[CAP_MAPPED_RAM]).head()) + 1 + 4 + 1 + 3 + 8 + 8
    per_block = [1 + len(f"b{i}") + 8 + HEADER_SIZE + 1 for i in range(MAX_BLOCKS)]
    assert offset == entry + sum(per_block)  # the first entry past the cap
    assert f"at most {MAX_BLOCKS} RAM blocks" in text


@pytest.mark.parametrize("bad", ["truncated", "not-utf8"])
def test_block_entry_errors_name_the_entry(tmp_path, bad):
    """The struct reading of block entries keeps construct's messages: offset of the entry,
    what was expected, what was found."""
    path = empty_blocks(tmp_path / "b.bin", 3)
    data = bytearray(path.read_bytes())
    at = data.index(b"\x02b1")  # the second entry
    if bad == "truncated":
        data = data[: at + 5]
    else:
        data[at + 1] = 0xFF
    path.write_bytes(bytes(data))
    out = run_bounded(path)
    offset, text = out["error"]
    assert offset == at and "RAM block entry 1 (u8 idlen, idstr, be64 used_length)" in text
    assert ("the end of the file at" in text) if bad == "truncated" else ("can't decode byte 0xff" in text)


# -- verify --hash: the work follows the file -------------------------------------------------
def claimed_stream(path: Path, claim: int, pages: dict[int, bytes]) -> Path:
    """A classic stream whose one block claims ``claim`` bytes and holds ``pages``."""

    def records(comp):
        out = comp.part_start()
        for i, (page, data) in enumerate(sorted(pages.items())):
            out += comp.page_record(None if i else "pc.ram", page, data)
        return out + comp.section_end()

    comp = StreamComposer(PAGE)
    head = comp.head()
    pieces, _, _ = comp.ram_start(len(head), [("pc.ram", claim)])
    start = b"".join(data for _, data in pieces)
    path.write_bytes(head + start + records(comp) + comp.tail())
    return path


def sparse_reference(ram: np.ndarray, page_size: int = PAGE) -> str:
    """The documented sparse-sha256, computed from the RAM alone."""
    pages = ram.reshape(-1, page_size)
    nonzero = np.flatnonzero(pages.any(axis=1))
    data = hashlib.sha256(pages[nonzero].tobytes()).digest()
    numbers = hashlib.sha256(nonzero.astype("<u8").tobytes()).digest()
    return hashlib.sha256(data + numbers + len(pages).to_bytes(8, "little")).hexdigest()


def test_hash_of_a_tib_claim_follows_the_file(tmp_path):
    """A 1 TiB claim with three pages (one of them zero): no sha256 (it would hash a TiB of
    zeros), a sparse digest of the two non-zero pages, a note; in a child, so a hang shows."""
    pages = {7: bytes(range(256)) * 16, 1 << 20: b"\xff" * PAGE, 5: bytes(PAGE)}
    path = claimed_stream(tmp_path / "tib.bin", 1 << 40, pages)
    child = (
        "import json, sys, mappedram\n"
        "r = mappedram.verify(sys.argv[1], hash_blocks=True)\n"
        "print(json.dumps(r.describe()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True, text=True, timeout=HANG)
    report = json.loads(proc.stdout)
    assert report["valid"] and report["sha256"] == {}
    sparse = report["sparse_sha256"]["pc.ram"]
    assert sparse["pages"] == (1 << 40) // PAGE and sparse["nonzero_pages"] == 2
    data = hashlib.sha256(pages[7] + pages[1 << 20]).digest()
    numbers = hashlib.sha256(np.array([7, 1 << 20], dtype="<u8").tobytes()).digest()
    assert sparse["digest"] == hashlib.sha256(data + numbers + ((1 << 40) // PAGE).to_bytes(8, "little")).hexdigest()
    assert any("no sha256" in n and "--hash-zeros" in n for n in report["notes"])


def test_zero_budget_and_hash_zeros(tmp_path):
    """Past the budget only the sparse digest; --hash-zeros gives the sha256 instead,
    equal to the sha256 of the RAM computed here."""
    claim = 64 << 20
    pages = {3: b"\x01" * PAGE}
    path = claimed_stream(tmp_path / "c.bin", claim, pages)
    ram = np.zeros(claim, dtype=np.uint8)
    ram[3 * PAGE : 4 * PAGE] = 1
    bounded = mappedram.verify(path, hash_blocks=True, zero_budget=1 << 20)
    assert bounded.hashes == {} and bounded.sparse["pc.ram"].digest == sparse_reference(ram)
    full = mappedram.verify(path, hash_blocks=True, hash_zeros=True, zero_budget=1 << 20)
    assert full.hashes == {"pc.ram": hashlib.sha256(ram).hexdigest()} and full.sparse == {}
    assert mappedram.verify(path, hash_blocks=True).hashes == full.hashes  # 64 MiB: within the default budget


def test_sparse_digest_is_the_same_for_both_layouts(tmp_path, paused_mr):
    """The sparse digest depends on the RAM only: a QEMU mapped-ram fixture and its
    conversion to a classic stream give the same one, and it matches the computation from
    the block's bytes."""
    stream = tmp_path / "stream.bin"
    mappedram.convert(paused_mr, stream, "stream")
    with mappedram.open(paused_mr) as mapped, mappedram.open(stream) as converted:
        for block in mapped:
            digest = block_sparse_digest(block)
            assert digest == block_sparse_digest(converted.block(block.name))
            assert digest.digest == sparse_reference(block.read(), block.page_size)
            assert digest.pages == block.num_pages and digest.nonzero_pages <= block.populated


def test_cli_prints_the_sparse_digest(tmp_path, capsys):
    path = claimed_stream(tmp_path / "tib.bin", 1 << 40, {9: b"\x02" * PAGE})
    assert main(["verify", "--hash", str(path)]) == 0
    out = capsys.readouterr().out
    digest = mappedram.verify(path, hash_blocks=True).sparse["pc.ram"].digest
    assert f"{digest}  pc.ram (sparse-sha256: 1 non-zero of {(1 << 40) // PAGE} pages)" in out


# -- start-up ---------------------------------------------------------------------------------
def test_import_loads_nothing_heavy():
    """``import mappedram`` loads neither numpy nor construct nor the writer; each public
    name is there on first use."""
    child = (
        "import sys, mappedram\n"
        "heavy = [m for m in ('numpy', 'construct', 'mappedram.mapper.writer') if m in sys.modules]\n"
        "names = [n for n in mappedram.__all__ if getattr(mappedram, n) is None]\n"
        "print(heavy, names, 'numpy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=HANG).stdout
    assert out.split("\n")[0] == "[] [] True"  # nothing before use; numpy once a name needs it


def test_cli_does_not_load_the_writer_for_dump():
    child = (
        "import sys\n"
        "from mappedram.cli import main\n"
        "print([m for m in ('mappedram.mapper.writer', 'mappedram.mapper.convert', 'mappedram.mapper.physical') "
        "if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=HANG).stdout
    assert out.strip() == "[]"


# -- runs of CONTINUE records, taken with numpy -----------------------------------------------
def _records_stream(path: Path, records: list[bytes]) -> Path:
    """A classic stream of 64 pages whose RAM section PART holds ``records``."""

    def middle(comp):
        return comp.part_start() + b"".join(records) + comp.section_end()

    comp = StreamComposer(PAGE)
    head = comp.head()
    pieces, _, _ = comp.ram_start(len(head), [("pc.ram", 64 * PAGE)])
    path.write_bytes(head + b"".join(d for _, d in pieces) + middle(comp) + comp.tail())
    return path


def test_page_runs_index_every_page(tmp_path):
    """40 CONTINUE|PAGE records, then a ZERO run over some of them: the index keeps the
    pages the last record gave data, at the offsets of their data."""
    enc = StreamComposer(PAGE).encoder
    data = {p: bytes([p + 1]) * PAGE for p in range(40)}
    records = [enc.page_record("pc.ram" if p == 0 else None, p, data[p]) for p in range(40)]
    records += [enc.page_record(None, p, None) for p in range(10, 30)]
    path = _records_stream(tmp_path / "runs.bin", records)
    with mappedram.open(path) as snap:
        block = snap.block("pc.ram")
        ram = block.read()
        assert block.populated == 20
    want = np.zeros(64 * PAGE, dtype=np.uint8)
    for p in [*range(10), *range(30, 40)]:
        want[p * PAGE : (p + 1) * PAGE] = p + 1
    assert np.array_equal(ram, want)


@pytest.mark.parametrize("bad", ["page-past-the-block", "fill-byte", "flags"])
def test_a_bad_record_inside_a_run(tmp_path, bad):
    """The record that breaks a run is judged by the record loop: its own offset and
    message, as if no run had been taken."""
    enc = StreamComposer(PAGE).encoder
    zero = bad == "fill-byte"
    records = [enc.page_record("pc.ram" if i == 0 else None, i % 64, None if zero else bytes(PAGE)) for i in range(60)]
    start = sum(len(r) for r in records[:37])
    if bad == "page-past-the-block":
        records[37] = enc.page_record(None, 64, bytes(PAGE))
    elif bad == "fill-byte":
        records[37] = records[37][:-1] + b"\x05"
    else:
        records[37] = S.RamWord.build(37 * PAGE | RamFlag.CONTINUE) + bytes(PAGE)
    path = _records_stream(tmp_path / "bad.bin", records)
    head = path.read_bytes().index(records[0])
    with pytest.raises(mappedram.FormatError) as err:
        with mappedram.open(path) as snap:
            snap.sections
    expected = {
        "page-past-the-block": (head + start, "a page inside block 'pc.ram'"),
        "fill-byte": (head + start + 8, "a zero page fill byte of 0"),
        "flags": (head + start, "RAM flags"),
    }[bad]
    assert err.value.offset == expected[0] and expected[1] in err.value.expected


# -- restore into transparent huge pages ------------------------------------------------------
def _vm_flags(array: np.ndarray) -> list[str]:
    """The VmFlags of the mapping that holds ``array`` (from /proc/self/smaps)."""
    start = array.ctypes.data
    current = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            current = lo <= start < hi
        elif head == "VmFlags:" and current:
            return line.split()[1:]
    raise AssertionError("no mapping holds the array")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/self/smaps")
def test_restore_into_huge_pages(paused_mr):
    """huge_pages=True: every array of at least a huge page lies in memory advised for
    huge pages (VmFlags 'hg'); the bytes are the same as by default. (A default array may
    sit in heap memory numpy advised earlier, and so may a small one: only the arrays of
    at least a huge page, which new_buffer maps, are checked.)"""
    plain = mappedram.restore(paused_mr)
    huge = mappedram.restore(paused_mr, huge_pages=True)
    assert plain.keys() == huge.keys()
    for name, array in huge.items():
        assert np.array_equal(array, plain[name])
        if array.nbytes >= 2 << 20:
            assert "hg" in _vm_flags(array), name
    assert huge["pc.ram"].nbytes >= 2 << 20


def test_all_names_are_the_lazy_ones():
    assert set(mappedram.__all__) == {"FormatError", *mappedram._LAZY}


def test_page_index_keeps_runs(tmp_path):
    """Records are logged as runs: CONTINUE records of every other page, then of the pages
    between, read back where their records put them; the populated count of 100,000 zero
    records needs no per-page arrays."""
    enc = StreamComposer(PAGE).encoder
    pages = [*range(0, 64, 2), *range(1, 64, 2)]  # two runs with holes, then the holes
    records = [enc.page_record("pc.ram" if i == 0 else None, p, bytes([p + 1]) * PAGE) for i, p in enumerate(pages)]
    path = _records_stream(tmp_path / "runs.bin", records)
    with mappedram.open(path) as snap:
        block = snap.block("pc.ram")
        assert block.populated == 64
        ram = block.read()
    assert all(ram[p * PAGE] == p + 1 for p in range(64))

    def zeros(comp):
        return (
            comp.part_start()
            + comp.page_record("pc.ram", 0, None)
            + comp.page_record(None, 0, None) * 100_000
            + comp.section_end()
        )

    path = one_page_stream(tmp_path / "zeros.bin", zeros, mapped=False)
    child = (
        "import sys, tracemalloc, mappedram\n"
        "snap = mappedram.open(sys.argv[1]); snap.sections\n"
        "tracemalloc.start()\n"
        "print(snap.block('pc.ram').populated, tracemalloc.get_traced_memory()[1])\n"
    )
    out = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True, text=True, timeout=HANG)
    populated, peak = (int(x) for x in out.stdout.split())
    assert populated == 0 and peak < 64 << 10  # per-page arrays would be 1.6 MB and more


def test_zero_run_inside_a_zeroed_run_keeps_later_data(tmp_path):
    """ZERO records of pages 0-39, PAGE records of 20-29, ZERO records of 5-9 again: the
    pages 20-29 keep their data (a re-zeroed range must not grow the run before it)."""
    enc = StreamComposer(PAGE).encoder
    records = [enc.page_record("pc.ram", 0, None)] + [enc.page_record(None, p, None) for p in range(1, 40)]
    records += [enc.page_record(None, p, bytes([p]) * PAGE) for p in range(20, 30)]
    records += [enc.page_record(None, p, None) for p in [*range(0, 20), *range(5, 25)]]
    path = _records_stream(tmp_path / "rezero.bin", records)
    with mappedram.open(path) as snap:
        block = snap.block("pc.ram")
        assert block.populated == 5  # 25-29: 20-24 were zeroed last
        ram = block.read()
    assert [p for p in range(64) if ram[p * PAGE]] == [25, 26, 27, 28, 29]


def test_verify_counts_ram_sections_without_keeping_them(tmp_path):
    """verify judges START ... END from the RAM sections' kinds kept as runs: 250,000
    PART sections (250 bytes of Section each when they were listed: 62 MB) stay within
    the bound, and the message about a second END names the runs, not every kind."""
    count = 250_000

    def middle(comp: StreamComposer) -> bytes:  # the PARTs, then an END before the tail's own
        return comp.round_end() * count + comp.encoder.ram_eos_section(SectionType.SECTION_END, comp.ram_id)

    out = run_bounded(one_page_stream(tmp_path / "parts.bin", middle), False)
    assert not out["valid"]
    text = "expected a RAM section that opens with START and closes with one END, found "
    assert [p[1] for p in out["problems"] if p[1].startswith(text)] == [text + f"start, part x{count}, end x2"]
