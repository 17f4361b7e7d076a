"""Restore and save throughput, live-save downtime and peak memory, against baselines.

Every figure is measured in a fresh child process (fresh memory, its own peak RSS from
VmHWM), on the same file in the same run as its baseline:

- restore of a dense snapshot from the page cache into fresh memory, 1/2/4 channels,
  against the simplest possible reader: one ``readinto()`` of the whole page region
  into a fresh numpy array (no bitmap); ``dd bs=1M`` to /dev/null is printed as the
  cache-hot ceiling (it reuses one buffer: not a fair baseline). A sparse snapshot
  (10% of the pages) shows restore time following the populated pages.
- save of a dense buffer, 1/2/4 channels, against one plain ``write()`` of the same
  bytes to a new file; both without fsync, then both with it.
- live-save downtime: from ``complete()`` until its ``on_copied`` callback (the final
  round is out of the buffer; the caller may resume), after rounds that each dirty 1%
  of the pages, for each dirty tracking mode (manual, kernel, digest), against a
  one-shot save of the same buffer and against writing just the final round's dirty
  pages (one pwrite each, into the cached file the earlier rounds left); the whole of
  ``complete()`` (bitmaps, fsync, rename) is printed beside it. 1 and 4 GiB buffers
  (``--live-gib``).

    python bench/bench_mapper.py [--gib 2] [--dir DIR] [--only live] [--live-gib 1,4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import mappedram

CHILD_PRELUDE = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np
    import mappedram
    from mappedram.mapper.writer import SnapshotWriter

    def dense(size):
        # every page non-zero and distinct
        return np.arange(size // 8, dtype=np.uint64).view(np.uint8) | np.uint8(1)

    def report(seconds, nbytes, **extra):
        hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
        print(json.dumps(dict(seconds=seconds, bytes=nbytes, rss_mib=int(hwm) / 1024, **extra)))
    """
)

RESTORE_OURS = """
snap = mappedram.open(PATH)
block = snap.block('ram')
target = np.zeros(block.used_length, dtype=np.uint8)
t = time.perf_counter()
snap.restore_into({'ram': target}, channels=CHANNELS, zero_fill=False)
report(time.perf_counter() - t, block.populated * block.page_size, check=int(target[4096 * 7 + 9]))
"""

RESTORE_BASELINE = """
snap = mappedram.open(PATH)
block = snap.block('ram')
offset, size = block.pages_offset, block.used_length
snap.close()
t = time.perf_counter()
target = np.empty(size, dtype=np.uint8)
view = memoryview(target)
with open(PATH, 'rb', buffering=0) as f:
    f.seek(offset)
    done = 0
    while done < size:  # one read() stops short of 2 GiB on Linux
        done += f.readinto(view[done:])
report(time.perf_counter() - t, size, check=int(target[4096 * 7 + 9]))
"""

SAVE_OURS = """
data = dense(SIZE)
t = time.perf_counter()
with SnapshotWriter(PATH, {'ram': data}, channels=CHANNELS, fsync=FSYNC) as w:
    w.complete()
report(time.perf_counter() - t, SIZE)
"""

SAVE_BASELINE = """
data = dense(SIZE)
t = time.perf_counter()
with open(PATH, 'wb', buffering=0) as f:
    view = memoryview(data)
    done = 0
    while done < SIZE:
        done += f.write(view[done:])
    if FSYNC:
        os.fsync(f.fileno())
report(time.perf_counter() - t, SIZE)
"""

LIVE = """
data = dense(SIZE)
pages = data.reshape(-1, 4096)
rng = np.random.default_rng(1)
with SnapshotWriter(PATH, {'ram': data}, channels=CHANNELS, dirty_tracking=TRACKING) as w:
    assert w.tracking_mode == {'ram': TRACKING}, (w.tracking_mode, w.tracking_note)
    w.save_round()
    for _ in range(3):
        dirty = rng.choice(len(pages), len(pages) // 100, replace=False)
        pages[dirty, 0] += 1
        if TRACKING == 'manual':
            w.mark_dirty('ram', dirty)
        w.save_round()
    dirty = rng.choice(len(pages), len(pages) // 100, replace=False)
    pages[dirty, 0] += 1
    if TRACKING == 'manual':
        w.mark_dirty('ram', dirty)
    t = time.perf_counter()
    resumed = []
    w.complete(on_copied=lambda: resumed.append(time.perf_counter()))
    done = time.perf_counter()
report(resumed[0] - t, SIZE, total=done - t)
"""

