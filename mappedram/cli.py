"""The ``mappedram`` command line: dump, verify, extract, convert and export-elf.

Exit codes: 0 success (verify: the file is valid), 1 the file is malformed (verify:
invalid), 2 the file cannot be read or the command line is wrong, 130 interrupted,
141 the reader of the output went away (``mappedram dump F | head``: the output is cut
short, as for a program killed by SIGPIPE; no traceback).

Every human-readable line goes through ``_out`` or ``_err``, which escape what is not
printable (names come from the file: a newline or an ESC in them must not reach the
terminal). ``--json`` output is escaped by ``json.dump`` (``ensure_ascii``); with
``--json``, an error also prints ``{"file", "error": {"exit_code", "offset", "message"}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from typing import Any, Iterable, Mapping, NoReturn, Sequence

from . import __version__, cli_args
from .errors import FormatError
from .formats.headers import VMDESC_HEAD
from .formats.policy import COMPRESSED_FORMATS, Mode, policy_for
from .mapper.blocks import MappedRamBlock, not_in_file
from .mapper.channels import MAX_CHANNELS
from .mapper.elements import Section
from .mapper.images import open_image
from .mapper.snapshot import Snapshot
from .progress import ProgressBar, end_line, human
from .textsafe import printable
from .visual import commands as visual

EXIT_OK, EXIT_INVALID, EXIT_UNREADABLE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 0, 1, 2, 130, 141

DESCRIPTION = """\
Read and check QEMU snapshot files made by `migrate file:...` with the mapped-ram
capability (QEMU >= 9.0, `virsh save --image-format sparse`), and classic streams.
A libvirt save header in front of the stream is recognised by itself; for a
`file:PATH,offset=N` save without one, the stream is looked for in the first MiB
(or give --offset N)."""

EXIT_CODES = """\
exit codes:
  0    success (verify: the file is valid)
  1    the file is malformed (verify: it is invalid)
  2    the file cannot be read, or bad usage (one line on stderr saying why)
  130  interrupted (Ctrl-C)
  141  the reader of the output went away (e.g. `| head`): the output is cut short
With --json, an error also prints {"file", "error": {"exit_code", "offset", "message"}}.
Text from the file (names, the machine type) is printed with non-printable
characters escaped as \\xNN, \\uNNNN."""

SIZES = "N, BYTES and ADDR: decimal or 0x hex; decimal sizes may end in K, M, G, T (binary: 4K = 4096)."

EPILOG = (
    f"{EXIT_CODES}\n\n{SIZES}\n\n"
    + """\
