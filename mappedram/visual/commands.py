"""The ``diff``, ``plot`` and ``report`` subcommands of the ``mappedram`` command line.

``register(subparsers)`` adds them; ``COMMANDS`` maps each name to its handler. Errors
are one line on stderr; diff exits like ``cmp`` (0 identical, 1 different, 2 trouble).
The handlers import their modules (numpy, the plots) when they run: registering them
costs the other commands nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack
from typing import TYPE_CHECKING, Callable

from .. import cli_args
from ..errors import FormatError
from ..mapper.output import check_output
from ..mapper.snapshot import Snapshot
from ..textsafe import printable

if TYPE_CHECKING:
    from .diff import DiffResult
from .workers import MAX_WORKERS

EXIT_OK, EXIT_DIFFERENT, EXIT_TROUBLE = 0, 1, 2  # report: 1 is "invalid", as for verify
SHOWN_RUNS = 8  # runs listed per block in the text form; --json lists all
CHANGES = {"changed": "", "only_a": " (only in A)", "only_b": " (only in B)"}


def _out(line: str = "") -> None:
    print(printable(line))


def _err(line: str) -> None:
    print(printable(f"mappedram: {line}"), file=sys.stderr)


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add diff, plot and report to the ``mappedram`` subcommands."""
    d = sub.add_parser(
        "diff",
        help="the pages that differ between two snapshots of one VM",
        description="Compare two snapshots of one VM (the same RAM blocks and sizes) as QEMU "
        "would restore them: per block the pages whose contents differ, including pages "
        "present in one file only unless they are all zero (a clear page restores as zeros), "
        "and the device sections whose state differs. A classic stream and its mapped-ram "
        "conversion compare identical. Exit 0 identical, 1 different, 2 trouble, like cmp.",
    )
    d.add_argument("a", metavar="A", help="the first snapshot file")
    d.add_argument("b", metavar="B", help="the second snapshot file")
    d.add_argument("--json", action="store_true", help="print the result as JSON, with every run")
    d.add_argument(
        "--workers",
        type=cli_args.workers,
        default=2,
        metavar="N",
        help=f"threads comparing page data, 1 to {MAX_WORKERS} (default 2)",
    )
    d.add_argument("--plot", metavar="OUT", help="also draw where the pages differ, per block (.png or .svg)")
    d.add_argument("--force", action="store_true", help="replace the --plot file if it exists")
    cli_args.add_open_options(d, "where the QEMU stream starts in both files (the offset= of file:PATH,offset=N)")
    d.set_defaults(file=None)  # main()'s last-resort error paths name args.file; diff names A and B itself

    p = sub.add_parser(
        "plot",
        help="draw the file's layout and each block's populated pages",
        description="Draw one figure: the file along its length to scale, every part of it "
        "(headers, bitmaps, page regions, device state, VM description, gaps) with its size on a "
        "log scale, and per RAM block a map of the share of pages present. Reads headers and "
        "bitmaps only. Needs matplotlib: pip install 'mappedram[plot]'.",
    )
    p.add_argument("file", help="the snapshot file")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the picture to write (.png or .svg)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    cli_args.add_open_options(p)

    r = sub.add_parser(
        "report",
        help="write one self-contained HTML page about a snapshot file",
        description="Write one HTML file (no script, no network: pictures inline) with the header, "
        "capabilities, verify's verdict and problems, the RAM blocks, the layout, the device sections "
        "with the VM description's names for them, and the pictures (with matplotlib installed). "
        "Exit 0 when the file is valid, 1 when it is not (the page is written either way).",
    )
    r.add_argument("file", help="the snapshot file")
    r.add_argument("-o", "--output", required=True, metavar="OUT", help="the HTML file to write")
    r.add_argument("--force", action="store_true", help="replace OUT if it exists")
    cli_args.add_open_options(r)


