"""dump and verify of huge sparse mapped-ram snapshots: time and peak memory.

Builds, with the project's schemas, snapshots of guests of 1 GiB, 64 GiB and 1 TiB
(sparse files: a real bitmap with every 97th page set, the pages themselves holes),
then runs ``mappedram dump`` and ``mappedram verify`` on each as child processes and
prints wall time and peak RSS side by side. Memory must not grow with the guest;
the baselines are ``python3 -c pass`` (the interpreter alone) and ``mappedram
--version`` (the interpreter and the CLI's imports). Every figure is the best of
``--runs`` fresh children, run interleaved (pass, --version, dump, verify, pass, ...).

The children may write bytecode (PYTHONDONTWRITEBYTECODE is dropped from their
environment) and one unmeasured run comes first: an installed package has its .pyc
files, and compiling the sources on every start would be measured instead.

    python bench/bench_huge.py [--dir DIR] [--runs N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from mappedram.formats.bitmap import LITTLE_ENDIAN_64
from mappedram.formats.constants import CAP_MAPPED_RAM
from mappedram.mapper.encoder import StreamComposer

PAGE = 4096
EVERY = 97


def build_sparse_snapshot(path: str, ram_bytes: int) -> int:
    """A one-block mapped-ram file for a guest of ``ram_bytes``; returns pages set."""
    comp = StreamComposer(PAGE, capabilities=[CAP_MAPPED_RAM], machine="pc-q35-10.0")
    head = comp.head()
    pieces, (place,), end = comp.ram_start(len(head), [("pc.ram", ram_bytes)], LITTLE_ENDIAN_64)
    assert place is not None
    num_pages = ram_bytes // PAGE
    with open(path, "wb") as f:
        f.write(head)
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)
        set_pages = 0
        chunk_pages = 1 << 23  # 1 MiB of bitmap at a time: keeps this process small, since
        # a child started by fork inherits its RSS into ru_maxrss
        for first in range(0, num_pages, chunk_pages):
            count = min(chunk_pages, num_pages - first)
            present = (np.arange(first, first + count) % EVERY) == 0
            set_pages += int(present.sum())
            f.seek(place.bitmap_offset + first // 8)
            f.write(np.packbits(present, bitorder="little").tobytes())
        f.seek(end)
        f.write(comp.tail())
    return set_pages


# Peak RSS of the child's own address space (VmHWM). ru_maxrss from wait4 would also
# count this process, whose memory the child carries until it execs.
_PEAK = (
    "import sys\n"
    "from mappedram.cli import main\n"
    "try:\n"
    "    code = main(sys.argv[1:])\n"
    "finally:\n"
    "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
    "    print('VmHWM', hwm, file=sys.stderr)\n"
    "sys.exit(code)\n"
)

# The interpreter alone, reporting its peak the same way.
_PASS = (
    "import sys\n"
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
    "print('VmHWM', hwm, file=sys.stderr)\n"
)


_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def run(args: list[str], code: str = _PEAK) -> tuple[float, int, int]:
    """(seconds, peak RSS in KiB, exit code) of ``mappedram ARGS`` in a child process."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_ENV
    )
    seconds = time.perf_counter() - start
    peak = int(proc.stderr.split("VmHWM")[-1].split()[0])
    return seconds, peak, proc.returncode


def best_of(runs: int, commands: dict[str, tuple[list[str], str]]) -> dict[str, tuple[float, int]]:
    """Per command, the best (seconds, peak RSS in KiB) of ``runs`` rounds; each round runs
    every command once, in order. A command that fails stops the bench."""
    best: dict[str, tuple[float, int]] = {}
    for _ in range(runs):
        for name, (args, code) in commands.items():
            seconds, peak, status = run(args, code)
            assert status == 0, (name, status)
            old = best.get(name)
            best[name] = (min(seconds, old[0]), min(peak, old[1])) if old else (seconds, peak)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="where to put the sparse files (default: a temp dir)")
    parser.add_argument("--runs", type=int, default=5, help="rounds; the best of them is printed (default 5)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        commands: dict[str, tuple[list[str], str]] = {"pass": ([], _PASS), "version": (["--version"], _PEAK)}
        guests = {}
        for gib in (1, 64, 1024):
            path = os.path.join(tmp, f"guest-{gib}g.bin")
            guests[gib] = path, build_sparse_snapshot(path, gib << 30)
            commands[f"dump {gib}"] = (["dump", path], _PEAK)
            commands[f"verify {gib}"] = (["verify", path], _PEAK)
        best_of(1, commands)  # bytecode written, page cache warm
        load = os.getloadavg()[0]
        best = best_of(args.runs, commands)
        print(f"best of {args.runs}, load average {load:.2f} before and {os.getloadavg()[0]:.2f} after")
        for name, label in (("pass", "`python3 -c pass`:     "), ("version", "`mappedram --version`:")):
            seconds, peak = best[name]
            print(f"baseline {label} {seconds:6.3f} s, peak RSS {peak / 1024:7.1f} MiB")
        print(
            f"{'guest RAM':>10} {'file (apparent)':>16} {'on disk':>10} {'bitmap':>10} "
            f"{'dump s':>7} {'dump RSS MiB':>12} {'verify s':>8} {'verify RSS MiB':>14}"
        )
        for gib, (path, pages) in guests.items():
            st = os.stat(path)
            (dump_t, dump_rss), (ver_t, ver_rss) = best[f"dump {gib}"], best[f"verify {gib}"]
            bitmap = (gib << 30) // PAGE // 8
            print(
                f"{gib:>7} GiB {st.st_size / 2**30:>12.1f} GiB {st.st_blocks * 512 / 2**20:>6.1f} MiB "
                f"{bitmap / 2**20:>6.1f} MiB {dump_t:>7.3f} {dump_rss / 1024:>12.1f} "
                f"{ver_t:>8.3f} {ver_rss / 1024:>14.1f}   ({pages} pages set)"
            )


if __name__ == "__main__":
    main()