examples:
  mappedram dump vm.sav
  mappedram dump --json vm.sav | jq '.blocks[] | {name, pages_present}'
  mappedram verify --hash vm.sav
  mappedram extract vm.sav --block pc.ram -o pc.ram.raw
  mappedram extract vm.sav --all -o vm.d
  mappedram convert legacy.sav vm.sav --to mapped-ram"""
)
SUB_EPILOG = f"{EXIT_CODES}\n\n{SIZES}"


class _Parser(argparse.ArgumentParser):
    """argparse, with bad usage said in one line (exit 2) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        end_line()
        self.exit(EXIT_UNREADABLE, printable(f"{self.prog}: {message} (see {self.prog} -h)") + "\n")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("file", help="the snapshot file")
    cli_args.add_open_options(common)

    parser = _Parser(
        prog="mappedram", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dump = sub.add_parser(
        "dump",
        parents=[common],
        epilog=SUB_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="summarise a snapshot file",
        description="Print the header, machine, capabilities, page size, every RAM block "
        "(size, offsets, populated pages) and the sections of the stream.",
    )
    dump.add_argument(
        "--json", action="store_true", help="print one JSON object (keys in README; keys are only ever added)"
    )
    dump.add_argument(
        "--no-sections",
        action="store_true",
        help="do not walk the stream past the RAM block list: no sections (JSON: sections and eof_offset null)",
    )
    shown = dump.add_mutually_exclusive_group()
    shown.add_argument(
        "--state", action="store_true", help="print every device's fields, decoded with the VM description"
    )
    shown.add_argument("--desc", action="store_true", help="print the VM description (the JSON after EOF)")
    shown.add_argument(
        "--libvirt-xml",
        action="store_true",
        help="print the domain XML of the libvirt save header (with --json: {file, domain_xml, cookie})",
    )
    dump.add_argument(
        "--stale",
        action="store_true",
        help="also count each mapped-ram block's stale slots (clear bit, non-zero bytes left in the slot: "
        "old guest memory from a live save); reads the clear slots that hold data (JSON: stale_slots, "
        "else null)",
    )

    ver = sub.add_parser(
        "verify",
        parents=[common],
        epilog=SUB_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
        help="the sha256 of every block, whatever its clear pages cost (implies --hash)",
    )
    ver.add_argument(
        "--json", action="store_true", help="print the report as JSON: {file, valid, problems, notes, sha256}"
    )
    ver.add_argument(
        "--progress",
        action="store_true",
        default=None,
        help="show a progress bar for --hash or a compressed image (default: on a terminal)",
    )

    ext = sub.add_parser(
        "extract",
        parents=[common],
        epilog=SUB_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="write RAM blocks as sparse raw files",
        description="Write a block's RAM to a raw file: populated pages copied, clear pages "
        "left as holes. The output appears only when complete. --all writes every block into "
        "the directory OUT (made if missing), each as NAME.raw with the name made safe "
        "(characters other than A-Za-z0-9._+- become _), with blocks.json (block name -> "
        "file), desc.json (the VM description) and state.json (every device decoded, as "
        "dump --state --json prints it). --stale writes, instead of the block's RAM, the "
        "bytes left in the slots of its clear pages, at their page offsets: NOT the guest's "
        "RAM at save time, but old guest memory a live save left behind (forensics).",
    )
    which = ext.add_mutually_exclusive_group(required=True)
    which.add_argument("--block", metavar="NAME", help="the RAM block, e.g. pc.ram")
    which.add_argument("--all", action="store_true", help="every block, desc.json and state.json into OUT")
    ext.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="the raw file to write (--all: the directory)"
    )
    ext.add_argument("--force", action="store_true", help="replace OUT (--all: the files in OUT) if it exists")
    ext.add_argument(
        "--stale",
        action="store_true",
        help="with --block: write the bytes left in the slots of clear pages (old guest memory from a live "
        "save), NOT the guest's RAM at save time",
    )
    ext.add_argument(
        "--progress", action="store_true", default=None, help="show a progress bar (default: when stderr is a terminal)"
    )
    conv = sub.add_parser(
        "convert",
        parents=[common],
        epilog=SUB_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="rewrite a snapshot as mapped-ram or as a classic stream",
        description="Rewrite the RAM of a snapshot in the other layout; device sections, machine "
        "type and section ids are carried over unchanged, so QEMU restores the output "
        "like the input (with or without the mapped-ram capability to match). The "
        "output appears only when complete.",
    )
    conv.add_argument("output", metavar="OUT", help="the file to write")
    conv.add_argument(
        "--to",
        required=True,
        choices=[m.value for m in Mode],
        help="the layout of OUT; a libvirt image stays one (mapped-ram: format sparse, stream: raw)",
    )
    conv.add_argument(
        "--compress",
        choices=COMPRESSED_FORMATS,
        help="with --to stream: compress OUT as libvirt does (its header says so); needs a libvirt image",
    )
    conv.add_argument(
        "--channels",
        type=cli_args.channels,
        default=1,
        help=f"1 to {MAX_CHANNELS} threads that write the pages of a mapped-ram OUT (default: %(default)s, "
        "the main thread as it reads); --to stream writes in order and uses none",
    )
    conv.add_argument("--force", action="store_true", help="replace OUT if it exists")
    conv.add_argument(
        "--progress", action="store_true", default=None, help="show a progress bar (default: when stderr is a terminal)"
    )
    elf = sub.add_parser(
        "export-elf",
        parents=[common],
        epilog=SUB_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
        type=cli_args.below_4g,
        metavar="BYTES",
        help="bytes of pc.ram mapped below 4 GiB, a multiple of 4K up to 4G; the rest goes from 4 GiB up "
        "(default: QEMU's rule for the pc and q35 machine types)",
    )
    elf.add_argument(
        "--map",
        type=cli_args.block_at,
        action="append",
        default=[],
        metavar="BLOCK=ADDR",
        help="map the whole RAM block BLOCK from the page-aligned guest-physical ADDR, "
        "e.g. 0000:00:02.0/vga.vram=0xfd000000 (repeatable); pc.ram or pc.bios named here are placed "
        "there instead of by QEMU's layout",
    )
    elf.add_argument(
        "--progress", action="store_true", default=None, help="show a progress bar (default: when stderr is a terminal)"
    )
    visual.register(sub)
    for command in sub.choices.values():  # the raw formatter keeps the epilog's table; wrap the prose here
        command.description = textwrap.fill(command.description or "", 80)
    return parser


