"""dump, verify and open of a classic (non-mapped-ram) stream against QEMU's own
scripts/analyze-migration.py state dump of the same file: wall time and peak RSS.

The stream is built with the project's schemas: the device sections, machine type and
VM description of the QEMU 10.0 fixture pc64-d-paused-legacy.bin, and one RAM block of
``--gib`` GiB whose every page has a PAGE record (dense, the worst case for a record
walk). Each figure is a fresh child process; runs are interleaved (a, b, c, a, b, c...)
and the best of ``--runs`` is printed. analyze-migration.py is QEMU's (not part of this
project): give its path with ``--analyze`` or MAPPEDRAM_ANALYZE_MIGRATION; without it
that row is skipped.

    python bench/bench_stream.py [--gib 1] [--runs 3] [--dir DIR] [--analyze PATH]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGE = 4096


def build_stream(path: str, ram_bytes: int) -> None:
    """A classic stream with the fixture's devices and one dense block of ``ram_bytes``."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import fixture_file  # the project's QEMU-made fixtures

    import mappedram
    from mappedram.formats import structs as S
    from mappedram.formats.constants import RamFlag
    from mappedram.mapper.encoder import DeviceState, StreamComposer

    with mappedram.open(fixture_file("pc64-d-paused-legacy.bin")) as snap:
        devices = DeviceState.from_snapshot(snap)
    comp = StreamComposer(PAGE, devices=devices)
    head = comp.head()
    pieces, _, _ = comp.ram_start(len(head), [("pc.ram", ram_bytes)])
    with open(path, "wb") as f:
        f.write(head + b"".join(data for _, data in pieces))
        f.write(comp.part_start())
        page = bytearray(os.urandom(PAGE))
        batch = bytearray()
        for number in range(ram_bytes // PAGE):
            page[:8] = number.to_bytes(8, "little")  # every page distinct and non-zero
            if number == 0:
                batch += comp.page_record("pc.ram", 0, page)
            else:
                batch += S.RamWord.build(number * PAGE | RamFlag.CONTINUE | RamFlag.PAGE) + page
            if len(batch) >= 8 << 20:
                f.write(batch)
                batch.clear()
        f.write(batch + comp.section_end() + comp.tail())


def run(argv: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS in KiB) of a child process, its output discarded."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[:4]} failed: {err[-500:]}")
    return seconds, usage.ru_maxrss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0, help="RAM of the stream (default 1 GiB)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to put the stream (default: a temp dir)")
    parser.add_argument("--analyze", default=os.environ.get("MAPPEDRAM_ANALYZE_MIGRATION"))
    args = parser.parse_args()
    env_path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    os.environ["PYTHONPATH"] = env_path
    cli = [sys.executable, "-m", "mappedram"]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "stream.bin")
        started = time.perf_counter()
        build = (
            f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); "
            f"import bench_stream; bench_stream.build_stream({path!r}, {int(args.gib * 2**30)})"
        )
        subprocess.run([sys.executable, "-c", build], check=True)  # a child: this process stays small
        size = os.path.getsize(path)
        print(
            f"classic stream: {size / 2**30:.2f} GiB, {int(args.gib * 2**30) // PAGE} PAGE records, "
            f"built in {time.perf_counter() - started:.1f} s; best of {args.runs}, interleaved, page cache warm"
        )
        subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)  # warm the cache
        configs = {
            "python3 -c pass": [sys.executable, "-c", "pass"],
            "mappedram dump": [*cli, "dump", path],
            "mappedram verify": [*cli, "verify", path],
            "mappedram.open + populated": [
                sys.executable,
                "-c",
                f"import mappedram; s = mappedram.open({path!r}); print(s.block('pc.ram').populated)",
            ],
        }
        if args.analyze and os.path.exists(args.analyze):
            configs["analyze-migration.py -d state"] = [sys.executable, args.analyze, "-f", path]
        else:
            print("analyze-migration.py: not given (--analyze PATH or MAPPEDRAM_ANALYZE_MIGRATION); row skipped")
        best: dict[str, tuple[float, int]] = {}
        for _ in range(args.runs):
            for name, argv in configs.items():
                seconds, rss = run(argv)
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, max(rss, best.get(name, (0, 0))[1]))
        base = best.get("analyze-migration.py -d state")
        print(f"{'':32} {'wall s':>8} {'peak RSS MiB':>13} {'vs analyze-migration':>21}")
        for name, (seconds, rss) in best.items():
            ratio = f"{base[0] / seconds:>20.2f}x" if base else ""
            print(f"{name:32} {seconds:>8.3f} {rss / 1024:>13.1f} {ratio}")


if __name__ == "__main__":
    main()