DIRTY_PAGES_ALONE = """
data = dense(SIZE)
pages = data.reshape(-1, 4096)
rng = np.random.default_rng(1)
for _ in range(4):  # the same pages as LIVE's final round
    dirty = rng.choice(len(pages), len(pages) // 100, replace=False)
with open(PATH, 'wb', buffering=0) as f:  # the file the earlier rounds leave: written, cached
    view = memoryview(data)
    done = 0
    while done < SIZE:
        done += f.write(view[done:])
    os.fsync(f.fileno())  # as the writer's rounds leave it: nothing waiting for the disk
pages[dirty, 0] += 1
fd = os.open(PATH, os.O_WRONLY)
t = time.perf_counter()
for page in np.sort(dirty).tolist():
    os.pwrite(fd, pages[page], page * 4096)
seconds = time.perf_counter() - t
os.close(fd)
report(seconds, len(dirty) * 4096)
"""


def child(body: str, **params: object) -> dict:
    code = CHILD_PRELUDE + "".join(f"{k} = {v!r}\n" for k, v in params.items()) + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def best_of(runs: int, configs: dict[str, tuple[str, dict]]) -> dict[str, dict]:
    """The fastest of ``runs`` runs of each config. Runs are interleaved (a, b, c, a, b, c...)
    so a slow spell of the machine hits every config alike; each starts with no dirty
    pages waiting for the disk (writeback throttling would otherwise bill one run for the
    one before) and with its output file gone (unlinking a cached file is not part of a save)."""
    results: dict[str, list[dict]] = {name: [] for name in configs}
    for _ in range(runs):
        for name, (body, params) in configs.items():
            out = params.get("PATH_OUT")
            if isinstance(out, str) and os.path.exists(out):
                os.unlink(out)
            os.sync()
            results[name].append(child(body, **params))
    return {name: min(rs, key=lambda r: r["seconds"]) for name, rs in results.items()}


def gbps(r: dict) -> float:
    return r["bytes"] / r["seconds"] / 1e9


def dd_ceiling(path: str, skip_mib: int, count_mib: int) -> float:
    t = time.perf_counter()
    subprocess.run(
        ["dd", f"if={path}", "of=/dev/null", "bs=1M", f"skip={skip_mib}", f"count={count_mib}"],
        check=True,
        capture_output=True,
    )
    return count_mib * 2**20 / (time.perf_counter() - t) / 1e9