def _out(line: str = "") -> None:
    """One line of human-readable output, with what is not printable escaped."""
    print(printable(line))


def _err(line: str) -> None:
    """One error line on stderr, after ending a progress bar's open line."""
    end_line()
    print(printable(f"mappedram: {line}"), file=sys.stderr)


class UsageError(Exception):
    """The command line cannot apply to this file: exit 2 with this one line."""


def _recorded_page_size(snap: Snapshot) -> tuple[int, str] | None:
    """The page size the file states, and where, if it states one."""
    if snap.target_page_bits:
        return 1 << snap.target_page_bits, "its target-page-bits"
    if snap.policy.block_has_mapped_ram_header:
        first = next(iter(snap), None)
        if first is not None:
            return first.page_size, f"the mapped-ram header of block {first.name!r}"
    return None


def _check_page_size(args: argparse.Namespace) -> None:
    """--page-size is for classic streams that do not record it; where the file records
    one, a different value would make every offset wrong: refuse it rather than guess."""
    if args.page_size is None:
        return
    try:
        snap = Snapshot(args.file, **cli_args.open_args(args))
    except FormatError:
        return  # the command reports the malformed file itself
    with snap:
        recorded = _recorded_page_size(snap)
    if recorded and recorded[0] != args.page_size:
        raise UsageError(
            f"{args.file}: --page-size {args.page_size} contradicts the page size {recorded[0]} in {recorded[1]}; "
            "the option is for classic streams that do not record it"
        )


