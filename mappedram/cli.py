"""The ``mappedram`` command line: dump, verify and extract snapshot files.

Exit codes: 0 success (verify: the file is valid), 1 the file is malformed (verify:
invalid), 2 the file cannot be read or the command line is wrong, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from . import __version__
from .errors import FormatError
from .formats.bitmap import BIG_ENDIAN_64, LITTLE_ENDIAN_64
from .mapper.blocks import not_in_file
from .mapper.channels import MAX_CHANNELS, check_count
from .mapper.snapshot import Snapshot
from .mapper.verify import verify
from .progress import ProgressBar, human

EXIT_OK, EXIT_INVALID, EXIT_UNREADABLE, EXIT_INTERRUPTED = 0, 1, 2, 130

DESCRIPTION = """\
Read and check QEMU snapshot files made by `migrate file:...` with the mapped-ram
capability (QEMU >= 9.0, `virsh save --image-format sparse`), and classic streams.
A libvirt save header in front of the stream is recognised by itself; for a
`file:PATH,offset=N` save without one, the stream is looked for in the first MiB
(or give --offset N)."""

EPILOG = """\
exit codes: 0 ok / valid, 1 malformed or invalid file, 2 unreadable file or bad usage

examples:
  mappedram dump vm.sav
  mappedram dump --json vm.sav | jq '.blocks[] | {name, pages_present}'
  mappedram verify --hash vm.sav
  mappedram extract vm.sav --block pc.ram -o pc.ram.raw
  mappedram convert legacy.sav vm.sav --to mapped-ram"""


def _int(text: str) -> int:
    return int(text, 0)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("file", help="the snapshot file")
    common.add_argument(
        "--offset", type=_int, metavar="N", help="where the QEMU stream starts (the offset= of file:PATH,offset=N)"
    )
    common.add_argument(
        "--page-size", type=_int, metavar="BYTES", help="target page size, for a classic stream that does not record it"
    )
    common.add_argument(
        "--bitmap-order",
        choices=("little", "big"),
        default="little",
        help="byte order of the host that wrote the bitmaps (big: s390x, ppc64)",
    )

    parser = argparse.ArgumentParser(
        prog="mappedram", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dump = sub.add_parser(
        "dump",
        parents=[common],
        help="summarise a snapshot file",
        description="Print the header, machine, capabilities, page size, every RAM block "
        "(size, offsets, populated pages) and the sections of the stream.",
    )
    dump.add_argument("--json", action="store_true", help="print the stable JSON form (see README)")
    dump.add_argument("--no-sections", action="store_true", help="leave out the list of sections")

    ver = sub.add_parser(
        "verify",
        parents=[common],
        help="check the structure of a snapshot file",
        description="Check magic and versions, block headers, page alignment, that bitmaps, "
        "page regions and the stream lie inside the file without overlapping, "
        "bitmap bits past the last page, block lengths against MEM_SIZE, section "
        "footers, RAM flags against the mode, EOF and the VM description. "
        "Each problem is printed with its file offset.",
    )
    ver.add_argument(
        "--hash",
        action="store_true",
        help="also print the sha256 of each block's RAM as QEMU would restore it (clear pages as zeros), "
        "for blocks whose clear pages are at most 4 GiB plus 16 times the page data the file holds for them; "
        "for the others the sparse-sha256 (the non-zero pages and their numbers), whose time follows the file",
    )
    ver.add_argument(
        "--hash-zeros",
        action="store_true",
        help="with --hash: the sha256 of every block, whatever its clear pages cost",
    )
    ver.add_argument("--json", action="store_true", help="print the report as JSON")
    ver.add_argument("--progress", action="store_true", default=None, help="show a progress bar for --hash")

    ext = sub.add_parser(
        "extract",
        parents=[common],
        help="write one RAM block as a sparse raw file",
        description="Write a block's RAM to a raw file: populated pages copied, clear pages "
        "left as holes. The output appears only when complete.",
    )
    ext.add_argument("--block", required=True, metavar="NAME", help="the RAM block, e.g. pc.ram")
    ext.add_argument("-o", "--output", required=True, metavar="OUT", help="the raw file to write")
    ext.add_argument("--force", action="store_true", help="replace OUT if it exists")
    ext.add_argument(
        "--progress", action="store_true", default=None, help="show a progress bar (default: when stderr is a terminal)"
    )
    conv = sub.add_parser(
        "convert",
        parents=[common],
        help="rewrite a snapshot as mapped-ram or as a classic stream",
        description="Rewrite the RAM of a snapshot in the other layout; device sections, machine "
        "type and section ids are carried over unchanged, so QEMU restores the output "
        "like the input (with or without the mapped-ram capability to match). The "
        "output appears only when complete.",
    )
    conv.add_argument("output", metavar="OUT", help="the file to write")
    conv.add_argument("--to", required=True, choices=("mapped-ram", "stream"), help="the layout of OUT")
    conv.add_argument(
        "--channels",
        type=_int,
        default=4,
        help=f"writer threads for --to mapped-ram, 1 to {MAX_CHANNELS} (default 4)",
    )
    conv.add_argument("--force", action="store_true", help="replace OUT if it exists")
    conv.add_argument(
        "--progress", action="store_true", default=None, help="show a progress bar (default: when stderr is a terminal)"
    )
    elf = sub.add_parser(
        "export-elf",
        parents=[common],
        help="write guest-physical memory as an ELF core",
        description="Map the RAM blocks to guest-physical addresses (x86 pc and q35: pc.ram split "
        "around the PCI hole, the VGA window left out, pc.bios below 4 GiB) and write "
        "an ELF64 core with one PT_LOAD per range, as QEMU's dump-guest-memory does "
        "with paging off; absent pages are holes. volatility3 and crash open it.",
    )
    elf.add_argument("-o", "--output", required=True, metavar="OUT", help="the core file to write")
    elf.add_argument("--force", action="store_true", help="replace OUT if it exists")
    elf.add_argument(
        "--below-4g",
        type=_int,
        metavar="BYTES",
        help="bytes of pc.ram below 4 GiB (default: QEMU's rule for the machine type)",
    )
    elf.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="BLOCK=ADDR",
        help="also map BLOCK at ADDR, e.g. 0000:00:02.0/vga.vram=0xfd000000 (repeatable)",
    )
    elf.add_argument(
        "--progress", action="store_true", default=None, help="show a progress bar (default: when stderr is a terminal)"
    )
    return parser


def _open_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "offset": args.offset,
        "page_size": args.page_size,
        "bitmap_layout": BIG_ENDIAN_64 if args.bitmap_order == "big" else LITTLE_ENDIAN_64,
    }


def _print_dump(info: dict[str, Any]) -> None:
    print(f"file:          {info['file']} ({info['size']} bytes, {human(info['size'])})")
    lv = info["libvirt"]
    if lv:
        state = "complete" if lv["complete"] else "INCOMPLETE"
        print(
            f"libvirt:       save header v{lv['version']} ({state}), format {lv['format']}, "
            f"data_len {lv['data_len']}, {lv['byteorder']}-endian"
        )
    print(f"stream:        QEVM v{info['version']} at {info['stream_start']:#x}, format {info['format']}")
    print(f"machine:       {info['machine_type'] or '(no configuration section)'}")
    print(f"capabilities:  {', '.join(info['capabilities']) or '(none)'}")
    print(
        f"page size:     {info['page_size']}"
        + (f" (target-page-bits {info['target_page_bits']})" if info["target_page_bits"] else "")
    )
    if info["uuid"]:
        print(f"uuid:          {info['uuid']}")
    print(
        f"RAM:           {info['ram_total']} bytes ({human(info['ram_total'] or 0)}) in {len(info['blocks'])} "
        f"blocks, section at {info['ram_section_offset']:#x}"
    )
    width = max([len(b["name"]) for b in info["blocks"]] + [5])
    mapped = info["format"] == "mapped-ram"
    print(
        f"  {'block':<{width}}  {'used_length':>12}  {'present':>9}/{'pages':<9}"
        + (f"  {'bitmap_offset':>13}  {'pages_offset':>12}" if mapped else "")
    )
    for b in info["blocks"]:
        line = f"  {b['name']:<{width}}  {b['used_length']:>12}  {b['pages_present']:>9}/{b['pages_total']:<9}"
        if not b["in_file"]:
            line += "  not in the file (x-ignore-shared)"
        elif mapped:
            line += f"  {b['bitmap_offset']:>#13x}  {b['pages_offset']:>#12x}"
        print(line)
    if "sections" in info:
        print(f"sections:      {len(info['sections'])}")
        for s in info["sections"]:
            detail = s.get("command") or " ".join(
                str(x)
                for x in (
                    s.get("idstr"),
                    f"id {s['section_id']}" if "section_id" in s else None,
                    f"instance {s['instance_id']}" if "instance_id" in s else None,
                    f"v{s['version_id']}" if "version_id" in s else None,
                )
                if x is not None
            )
            size = f"  payload {s['payload_length']} bytes" if "payload_length" in s else ""
            print(f"  {s['offset']:#12x}  {s['kind']:<7}  {detail}{size}")
    vm = info["vmdesc"]
    print("vmdesc:        " + (f"{vm['json_length']} bytes of JSON at {vm['offset'] + 5:#x}" if vm else "(none)"))


def _cmd_dump(args: argparse.Namespace) -> int:
    with Snapshot(args.file, **_open_args(args)) as snap:
        info = snap.describe(sections=not args.no_sections)
        info["problems"] = [{"offset": p.offset, "message": p.text} for p in snap.problems]
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        print()
    else:
        _print_dump(info)
        for p in info["problems"]:
            print(f"warning: offset {p['offset']:#x}: {p['message']}")
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    bar = ProgressBar("hashing", args.progress) if args.hash else None
    report = verify(args.file, hash_blocks=args.hash, hash_zeros=args.hash_zeros, progress=bar, **_open_args(args))
    if bar and report.hashes:
        bar.close()
    if args.json:
        json.dump(report.describe(), sys.stdout, indent=2)
        print()
    else:
        for p in report.problems:
            print(f"{args.file}: offset {p.offset:#x} ({p.offset}): {p.text}")
        for name, digest in report.hashes.items():
            print(f"{digest}  {name}")
        for name, sparse in report.sparse.items():
            if name not in report.hashes:
                print(
                    f"{sparse.digest}  {name} (sparse-sha256: {sparse.nonzero_pages} non-zero of {sparse.pages} pages)"
                )
        if report.ok:
            print(f"{args.file}: valid" + "".join(f" ({n})" for n in report.notes))
    return EXIT_OK if report.ok else EXIT_INVALID


def _cmd_extract(args: argparse.Namespace) -> int:
    from .mapper.restore import extract  # imported when used: dump and verify start faster

    with Snapshot(args.file, **_open_args(args)) as snap:
        if args.block not in snap.blocks:
            print(
                f"mappedram: no RAM block {args.block!r} in {args.file}; blocks: {', '.join(snap.blocks)}",
                file=sys.stderr,
            )
            return EXIT_UNREADABLE
        if not snap.block(args.block).in_file:  # the file is valid; what was asked is not in it
            print(f"mappedram: {args.file}: {not_in_file(snap.block(args.block))}", file=sys.stderr)
            return EXIT_UNREADABLE
        bar = ProgressBar(f"extract {args.block}", args.progress)
        copied = extract(snap, args.block, args.output, overwrite=args.force, progress=bar)
        bar.close()
        block = snap.block(args.block)
    print(f"{args.output}: {block.used_length} bytes, {copied} copied from {block.populated} populated pages")
    return EXIT_OK


def _cmd_convert(args: argparse.Namespace) -> int:
    from .mapper.convert import convert

    try:
        check_count(args.channels)
    except ValueError as err:
        print(f"mappedram: --{err}", file=sys.stderr)
        return EXIT_UNREADABLE
    bar = ProgressBar(f"convert to {args.to}", args.progress)
    convert(
        args.file, args.output, args.to, channels=args.channels, overwrite=args.force, progress=bar, **_open_args(args)
    )
    bar.close()
    print(f"{args.output}: written as {args.to}")
    return EXIT_OK


def _cmd_export_elf(args: argparse.Namespace) -> int:
    from .mapper.physical import PhysicalView, export_elf

    extra = {}
    for item in args.map:
        name, sep, addr = item.rpartition("=")
        if not sep or not name:
            print(f"mappedram: --map takes BLOCK=ADDR, not {item!r}", file=sys.stderr)
            return EXIT_UNREADABLE
        extra[name] = int(addr, 0)
    with Snapshot(args.file, **_open_args(args)) as snap:
        try:
            view = PhysicalView(snap, below_4g_size=args.below_4g, extra=extra)
        except (KeyError, ValueError) as err:
            print(f"mappedram: {err.args[0]}", file=sys.stderr)
            return EXIT_UNREADABLE
        bar = ProgressBar("export-elf", args.progress)
        copied = export_elf(view, args.output, overwrite=args.force, progress=bar)
        bar.close()
    for r in view.regions:
        print(f"PT_LOAD {r.start:#014x}-{r.end:#014x}  {r.block} +{r.offset:#x}")
    print(f"{args.output}: {len(view.regions)} segments, {copied} bytes of page data")
    return EXIT_OK


COMMANDS = {
    "dump": _cmd_dump,
    "export-elf": _cmd_export_elf,
    "verify": _cmd_verify,
    "extract": _cmd_extract,
    "convert": _cmd_convert,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except FormatError as err:
        print(f"mappedram: {args.file}: {err}", file=sys.stderr)
        return EXIT_INVALID
    except BrokenPipeError:  # `mappedram dump FILE | head`: the reader left, that is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_INVALID
    except OSError as err:
        print(f"mappedram: {err.filename or args.file}: {err.strerror or err}", file=sys.stderr)
        return EXIT_UNREADABLE
    except KeyboardInterrupt:
        print("mappedram: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
