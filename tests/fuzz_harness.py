"""Mutating real snapshots, and building hostile ones from the schemas, for every entry point.

Two sources of inputs:
- mutations of seeds that carry the real device sections and VM description of a QEMU
  10.0 fixture (mapped-ram, and the classic stream) with tiny RAM blocks: bit flips,
  truncations, extreme values over header fields, splices, repeated sections, control
  characters over names, a broken or nested VM description;
- files built from the schemas (``generate``): any mode, extreme field values (0, 1,
  max, 2^63, 2^64-1, page size +- 1), many blocks, sections, commands and page records,
  names holding newlines, ESC and bidi controls, and odd VM descriptions (deep nesting,
  Infinity, huge numbers, wrong types).

``exercise()`` runs open, dump, verify, extract and restore on one input, and the CLI's
dump, dump --json and verify: only FormatError may escape the library, the CLI must
exit 0, 1 or 2 with at most one line on stderr, no control character may reach the
output, each input is bounded in time, and no input may allocate more than its own size
(plus a fixed slack).

    python3 tests/fuzz_harness.py --examples 20000                   # the long run (see README)
    python3 tests/fuzz_harness.py --examples 5000 --generated 0.5    # half of them built
"""

from __future__ import annotations

import io
import json
import signal
import struct
import sys
import tempfile
import time
import tracemalloc
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

import mappedram
from mappedram import FormatError
from mappedram.cli import main as cli_main
from mappedram.formats import structs as S
from mappedram.formats.bitmap import LITTLE_ENDIAN_64
from mappedram.formats.constants import RamFlag, SectionType, VmCommand
from mappedram.mapper.convert import to_stream
from mappedram.mapper.encoder import StreamEncoder, place_block

TIME_LIMIT = 10  # seconds an input may take
ALLOC_SLACK = 32 << 20  # bytes allocated beyond the input's size
CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"


def make_seeds(fixture: Path, workdir: Path) -> list[Path]:
    """A mapped-ram and a classic-stream seed with the fixture's real device state."""
    with mappedram.open(fixture) as snap:
        devices = mappedram.DeviceState.from_snapshot(snap)
    rng = np.random.default_rng(7)
    blocks = {"pc.ram": rng.integers(0, 256, 24 * 4096, dtype=np.uint8), "vga": np.zeros(8 * 4096, np.uint8)}
    blocks["pc.ram"][4096 * 3 : 4096 * 5] = 0
    blocks["vga"][100] = 1
    mr = workdir / "seed-mapped-ram.sav"
    with mappedram.SnapshotWriter(mr, blocks, devices=devices, alignment=4096, fsync=False) as writer:
        writer.save_round()
        writer.complete()
    stream = workdir / "seed-stream.sav"
    with mappedram.open(mr) as snap:
        to_stream(snap, stream)
    return [mr, stream]