def _print_dump(info: dict[str, Any], sections: Sequence[Section] | None, stale_counted: bool = False) -> None:
    """dump's text; ``sections`` (None: not walked) are printed one line each as they are
    made from the packed log, so the output costs no memory per section."""
    _out(f"file:          {info['file']} ({info['size']} bytes, {human(info['size'])})")
    lv = info["libvirt"]
    if lv:
        state = "complete" if lv["complete"] else "INCOMPLETE"
        _out(
            f"libvirt:       save header v{lv['version']} ({state}), format {lv['format']}, "
            f"data_len {lv['data_len']}, {lv['byteorder']}-endian"
        )
    _out(f"stream:        QEVM v{info['version']} at {info['stream_start']:#x}, format {info['format']}")
    _out(f"machine:       {info['machine_type'] or '(no configuration section)'}")
    _out(f"capabilities:  {', '.join(info['capabilities']) or '(none)'}")
    _out(
        f"page size:     {info['page_size']}"
        + (f" (target-page-bits {info['target_page_bits']})" if info["target_page_bits"] else "")
    )
    if info["uuid"]:
        _out(f"uuid:          {info['uuid']}")
    _out(
        f"RAM:           {info['ram_total']} bytes ({human(info['ram_total'] or 0)}) in {len(info['blocks'])} "
        f"blocks, section at {info['ram_section_offset']:#x}"
    )
    names = [printable(b["name"]) for b in info["blocks"]]  # escaped first, so the columns line up
    width = max([len(n) for n in names] + [5])
    mapped = policy_for(info["capabilities"]).block_has_mapped_ram_header
    stale = stale_counted and mapped
    _out(
        f"  {'block':<{width}}  {'used_length':>12}  {'present':>9}/{'pages':<9}"
        + (f"  {'stale':>7}" if stale else "")
        + (f"  {'bitmap_offset':>13}  {'pages_offset':>12}" if mapped else "")
    )
    for name, b in zip(names, info["blocks"]):
        line = f"  {name:<{width}}  {b['used_length']:>12}  {b['pages_present']:>9}/{b['pages_total']:<9}"
        if stale:
            line += f"  {'-' if b['stale_slots'] is None else b['stale_slots']:>7}"
        if not b["in_file"]:
            line += "  not in the file (x-ignore-shared)"
        elif mapped:
            line += f"  {b['bitmap_offset']:>#13x}  {b['pages_offset']:>#12x}"
        _out(line)
    if sections is not None:
        _out(f"sections:      {len(sections)}")
        for s in sections:
            detail = s.command or " ".join(
                x
                for x in (
                    s.idstr,
                    None if s.section_id is None else f"id {s.section_id}",
                    None if s.instance_id is None else f"instance {s.instance_id}",
                    None if s.version_id is None else f"v{s.version_id}",
                )
                if x is not None
            )
            size = "" if s.payload_length is None else f"  payload {s.payload_length} bytes"
            _out(f"  {s.offset:#12x}  {s.kind:<7}  {detail}{size}")
    vm = info["vmdesc"]
    where = f"{vm['json_length']} bytes of JSON at {vm['json_offset']:#x} (element at {vm['offset']:#x})" if vm else ""
    _out("vmdesc:        " + (where or "(none)"))


def _dump_info(snap: Snapshot, sections: bool, stale: bool = False) -> dict[str, Any]:
    """describe() with every README key present and the problems, but ``sections`` null:
    the caller writes them one at a time. With ``sections`` the stream is walked here,
    before anything is written (a malformed file prints its error line and nothing else)."""
    info = snap.describe(sections=False, stale=stale)
    info["sections"] = None
    info["eof_offset"] = snap.eof_offset if sections else None
    if info["vmdesc"] is not None:
        info["vmdesc"]["json_offset"] = info["vmdesc"]["offset"] + VMDESC_HEAD.size
    info["problems"] = [{"offset": p.offset, "message": p.text} for p in snap.problems]
    return info


def _json_out(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, ensure_ascii=True)
    print()


_JSON = json.JSONEncoder(indent=2, ensure_ascii=True)


def _json_out_streamed(value: dict[str, Any], arrays: Mapping[str, Iterable[Any]]) -> None:
    """The object ``value`` as _json_out writes it, but the value of each key in
    ``arrays`` written as a JSON array of its items, one item in memory at a time."""
    write = sys.stdout.write
    # Encoded JSON holds a newline only between tokens (strings escape theirs), so a nested
    # value is indented by indenting its lines.
    for i, (key, item) in enumerate(value.items()):
        write(f"{',' if i else '{'}\n  {_JSON.encode(key)}: ")
        if key not in arrays:
            write(_JSON.encode(item).replace("\n", "\n  "))
            continue
        opening = "["
        for element in arrays[key]:
            write(f"{opening}\n    " + _JSON.encode(element).replace("\n", "\n    "))
            opening = ","
        write("[]" if opening == "[" else "\n  ]")
    write("\n}\n")


def _open(args: argparse.Namespace, progress: ProgressBar | None = None) -> Snapshot:
    """The file; a compressed libvirt image opened for its one forward pass (``progress``:
    its compressed bytes read)."""
    return open_image(args.file, progress=progress, **cli_args.open_args(args))


