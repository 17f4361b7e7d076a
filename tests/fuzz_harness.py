"""Mutating real snapshots and feeding them to every entry point.

The seeds are small files that carry the real device sections and VM description of a
QEMU 10.0 fixture (mapped-ram, and the classic stream) with tiny RAM blocks, so a
mutation lands in interesting bytes most of the time. ``exercise()`` runs open, dump,
verify, extract and restore on one input: only FormatError may escape, each input is
bounded in time, and no input may allocate more than its own size (plus a fixed slack).

    python3 tests/fuzz_harness.py --examples 20000     # the long run (see README)
"""

from __future__ import annotations

import signal
import sys
import tempfile
import tracemalloc
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

import mappedram
from mappedram import FormatError
from mappedram.mapper.convert import to_stream

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


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"an input took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def exercise(path: Path, workdir: Path) -> str:
    """Run every entry point on ``path``; returns "ok" or the FormatError text.
    Anything but FormatError (or MemoryError's clear refusal) propagates."""
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


def _blocks(path: Path) -> list[dict]:
    with mappedram.open(path) as snap:
        return [b.describe() for b in snap]


def mutate(data: bytes, rng: np.random.Generator, hot: list[int]) -> bytes:
    """One of: bit flips, a truncation, an extreme value over a field, a splice."""
    buf = bytearray(data)
    kind = rng.integers(5)
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
    else:  # break the VM description
        at = data.rfind(b'"devices"')
        if at > 0:
            buf[at + int(rng.integers(0, 40))] = int(rng.integers(256))
    return bytes(buf)


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


def run(seeds: list[Path], examples: int, workdir: Path, seed: int = 0) -> dict[str, int]:
    """Mutate the seeds ``examples`` times; a failing input is saved to the corpus."""
    rng = np.random.default_rng(seed)
    prepared = [(p.read_bytes(), hot_offsets(p)) for p in seeds]
    counts = {"ok": 0, "format-error": 0}
    for i in range(examples):
        data, hot = prepared[i % len(prepared)]
        case = workdir / "case.bin"
        case.write_bytes(mutate(data, rng, hot))
        try:
            result = exercise(case, workdir)
        except BaseException:
            CORPUS.mkdir(exist_ok=True)
            kept = CORPUS / f"crash-{seed}-{i}.bin"
            kept.write_bytes(case.read_bytes())
            print(f"failing input kept as {kept}", file=sys.stderr)
            raise
        counts["ok" if result == "ok" else "format-error"] += 1
    return counts


def main() -> None:
    import argparse

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import fixture_file

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        seeds = make_seeds(fixture_file("pc64-a-paused-mr.bin"), work)
        counts = run(seeds, args.examples, work, args.seed)
    print(
        f"{args.examples} inputs: {counts['ok']} valid, {counts['format-error']} rejected with FormatError, "
        f"0 other exceptions"
    )


if __name__ == "__main__":
    main()