def warm(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=2.0, help="buffer size in GiB (default 2)")
    parser.add_argument("--dir", default=None, help="where to put the files (default: a temp dir)")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure; the best is printed")
    parser.add_argument("--only", choices=("restore", "save", "live"), help="run one part only")
    parser.add_argument("--live-gib", default="1,4", help="buffer sizes of the live part, GiB (default 1,4)")
    args = parser.parse_args()
    size = int(args.gib * 2**30) // 4096 * 4096
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        out = os.path.join(tmp, "out.sav")
        if args.only in (None, "restore"):
            dense_path = os.path.join(tmp, "dense.sav")
            sparse_path = os.path.join(tmp, "sparse.sav")
            child(SAVE_OURS, PATH=dense_path, SIZE=size, CHANNELS=4, FSYNC=False)
            child(
                "data = dense(SIZE); data.reshape(-1, 4096)[np.arange(SIZE // 4096) % 10 != 0] = 0\n"
                "with SnapshotWriter(PATH, {'ram': data}) as w: w.complete()\nreport(0, SIZE)\n",
                PATH=sparse_path,
                SIZE=size,
            )
            warm(dense_path)
            warm(sparse_path)
            print(f"restore, {size / 2**30:.1f} GiB from the page cache into fresh memory (best of {args.runs})")
            configs = {"base": (RESTORE_BASELINE, {"PATH": dense_path})}
            for channels in (1, 2, 4):
                configs[f"ours{channels}"] = (RESTORE_OURS, {"PATH": dense_path, "CHANNELS": channels})
            configs["sparse"] = (RESTORE_OURS, {"PATH": sparse_path, "CHANNELS": 4})
            res = best_of(args.runs, configs)
            base = res["base"]
            with mappedram.open(dense_path) as snap:
                offset = snap.block("ram").pages_offset
            ceiling = dd_ceiling(dense_path, offset // 2**20, size // 2**20)
            print(
                f"  {'baseline readinto(), whole region':<36} {gbps(base):6.2f} GB/s  1.00x  "
                f"peak RSS {base['rss_mib']:6.0f} MiB"
            )
            print(f"  {'ceiling dd bs=1M (cache-hot buffer)':<36} {ceiling:6.2f} GB/s  {ceiling / gbps(base):.2f}x")
            for channels in (1, 2, 4):
                r = res[f"ours{channels}"]
                print(
                    f"  {f'mappedram restore, {channels} channel(s)':<36} {gbps(r):6.2f} GB/s  "
                    f"{gbps(r) / gbps(base):.2f}x  peak RSS {r['rss_mib']:6.0f} MiB"
                )
            r = res["sparse"]
            print(
                f"  {'sparse (10% populated), 4 channels':<36} {r['seconds']:6.3f} s for "
                f"{r['bytes'] / 2**30:.2f} GiB populated (dense, 4 channels: {res['ours4']['seconds']:.3f} s)"
            )

        if args.only in (None, "save"):
            print(f"save, {size / 2**30:.1f} GiB dense buffer to a new file (best of {args.runs})")
            for fsync in (False, True):
                label = "with fsync" if fsync else "no fsync"
                params = {"PATH": out, "PATH_OUT": out, "SIZE": size, "FSYNC": fsync}
                configs = {"base": (SAVE_BASELINE, params)}
                for channels in (1, 2, 4):
                    configs[f"ours{channels}"] = (SAVE_OURS, {**params, "CHANNELS": channels})
                res = best_of(args.runs, configs)
                base = res["base"]
                print(f"  {f'baseline write(), {label}':<36} {gbps(base):6.2f} GB/s  1.00x")
                for channels in (1, 2, 4):
                    r = res[f"ours{channels}"]
                    print(
                        f"  {f'SnapshotWriter, {channels} ch, {label}':<36} {gbps(r):6.2f} GB/s  "
                        f"{gbps(r) / gbps(base):.2f}x"
                    )

        if args.only in (None, "live"):
            for gib in (float(v) for v in args.live_gib.split(",")):
                live(args.runs, int(gib * 2**30) // 4096 * 4096, out)


def live(runs: int, size: int, out: str) -> None:
    print(
        f"live save, {size / 2**30:g} GiB: downtime (complete() until on_copied), 1% of pages "
        f"dirtied per round (best of {runs})"
    )
    params = {"PATH": out, "PATH_OUT": out, "SIZE": size, "CHANNELS": 4}
    modes = ("manual", "kernel", "digest")
    configs = {"oneshot": (SAVE_OURS, {**params, "FSYNC": True}), "alone": (DIRTY_PAGES_ALONE, params)}
    configs.update({mode: (LIVE, {**params, "TRACKING": mode}) for mode in modes})
    res = best_of(runs, configs)
    oneshot, alone = res["oneshot"]["seconds"], res["alone"]["seconds"]
    print(f"  {'one-shot save (4 ch, fsync)':<36} {oneshot:6.3f} s  100%")
    print(
        f"  {'pwrite() of the dirty pages alone':<36} {alone:6.3f} s  {100 * alone / oneshot:5.1f}%"
        f"  ({res['alone']['bytes'] // 4096} pages, one pwrite each, into the cached file)"
    )
    for mode in modes:
        r = res[mode]
        print(
            f"  {f'downtime, {mode} dirty tracking':<36} {r['seconds']:6.3f} s  "
            f"{100 * r['seconds'] / oneshot:5.1f}%  {r['seconds'] / alone:4.1f}x the pwrites"
            f"   (all of complete(): {r['total']:.3f} s)"
        )


if __name__ == "__main__":
    main()