def _print_diff(result: DiffResult) -> None:
    for bd in result.blocks.values():
        if not bd.count:
            continue
        runs = bd.runs()
        shown = ", ".join(
            f"{first}" if count == 1 else f"{first}-{first + count - 1}" for first, count in runs[:SHOWN_RUNS]
        )
        more = f", ... {len(runs) - SHOWN_RUNS} more" if len(runs) > SHOWN_RUNS else ""
        _out(
            f"{bd.name}: {bd.count} of {bd.num_pages} pages differ ({len(bd.changed)} changed, "
            f"{len(bd.only_a)} only in A, {len(bd.only_b)} only in B) in {len(runs)} runs: pages {shown}{more}"
        )
    for name, why in result.skipped.items():
        _out(f"{name}: not compared, {why}")
    if result.devices:
        _out(
            "device state differs: "
            + ", ".join(f"{d.idstr} {d.instance_id}{CHANGES[d.change]}" for d in result.devices)
        )
    if result.identical:
        _out(f"{result.a} and {result.b}: identical RAM and device state")


def _picture_problem(path: str | None) -> str | None:
    """Why a picture cannot be written to ``path`` (checked before any work), or None."""
    if path is None:
        return None
    from . import plot

    try:
        plot.image_format(path)
        plot.require_matplotlib()
    except (ValueError, plot.MissingMatplotlib) as err:
        return str(err)
    return None


def _cmd_diff(args: argparse.Namespace) -> int:
    if why := _picture_problem(args.plot):
        _err(f"{why}")
        return EXIT_TROUBLE
    try:
        result = _run_diff(args)
    except OSError as err:
        _err(f"{err.filename or args.a}: {err.strerror or err}")
        return EXIT_TROUBLE
    if result is None:
        return EXIT_TROUBLE
    if args.json:
        json.dump(result.describe(), sys.stdout, indent=2)
        print()
    else:
        _print_diff(result)
    return EXIT_OK if result.identical else EXIT_DIFFERENT


def _run_diff(args: argparse.Namespace) -> DiffResult | None:
    """The comparison (and its --plot picture), or None after printing why there is none."""
    from . import plot
    from .diff import NotComparable, diff

    with ExitStack() as stack:
        snaps = []
        for path in (args.a, args.b):
            try:
                snaps.append(stack.enter_context(Snapshot(path, **cli_args.open_args(args))))
            except FormatError as err:
                _err(f"{path}: {err}")
                return None
        inputs = [snap.fd for snap in snaps]
        if args.plot:  # before any work: the picture may replace neither input
            check_output(args.plot, overwrite=args.force, source_fds=inputs)
        for snap in snaps:
            try:
                for block in snap.blocks.values():  # bitmaps counted, a stream's records walked
                    _ = block.populated  # here, so that an error names its file
            except FormatError as err:
                _err(f"{snap.path}: {err}")
                return None
        try:
            result = diff(*snaps, workers=args.workers)
        except NotComparable as err:
            _err(f"{args.a}, {args.b}: {err}")
            return None
        except FormatError as err:  # page data past the end: the reader names the file
            _err(f"{err}")
            return None
        if args.plot:
            plot.save(plot.diff_figure(result), args.plot, overwrite=args.force, source_fds=inputs)
        return result


def _cmd_plot(args: argparse.Namespace) -> int:
    from . import plot

    if why := _picture_problem(args.output):
        _err(f"{why}")
        return EXIT_TROUBLE
    with Snapshot(args.file, **cli_args.open_args(args)) as snap:
        check_output(args.output, overwrite=args.force, source_fds=[snap.fd])  # before any work
        plot.save(plot.snapshot_figure(snap), args.output, overwrite=args.force, source_fds=[snap.fd])
    _out(f"{args.output}: layout and population of {args.file}")
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    verdict = write_report(args.file, args.output, overwrite=args.force, **cli_args.open_args(args))
    count = len(verdict.problems)
    state = "valid" if verdict.ok else f"invalid, {count} problem{'s' if count != 1 else ''}"
    _out(f"{args.output}: report on {args.file} ({state})")
    return EXIT_OK if verdict.ok else EXIT_DIFFERENT


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "diff": _cmd_diff,
    "plot": _cmd_plot,
    "report": _cmd_report,
}
