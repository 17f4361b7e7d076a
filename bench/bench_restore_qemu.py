"""Restore of a real QEMU 10 mapped-ram file: QEMU's own load against mappedram.restore.

Boots the tests' boot-sector guest (tests/guest/boot.S stamps every page) with
``--ram-mb`` of RAM under QEMU 10 (TCG), saves it paused with mapped-ram, then times,
interleaved (a, b, c, a, b, c...), best of ``--runs``, page cache warmed before each:

- QEMU: a fresh ``qemu-system-x86_64 -incoming defer``; ``migrate-incoming file:PATH``
  until ``query-migrate`` says completed (polled every 2 ms), with mapped-ram alone and
  with multifd (4 channels). QEMU advises its guest RAM for transparent huge pages.
- mappedram: ``mappedram.restore(path, channels=N)`` in a fresh child process, N = 1, 2,
  4, into plain calloc memory (the default) and into memory advised for transparent
  huge pages (``huge_pages=True``).

    python bench/bench_restore_qemu.py [--ram-mb 1024] [--runs 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from qemu_vm import Vm, build_guest, qemu_binary, save  # noqa: E402  (the tests' QEMU driver)

OURS = """
import json, sys, time
import mappedram
from mappedram.mapper import restore, snapshot  # imported before the clock starts, as QEMU is started before its
path, channels, huge = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "huge"
t = time.perf_counter()
arrays = mappedram.restore(path, channels=channels, huge_pages=huge)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "bytes": sum(a.nbytes for a in arrays.values())}))
"""


def stamped(vm: Vm, ram_mb: int, timeout: float = 600) -> None:
    """Until the guest has stamped its last page (boot.S writes 'PRAM' at offset 4)."""
    last_page = ((ram_mb - 1) << 20) - 0x1000
    deadline = time.monotonic() + timeout
    while vm.read_u32(last_page + 4) != 0x4D415250:
        if time.monotonic() > deadline:
            raise TimeoutError("the guest did not stamp its pages")
        time.sleep(0.2)


def qemu_load(workdir: Path, image: Path, path: Path, ram_mb: int, multifd: bool) -> float:
    with Vm(workdir, image, incoming=True, name="incoming", ram_mb=ram_mb) as vm:
        vm.set_caps(mapped_ram=True, multifd=multifd)
        if multifd:
            vm.cmd("migrate-set-parameters", **{"multifd-channels": 4})
        start = time.perf_counter()
        vm.cmd("migrate-incoming", uri=f"file:{path}")
        while True:
            status = vm.cmd("query-migrate").get("status")
            if status == "completed":
                return time.perf_counter() - start
            if status in ("failed", "cancelled"):
                raise RuntimeError(f"QEMU's load {status}")
            time.sleep(0.002)


def ours(path: Path, channels: int, huge: bool) -> float:
    out = subprocess.run(
        [sys.executable, "-c", OURS, str(path), str(channels), "huge" if huge else "plain"],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(REPO)},
    ).stdout
    return json.loads(out)["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ram-mb", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    if qemu_binary() is None:
        raise SystemExit("needs qemu-system-x86_64 10.0 or later")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        workdir = Path(tmp)
        image = build_guest(workdir, args.ram_mb)
        path = workdir / "guest.sav"
        with Vm(workdir, image, name="source", ram_mb=args.ram_mb) as vm:
            stamped(vm, args.ram_mb)
            save(vm, f"file:{path}", mapped_ram=True)
        configs = {
            "QEMU migrate-incoming, mapped-ram": lambda: qemu_load(workdir, image, path, args.ram_mb, False),
            "QEMU migrate-incoming, multifd 4": lambda: qemu_load(workdir, image, path, args.ram_mb, True),
        }
        for channels in (1, 2, 4):
            configs[f"mappedram.restore, {channels} ch, huge pages"] = lambda c=channels: ours(path, c, True)
            configs[f"mappedram.restore, {channels} ch, calloc"] = lambda c=channels: ours(path, c, False)
        runs: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(args.runs):
            for name, measure in configs.items():
                # this VM's host reclaims idle page cache within minutes: warm it before each
                subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
                runs[name].append(measure())
        best = {name: min(times) for name, times in runs.items()}
        base = min(seconds for name, seconds in best.items() if name.startswith("QEMU"))
        print(
            f"restore of a {args.ram_mb} MiB QEMU 10 mapped-ram save ({path.stat().st_size / 2**20:.0f} MiB file), "
            f"best of {args.runs} (and median), interleaved, page cache warmed before each"
        )
        print(f"{'':42} {'seconds':>8} {'median':>8} {'faster QEMU row / this':>23}")
        for name, seconds in best.items():
            print(f"{name:42} {seconds:>8.3f} {statistics.median(runs[name]):>8.3f} {base / seconds:>22.2f}x")


if __name__ == "__main__":
    main()
