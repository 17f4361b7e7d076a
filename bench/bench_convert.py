"""Streaming convert against its baselines, every figure beside its baseline in one run.

Each figure is the best of N runs, ours and the baseline interleaved, on the same file
from a warm page cache; ours run in a fresh child process (its peak RSS from VmHWM):

(a) a libvirt zstd image of a 1 GiB guest converted to a sparse (mapped-ram) image,
    beside ``zstd -dc`` of the same compressed bytes to /dev/null;
(b) a 4 GiB guest converted stream -> mapped-ram and mapped-ram -> stream, beside
    ``cp --sparse=always`` of the same input file followed by ``sync FILE`` (fsync);
    convert fsyncs its output too;
(c) the same 4 GiB mapped-ram file rewritten as mapped-ram (a mapped-ram source's
    extents read and copied into the output's slots), beside the same ``cp``.

Every conversion into mapped-ram runs with each of ``--channels`` (1,2,4 by default:
the channel threads that write the output's slots), interleaved in the same round as
its baseline; the ratio between channel counts is the figure to read.

The guests are dense (every page populated, none zero): each 4 KiB page holds 1 KiB
of random bytes and 3 KiB of a word repeated (about 4:1 for zstd, like a guest's
memory, and never a zero page).

    python bench/bench_convert.py [--runs 3] [--dir DIR] [--small-gib 1] [--big-gib 4] [--channels 1,2,4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

PAGE = 4096

MAKE = textwrap.dedent(
    """
    import sys
    import numpy as np
    from mappedram.formats import structs as S
    from mappedram.mapper.writer import SnapshotWriter
    path, size, libvirt = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    pages = np.empty((size // 4096, 4096), dtype=np.uint8)
    rng = np.random.default_rng(7)
    for at in range(0, len(pages), 65536):
        part = pages[at : at + 65536]
        part[:, :1024] = rng.integers(0, 256, (len(part), 1024), dtype=np.uint8)
        words = np.arange(at, at + len(part), dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) | np.uint64(1)
        part[:, 1024:] = np.repeat(words[:, None], 384, axis=1).view(np.uint8)
    xml = b"<domain type='kvm'><name>bench</name></domain>\\n\\0"
    prefix = b""
    if libvirt:
        prefix = S.LibvirtHeaderLE.build({"data_len": len(xml) + 65536, "format": "sparse", "was_running": 1})
        prefix += xml + bytes(65536)
    with SnapshotWriter(path, {"pc.ram": pages.reshape(-1)}, channels=2, prefix=prefix) as w:
        w.complete()
    """
)

CONVERT = textwrap.dedent(
    """
    import json, sys, time
    import mappedram
    src, out, to, channels = sys.argv[1:5]
    compress = sys.argv[5] if len(sys.argv) > 5 else None
    t = time.perf_counter()
    mappedram.convert(src, out, to, compress=compress, channels=int(channels))
    seconds = time.perf_counter() - t
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    print(json.dumps({"seconds": seconds, "rss_mib": int(hwm) / 1024}))
    """
)


def child(script: str, *args: str, package: str | None = None) -> dict:
    env = None if package is None else dict(os.environ, PYTHONPATH=package)
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed(*argv: str, stdout: int | None = None) -> float:
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=stdout)
    return time.perf_counter() - t


def cp_fsync(src: str, dst: str) -> float:
    os.sync()
    t = time.perf_counter()
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)
    subprocess.run(["sync", dst], check=True)
    seconds = time.perf_counter() - t
    os.unlink(dst)
    return seconds


def ours(src: str, out: str, to: str, channels: int = 1, *extra: str, package: str | None = None) -> dict:
    os.sync()  # no run pays for the writeback of another
    result = child(CONVERT, src, out, to, str(channels), *extra, package=package)
    os.unlink(out)
    return result


def line(what: str, nbytes: int, mine: list[dict], base: list[float], base_name: str, one: float = 0.0) -> None:
    best = min(r["seconds"] for r in mine)
    rss = max(r["rss_mib"] for r in mine)
    ref = min(base)
    gib = nbytes / (1 << 30)
    vs_one = f" | {one / best:4.2f}x 1 channel" if one else ""
    print(
        f"{what:<43} {best:7.2f} s {gib / best:6.2f} GiB/s  peak RSS {rss:6.1f} MiB | "
        f"{base_name}: {ref:6.2f} s {gib / ref:6.2f} GiB/s | ours {ref / best:4.2f}x its speed{vs_one}"
    )


def channel_lines(what: str, nbytes: int, mine: dict, base: list[float], base_name: str) -> None:
    """One line per channel count (and "before", another checkout's convert, if run)."""
    one = min(r["seconds"] for r in mine[min(c for c in mine if isinstance(c, int))])
    for count, runs in mine.items():
        label = f"{count} ch" if isinstance(count, int) else "before"
        line(f"{what}, {label}", nbytes, runs, base, base_name, one)


def into_mapped_ram(src: str, out: str, count: int | str, before: str | None) -> dict:
    """ours() into mapped-ram with ``count`` channels, or with the package in ``before``
    for the count "before" (its default channels)."""
    if count == "before":
        return ours(src, out, "mapped-ram", 1, package=before)
    return ours(src, out, "mapped-ram", int(count))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the inputs go (needs about 4x --big-gib free)")
    parser.add_argument("--small-gib", type=float, default=1)
    parser.add_argument("--big-gib", type=float, default=4)
    parser.add_argument("--channels", default="1,2,4", help="channel counts for the conversions into mapped-ram")
    parser.add_argument(
        "--before", metavar="DIR", help="also time the conversions into mapped-ram with the mappedram package in DIR"
    )
    args = parser.parse_args()
    counts: list = [int(c) for c in args.channels.split(",")] + (["before"] if args.before else [])
    work = tempfile.mkdtemp(prefix="bench-convert-", dir=args.dir)
    try:
        small, big = int(args.small_gib * (1 << 30)), int(args.big_gib * (1 << 30))
        j = lambda name: os.path.join(work, name)  # noqa: E731
        print(f"building inputs in {work} ... (load average {os.getloadavg()[0]:.2f})", flush=True)
        # (a) a libvirt zstd image: writer -> sparse image -> convert --compress zstd
        subprocess.run([sys.executable, "-c", MAKE, j("small.sparse"), str(small), "1"], check=True)
        child(CONVERT, j("small.sparse"), j("small.zst.sav"), "stream", "1", "zstd")
        import mappedram  # noqa: PLC0415

        with mappedram.open(j("small.zst.sav")) as snap:
            start = snap.stream_start
        with open(j("small.zst.sav"), "rb") as f, open(j("small.zst"), "wb") as out:
            f.seek(start)
            shutil.copyfileobj(f, out, 1 << 20)  # the same compressed bytes, for zstd -dc
        os.unlink(j("small.sparse"))
        # (b) a 4 GiB guest, mapped-ram and classic
        subprocess.run([sys.executable, "-c", MAKE, j("big.mr"), str(big), "0"], check=True)
        child(CONVERT, j("big.mr"), j("big.stream"), "stream", "1")
        sizes = {n: os.path.getsize(j(n)) for n in ("small.zst", "big.mr", "big.stream")}
        print(
            f"inputs: {args.small_gib:g} GiB guest as zstd image {sizes['small.zst'] / (1 << 20):.0f} MiB; "
            f"{args.big_gib:g} GiB guest as mapped-ram {sizes['big.mr'] / (1 << 30):.2f} GiB, "
            f"as a classic stream {sizes['big.stream'] / (1 << 30):.2f} GiB; best of {args.runs}, interleaved"
        )
        a_base, s_base, m_base, r_base, m_ours = [], [], [], [], []
        a_ours: dict[int, list[dict]] = {c: [] for c in counts}
        s_ours: dict[int, list[dict]] = {c: [] for c in counts}
        r_ours: dict[int, list[dict]] = {c: [] for c in counts}
        with open(os.devnull, "wb") as null:
            for _ in range(args.runs):
                a_base.append(timed("zstd", "-dc", "-q", j("small.zst"), stdout=null.fileno()))
                for c in counts:
                    a_ours[c].append(into_mapped_ram(j("small.zst.sav"), j("out.sav"), c, args.before))
                s_base.append(cp_fsync(j("big.stream"), j("copy")))
                for c in counts:
                    s_ours[c].append(into_mapped_ram(j("big.stream"), j("out.sav"), c, args.before))
                m_base.append(cp_fsync(j("big.mr"), j("copy")))
                m_ours.append(ours(j("big.mr"), j("out.sav"), "stream"))
                r_base.append(cp_fsync(j("big.mr"), j("copy")))
                for c in counts:
                    r_ours[c].append(into_mapped_ram(j("big.mr"), j("out.sav"), c, args.before))
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        gib = f"{args.big_gib:g} GiB"
        channel_lines(f"(a) {args.small_gib:g} GiB zstd image -> sparse", small, a_ours, a_base, "zstd -dc >/dev/null")
        channel_lines(f"(b) {gib} stream -> mapped-ram", big, s_ours, s_base, "cp --sparse + fsync")
        line(f"(b) {gib} mapped-ram -> stream", big, m_ours, m_base, "cp --sparse + fsync")
        channel_lines(f"(c) {gib} mapped-ram -> mapped-ram", big, r_ours, r_base, "cp --sparse + fsync")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