def _cmd_dump(args: argparse.Namespace) -> int:
    bar = ProgressBar("dump", None)  # a compressed image's one pass, on a terminal
    if args.state or args.desc:
        from .mapper.devstate import print_device_states

        with _open(args, bar) as snap:
            snap.vmdesc  # the pass under the bar, ended before the output
            bar.close()
            print_device_states(snap, sys.stdout, desc=args.desc, as_json=args.json)
        return EXIT_OK
    if args.libvirt_xml:
        return _dump_libvirt_xml(args)
    with _open(args, bar) as snap:
        info = _dump_info(snap, sections=not args.no_sections, stale=args.stale)
        bar.close()  # a compressed image's pass is over: _dump_info read all dump prints
        if args.json:
            _json_out_streamed(info, {} if args.no_sections else {"sections": snap.describe_sections()})
        else:
            _print_dump(info, None if args.no_sections else snap.sections, stale_counted=args.stale)
            for p in info["problems"]:
                _out(f"warning: offset {p['offset']:#x}: {p['message']}")
    return EXIT_OK


def _dump_libvirt_xml(args: argparse.Namespace) -> int:
    with _open(args) as snap:
        libvirt, problems = snap.libvirt, list(snap.problems)
    if libvirt is None:
        raise UsageError(f"{args.file}: no libvirt save header (LibvirtQemudSave), so no domain XML")
    if args.json:
        _json_out({"file": args.file, "domain_xml": libvirt.domain_xml, "cookie": libvirt.cookie})
        return EXIT_OK
    xml = libvirt.domain_xml.removesuffix("\n")
    for line in xml.split("\n") if xml else []:  # only newlines end lines; printable() escapes the rest
        _out(line)
    for p in problems:
        print(printable(f"mappedram: warning: offset {p.offset:#x}: {p.text}"), file=sys.stderr)
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from .mapper.verify import verify

    hashing = args.hash or args.hash_zeros  # asking for every block's sha256 is asking for hashes
    bar = ProgressBar("hashing" if hashing else "verify", args.progress)  # verify: a compressed image's pass
    report = verify(
        args.file, hash_blocks=hashing, hash_zeros=args.hash_zeros, progress=bar, **cli_args.open_args(args)
    )
    bar.close()
    if args.json:
        _json_out(report.describe())
    else:
        for p in report.problems:
            _out(f"{args.file}: offset {p.offset:#x} ({p.offset}): {p.text}")
        for name, digest in report.hashes.items():
            _out(f"{digest}  {name}")
        for name, sparse in report.sparse.items():
            if name not in report.hashes:
                _out(
                    f"{sparse.digest}  {name} (sparse-sha256: {sparse.nonzero_pages} non-zero of {sparse.pages} pages)"
                )
        if report.ok:
            _out(f"{args.file}: valid" + "".join(f" ({n})" for n in report.notes))
    return EXIT_OK if report.ok else EXIT_INVALID


def _cmd_extract(args: argparse.Namespace) -> int:
    from .mapper.restore import extract  # imported when used: dump and verify start faster
    from .mapper.stale import extract_stale

    if args.all:
        return _extract_all(args)
    with _open(args) as snap:
        if args.block not in snap.blocks:
            raise UsageError(f"no RAM block {args.block!r} in {args.file}; blocks: {', '.join(snap.blocks)}")
        if not snap.block(args.block).in_file:  # the file is valid; what was asked is not in it
            raise UsageError(f"{args.file}: {not_in_file(snap.block(args.block))}")
        block = snap.block(args.block)
        if args.stale:
            if not isinstance(block, MappedRamBlock):
                raise UsageError(f"{args.file}: stale slots exist only in mapped-ram files; this is a classic stream")
            bar = ProgressBar(f"extract stale slots of {args.block}", args.progress)
            slots, written = extract_stale(snap, args.block, args.output, overwrite=args.force, progress=bar)
            bar.close()
            _out(
                f"{args.output}: {block.used_length} bytes, {slots} stale slots ({written} bytes) at their page "
                "offsets: old bytes left in clear slots, NOT the guest's RAM at save time"
            )
            return EXIT_OK
        bar = ProgressBar(f"extract {args.block}", args.progress)
        copied = extract(snap, args.block, args.output, overwrite=args.force, progress=bar)
        bar.close()
    _out(f"{args.output}: {block.used_length} bytes, {copied} copied from {block.populated} populated pages")
    return EXIT_OK