class InputTimeout(BaseException):
    """Raised by the alarm; a BaseException so that no ``except OSError`` (the CLI's) or
    ``except Exception`` in the code under test can swallow it."""


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def expired(signum: int, frame: object) -> None:
        raise InputTimeout(f"an input took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def exercise(path: Path, workdir: Path) -> str:
    """Run every entry point on ``path``; returns "ok" or the FormatError text.
    Anything but FormatError (or MemoryError's clear refusal) propagates. The library
    runs under the allocation bound, the CLI after it (each with its own time limit)."""
    result = _exercise_library(path, workdir)
    with time_limit(TIME_LIMIT):
        check_cli(path)
    return result


def _exercise_library(path: Path, workdir: Path) -> str:
    size = path.stat().st_size
    tracemalloc.start()
    try:
        with time_limit(TIME_LIMIT):
            report = mappedram.verify(path)
            assert report.ok or report.problems
            if report.ok and sum(b["used_length"] for b in _blocks(path)) <= size + ALLOC_SLACK:
                # hashing reads all the RAM a stream claims, zeros included: only where that is bounded
                mappedram.verify(path, hash_blocks=True)
            try:
                with mappedram.open(path) as snap:
                    snap.describe()
                    for block in snap:
                        if block.used_length > size + ALLOC_SLACK:
                            continue  # a classic stream may claim RAM it does not hold; not allocated here
                        block.read()
                        mappedram.extract(snap, block.name, workdir / "extract.raw")
                    small = {b.name: np.zeros(b.used_length, np.uint8) for b in snap if b.used_length <= size}
                    snap.restore_into(small, channels=2)
            except FormatError as err:
                return str(err)
        peak = tracemalloc.get_traced_memory()[1]
        assert peak <= 2 * size + ALLOC_SLACK, f"allocated {peak} bytes for a {size}-byte input"
        return "ok" if report.ok else "; ".join(map(str, report.problems))
    finally:
        tracemalloc.stop()


def _unsafe(text: str) -> bool:
    """Whether output holds a character a terminal would act on (newlines end lines)."""
    return not all(line.isprintable() for line in text.split("\n"))


def check_cli(path: Path) -> None:
    """dump, dump --json and verify: exit 0/1/2, one stderr line at most, nothing unprintable."""
    for argv in (["dump"], ["dump", "--json"], ["verify"]):
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = cli_main([*argv, str(path)])
        text, errors = out.getvalue(), err.getvalue()
        assert code in (0, 1, 2), f"{argv}: exit {code}"
        assert errors.count("\n") <= 1 and not _unsafe(errors), f"{argv}: stderr {errors!r}"
        assert not _unsafe(text), f"{argv}: unprintable output {text[:200]!r}"
        if argv == ["dump", "--json"]:
            assert text.isascii()
            json.loads(text)  # an object, also on errors
        if code != 0:
            assert errors or (argv == ["verify"] and code == 1 and text), f"{argv}: exit {code} without a word"


def _blocks(path: Path) -> list[dict]:
    with mappedram.open(path) as snap:
        return [b.describe() for b in snap]


@dataclass(frozen=True)
class Seed:
    data: bytes
    hot: list[int]  # offsets of fields worth hitting
    names: list[tuple[int, int]]  # (offset, length) of each name's bytes
    spans: list[tuple[int, int]]  # (start, end) of each top-level element


def prepare(path: Path) -> Seed:
    names, spans = [], []
    with mappedram.open(path) as snap:
        for block in snap:
            names.append((block.entry_offset + 1, len(block.name.encode())))
        for sec in snap.sections:
            if sec.idstr and sec.kind in ("start", "full"):
                names.append((sec.offset + 6, len(sec.idstr.encode())))
            if sec.end and sec.kind != "eof":
                spans.append((sec.offset, sec.end))
    return Seed(path.read_bytes(), hot_offsets(path), names, spans)


HOSTILE_TEXT = [
    "a\nmappedram: F: valid",
    "\x1b[31mred\x1b[0m",
    "\x1b]0;title\x07",
    "\u202eevil",
    "line\u2028sep",
    "\r\x08\x7f",
    "nul\x00cut",
    "\udcff",
]


def mutate(data: bytes | Seed, rng: np.random.Generator, hot: list[int] | None = None) -> bytes:
    """One of: bit flips, a truncation, an extreme value over a field, a splice, a broken
    VM description; with a Seed also repeated elements, hostile names, nested JSON."""
    seed = data if isinstance(data, Seed) else None
    data = seed.data if seed else data
    hot = seed.hot if seed else hot or [0]
    buf = bytearray(data)
    kind = rng.integers(8 if seed else 5)
    if kind == 0:  # flip bits, half of the time at a structure offset
        for _ in range(rng.integers(1, 8)):
            at = int(rng.choice(hot)) + int(rng.integers(0, 8)) if rng.random() < 0.5 else int(rng.integers(len(buf)))
            if at < len(buf):
                buf[at] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # truncate
        del buf[int(rng.integers(len(buf))) :]
    elif kind == 2:  # an extreme value over a 4- or 8-byte field
        at = int(rng.choice(hot))
        width = int(rng.choice([4, 8]))
        value = int(rng.choice([0, 1, 2**31, 2**32 - 1, 2**60, 2**63, 2**64 - 1, len(buf), len(buf) - 1]))
        buf[at : at + width] = (value % 2 ** (8 * width)).to_bytes(width, "big")
    elif kind == 3:  # duplicate a slice somewhere else (swapped or repeated structures)
        a, b = sorted(int(x) for x in rng.integers(0, len(buf), 2))
        at = int(rng.integers(len(buf)))
        buf[at:at] = buf[a : min(b, a + 4096)]
    elif kind == 4:  # break the VM description
        at = data.rfind(b'"devices"')
        if at > 0:
            buf[at + int(rng.integers(0, 40))] = int(rng.integers(256))
    elif kind == 5 and seed.spans:  # repeat one element many times
        start, end = seed.spans[int(rng.integers(len(seed.spans)))]
        times = _count(rng, [2, 100], 10_000)
        times = max(1, min(times, (4 << 20) // max(end - start, 1)))
        buf[end:end] = bytes(buf[start:end]) * times
    elif kind == 6 and seed.names:  # control characters over a name, same length
        at, length = seed.names[int(rng.integers(len(seed.names)))]
        text = str(rng.choice(HOSTILE_TEXT)).encode("utf-8", "surrogateescape")
        buf[at : at + length] = (text * (length // max(len(text), 1) + 1))[:length]
    elif kind == 7:  # replace the VM description with odd JSON
        at = data.rfind(b"\x00\x06")
        if at > 0:
            text = odd_json(rng)
            buf[at + 1 :] = S.VmDescriptionHead.build({"length": len(text)}) + text
    return bytes(buf)


# -- inputs built from the schemas -----------------------------------------------------------
def _extreme(rng: np.random.Generator, rate: float, typical: int, bits: int = 64, page: int = 4096) -> int:
    """``typical``, or at ``rate`` an edge: 0, 1, page +- 1, typical +- 1, 2^(bits-1), max."""
    if rng.random() >= rate:
        return typical
    top = 1 << bits
    edges = [0, 1, page - 1, page, page + 1, typical - 1, typical + 1, top // 2 - 1, top // 2, top - 1]
    return int(edges[int(rng.integers(len(edges)))]) % top


MANY_RATE = 0.03  # how often an element kind is repeated thousands of times (slow inputs)


def _count(rng: np.random.Generator, usual: list[int], many: int) -> int:
    """How many of an element: one of ``usual``, or rarely ``many``."""
    return many if rng.random() < MANY_RATE else int(rng.choice(usual))


def _name(rng: np.random.Generator, plain: str) -> str:
    """Mostly ``plain``; else hostile text (encodable: the schemas build UTF-8), empty, long or repeated."""
    r = rng.random()
    if r < 0.75:
        return plain
    if r < 0.85:
        return str(rng.choice(HOSTILE_TEXT)).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return str(rng.choice(["", "x" * 255, "dup", plain + "\n" + plain]))


def odd_json(rng: np.random.Generator, devices: list[dict] | None = None, page_size: int = 4096) -> bytes:
    """A VM description: a sound one most of the time, else deep, non-JSON or misshapen."""
    sound = {"page_size": page_size, "devices": devices or []}
    choice = int(rng.integers(12))
    if choice < 4:
        return json.dumps(sound).encode()
    odd: list[bytes] = [
        b"[" * int(rng.choice([101, 5000, 100_000])),
        b'{"devices": ' + b"[" * 2000 + b"]" * 2000 + b"}",
        json.dumps(sound).replace('"page_size": ' + str(page_size), '"page_size": Infinity').encode(),
        b'{"page_size": NaN, "devices": []}',
        b'{"page_size": ' + b"9" * 5000 + b', "devices": []}',
        b'{"devices": [{"name": 5, "fields": [{"size": 1e400}]}]}',
        json.dumps({"devices": [{"name": "\x1b[31m\n", "subsections": [{"vmsd_name": 5}]}]}).encode(),
        b'{"devices": "\xff\xfe", "x": "\\ud800"}',
    ]
    return odd[int(rng.integers(len(odd)))]


def generate(rng: np.random.Generator) -> bytes:
    """A whole stream built with the schemas, with extreme values and repeated elements."""
    ps = int(rng.choice([4096, 4096, 512, 65536]))
    rate = float(rng.choice([0.0, 0.02, 0.1, 0.3]))  # how many fields get an edge value
    mapped = rng.random() < 0.6
    enc = StreamEncoder(ps, footers=rng.random() < 0.9)
    caps = (["mapped-ram"] if mapped else []) + (["x-ignore-shared"] if rng.random() < 0.15 else [])
    if rng.random() < 0.1:
        caps += [_name(rng, "cap")] * int(rng.choice([1, 300]))
    ignore_shared = "x-ignore-shared" in caps
    page_bits = ps.bit_length() - 1
    tpb = None if rng.random() < 0.5 else page_bits
    if rng.random() < rate:
        tpb = int(rng.choice([0, 8, 31, 2**32 - 1]))
    out = bytearray(enc.header() + enc.configuration(_name(rng, "pc-q35-10.0"), caps, tpb))
    ram_id = 2
    nblocks = _count(rng, [1, 2, 3, 50], 3000)
    sizes = [int(rng.integers(0, 9)) * ps for _ in range(nblocks)]
    out += enc.ram_start(ram_id) + S.RamWord.build(_extreme(rng, rate, sum(sizes), page=ps) | RamFlag.MEM_SIZE)
    for i, used in enumerate(sizes):
        name = _name(rng, f"block{i}" if i else "pc.ram")
        used = _extreme(rng, rate, used, page=ps)
        entry_offset = len(out)
        header = None
        place = None
        if mapped:
            try:
                place = place_block(name, used, ps, entry_offset, LITTLE_ENDIAN_64, alignment=ps)
            except (OverflowError, ValueError):
                place = None
            bitmap_offset = place.bitmap_offset if place else 0
            pages_offset = place.pages_offset if place else 0
            header = {
                "version": _extreme(rng, rate, 1, 32),
                "page_size": _extreme(rng, rate, ps, page=ps),
                "bitmap_offset": _extreme(rng, rate, bitmap_offset, page=ps),
                "pages_offset": _extreme(rng, rate, pages_offset, page=ps),
            }
        try:
            out += S.RamBlockEntry.build(
                {
                    "idstr": name,
                    "used_length": used,
                    "addr": _extreme(rng, rate, 0) if ignore_shared else None,
                    "mapped_ram": header,
                },
                mapped_ram=mapped,
                ignore_shared=ignore_shared,
            )
        except Exception:  # a name over 255 bytes in UTF-8: the schema refuses to build it
            out += S.RamBlockEntry.build(
                {"idstr": "long", "used_length": used, "addr": 0, "mapped_ram": header},
                mapped_ram=mapped,
                ignore_shared=ignore_shared,
            )
        if place and place.pages_offset + used - len(out) <= 1 << 20:  # lay out bitmap and pages
            out += bytes(max(0, place.bitmap_offset - len(out)))
            out[place.bitmap_offset : place.bitmap_offset + place.bitmap_size] = rng.integers(
                0, 256, place.bitmap_size, dtype=np.uint8
            ).tobytes()
            out += bytes(max(0, place.pages_offset + used - len(out)))
    out += enc.ram_word(0, RamFlag.EOS) + enc.footer(ram_id)
    if not mapped:  # page records in a PART section
        out += enc.section_part(SectionType.SECTION_PART, ram_id)
        for _ in range(min(_count(rng, [1, 10, 500], 20_000), (4 << 20) // ps)):
            flags = int(rng.choice([RamFlag.PAGE, RamFlag.ZERO, RamFlag.ZERO | RamFlag.CONTINUE, RamFlag.CONTINUE, 0]))
            page = _extreme(rng, rate, int(rng.integers(0, 8)), 52)
            out += S.RamWord.build((page * ps | flags) % (1 << 64))
            if not flags & RamFlag.CONTINUE and flags:
                out += S.Name8.build("pc.ram")
            out += bytes(ps) if flags & RamFlag.PAGE else (b"\0" if flags & RamFlag.ZERO else b"")
        out += enc.ram_word(0, RamFlag.EOS) + enc.footer(ram_id)
    for _ in range(_count(rng, [0, 0, 1, 3], 20_000)):
        cmd = int(rng.choice([VmCommand.SWITCHOVER_START, VmCommand.PING, 0, 0x1234, 0xFFFF]))
        data = bytes(int(rng.choice([0, 4])))
        out += bytes([SectionType.COMMAND]) + struct.pack(">HH", cmd, len(data)) + data
    devices = []
    for i in range(_count(rng, [0, 2, 5, 40], 3000)):
        sid = 3 + i
        name = _name(rng, f"dev{i % 7}")
        payload = bytes(int(rng.choice([0, 1, 4, 100])))
        out += enc.section_full(SectionType.SECTION_FULL, sid, name[:60], 0, 1) + payload + enc.footer(sid)
        devices.append({"name": name[:60], "instance_id": 0, "fields": [{"name": "f", "size": len(payload)}]})
    out += enc.ram_eos_section(SectionType.SECTION_END, ram_id)
    out += bytes([SectionType.EOF])
    if rng.random() < 0.9:
        text = odd_json(rng, devices, ps)
        out += S.VmDescriptionHead.build({"length": len(text)}) + text
    return bytes(out)


def hot_offsets(path: Path) -> list[int]:
    """Offsets of fields worth hitting: headers, lengths and offsets of the structures."""
    hot = [0, 4, 8]
    with mappedram.open(path) as snap:
        for block in snap:
            hot += [block.entry_offset, block.entry_offset + 1 + len(block.name.encode())]
            if isinstance(block, mappedram.MappedRamBlock):
                hot += [block.header_offset + d for d in (0, 4, 12, 20)]
        for sec in snap.sections:
            hot += [sec.offset, sec.offset + 1] + ([sec.end - 4] if sec.end else [])
        if snap.vmdesc_location:
            hot += [snap.vmdesc_location[0] + 1]
    return hot


def run(
    seeds: list[Path],
    examples: int,
    workdir: Path,
    seed: int = 0,
    generated: float = 0.0,
    keep_going: bool = False,
    seconds: float | None = None,
) -> dict[str, int]:
    """``examples`` inputs (fewer if ``seconds`` run out): a share ``generated`` built from
    the schemas, the rest mutated seeds. A failing input is saved to the corpus;
    ``keep_going`` counts it and goes on."""
    rng = np.random.default_rng(seed)
    prepared = [prepare(p) for p in seeds]
    counts = {"ok": 0, "format-error": 0, "failed": 0}
    stop = None if seconds is None else time.monotonic() + seconds
    for i in range(examples):
        if stop is not None and time.monotonic() > stop:
            break
        case = workdir / "case.bin"
        if rng.random() < generated:
            case.write_bytes(generate(rng))
        else:
            case.write_bytes(mutate(prepared[i % len(prepared)], rng))
        try:
            result = exercise(case, workdir)
        except BaseException as err:
            CORPUS.mkdir(exist_ok=True)
            kept = CORPUS / f"crash-{seed}-{i}.bin"
            kept.write_bytes(case.read_bytes())
            print(f"failing input kept as {kept}: {type(err).__name__}: {str(err)[:300]}", file=sys.stderr)
            if not keep_going or isinstance(err, KeyboardInterrupt):
                raise
            counts["failed"] += 1
            continue
        counts["ok" if result == "ok" else "format-error"] += 1
    return counts


def main() -> None:
    import argparse

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import fixture_file

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--generated", type=float, default=0.3, help="share of inputs built from the schemas (default 0.3)"
    )
    parser.add_argument("--keep-going", action="store_true", help="count failing inputs and go on")
    parser.add_argument("--seconds", type=float, help="stop after this long, with the summary")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        seeds = make_seeds(fixture_file("pc64-a-paused-mr.bin"), work)
        counts = run(seeds, args.examples, work, args.seed, args.generated, args.keep_going, args.seconds)
    print(
        f"{sum(counts.values())} inputs: {counts['ok']} valid, {counts['format-error']} rejected with FormatError, "
        f"{counts['failed']} failed"
    )


if __name__ == "__main__":
    main()