def _extract_all(args: argparse.Namespace) -> int:
    from .mapper.extract_all import DESC_NAME, MAP_NAME, STATE_NAME, extract_all

    if args.stale:
        raise UsageError("--stale takes one --block, not --all")
    with _open(args) as snap:
        bar = ProgressBar("extract all blocks", args.progress)
        summary = extract_all(snap, args.output, overwrite=args.force, progress=bar)
        bar.close()
    for name, entry in summary["blocks"].items():
        where = os.path.join(args.output, entry["path"]) if entry["path"] else "not in the file (x-ignore-shared)"
        _out(f"{name}: {where}")
    if summary["desc"] is None:
        _out(f"{args.output}: no VM description in the file: {DESC_NAME} and {STATE_NAME} not written")
    _out(f"{args.output}: {len(summary['blocks'])} blocks, map in {os.path.join(args.output, MAP_NAME)}")
    return EXIT_OK


def _cmd_convert(args: argparse.Namespace) -> int:
    from .mapper.convert import check_target, convert

    try:
        check_target(args.to, args.compress)
    except ValueError as err:
        raise UsageError(str(err)) from None
    bar = ProgressBar(f"convert to {args.to}", args.progress)
    try:
        convert(
            args.file,
            args.output,
            args.to,
            overwrite=args.force,
            progress=bar,
            compress=args.compress,
            channels=args.channels,
            **cli_args.open_args(args),
        )
    except ValueError as err:
        if isinstance(err, FormatError):
            raise
        raise UsageError(f"{args.file}: {err}") from None
    bar.close()
    _out(f"{args.output}: written as {args.to}" + (f", {args.compress}-compressed" if args.compress else ""))
    return EXIT_OK


def _cmd_export_elf(args: argparse.Namespace) -> int:
    from .mapper.physical import PhysicalView, export_elf

    extra = dict(args.map)
    if len(extra) < len(args.map):
        raise UsageError("--map names a block twice")
    with _open(args) as snap:
        try:
            view = PhysicalView(snap, below_4g_size=args.below_4g, extra=extra)
        except ValueError as err:
            if isinstance(err, FormatError):
                raise
            raise UsageError(f"{args.file}: {err}") from None
        bar = ProgressBar("export-elf", args.progress)
        copied = export_elf(view, args.output, overwrite=args.force, progress=bar)
        bar.close()
    for r in view.regions:
        _out(f"PT_LOAD {r.start:#014x}-{r.end:#014x}  {r.block} +{r.offset:#x}")
    for line in view.left_out:
        _out(line)
    _out(f"{args.output}: {len(view.regions)} segments, {copied} bytes of page data")
    return EXIT_OK


COMMANDS = {
    "dump": _cmd_dump,
    "export-elf": _cmd_export_elf,
    "verify": _cmd_verify,
    "extract": _cmd_extract,
    "convert": _cmd_convert,
    **visual.COMMANDS,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_page_size(args)
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a reader that left is seen here, not at interpreter exit
        return code
    except BrokenPipeError:  # `mappedram dump FILE | head`: nothing more can be said
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except FormatError as err:
        return _fail(args, EXIT_INVALID, f"{args.file}: {err}", err.offset)
    except UsageError as err:
        return _fail(args, EXIT_UNREADABLE, str(err))
    except OSError as err:
        return _fail(args, EXIT_UNREADABLE, f"{err.filename or args.file}: {err.strerror or err}")
    except KeyboardInterrupt:
        return _fail(args, EXIT_INTERRUPTED, "interrupted")


def _fail(args: argparse.Namespace, code: int, text: str, offset: int | None = None) -> int:
    """The error line on stderr; with --json also the error as JSON on stdout."""
    _err(text)
    if getattr(args, "json", False):
        try:
            _json_out({"file": args.file, "error": {"exit_code": code, "offset": offset, "message": text}})
            sys.stdout.flush()
        except BrokenPipeError:
            _silence_stdout()
            return EXIT_BROKEN_PIPE
    return code


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush does not fail again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (a test's capture)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
