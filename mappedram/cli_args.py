"""The value types of the command line's options: sizes, offsets, page sizes, BLOCK=ADDR.

Each raises ``argparse.ArgumentTypeError`` with one line saying what was expected, so
argparse prints it with the usage and exits 2. Numbers are decimal or ``0x`` hex; a
decimal size may carry a binary suffix: ``4K``, ``4KiB``, ``1M``, ``2G``, ``1T``.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from .formats.bitmap import BIG_ENDIAN_64, LITTLE_ENDIAN_64
from .formats.layout import MAX_PAGE_SIZE, MIN_PAGE_SIZE, valid_page_size
from .formats.x86 import address_problem, below_4g_problem
from .mapper.channels import MAX_CHANNELS, check_count
from .visual.workers import MAX_WORKERS, check_workers

OFF_T_END = 1 << 63  # first offset past what lseek/pread take

_UNITS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_NUMBER = re.compile(r"0x(?P<hex>[0-9a-f]+)|(?P<dec>[0-9]+)(?:(?P<unit>[kmgtpe])(?:ib|b)?|b)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """A non-negative byte count or offset: ``4096``, ``0x1000``, ``4K``, ``4KiB``."""
    match = _NUMBER.fullmatch(text.strip())
    if match is None or len(text) > 40:  # 40 characters hold any 64-bit number
        raise argparse.ArgumentTypeError(
            f"expected a non-negative number of bytes (decimal, 0x hex, or with K/M/G/T), found {text!r}"
        )
    if match["hex"] is not None:
        return int(match["hex"], 16)
    return int(match["dec"]) << _UNITS[(match["unit"] or "").upper()]


def _below(value: int, end: int, text: str, what: str) -> int:
    if value >= end:
        raise argparse.ArgumentTypeError(f"expected {what} below {end:#x}, found {text!r}")
    return value


def file_offset(text: str) -> int:
    """--offset: where the stream starts in the file."""
    return _below(parse_size(text), OFF_T_END, text, "a file offset")


def page_size(text: str) -> int:
    """--page-size: a power of two the reader accepts."""
    value = parse_size(text)
    if not valid_page_size(value):
        raise argparse.ArgumentTypeError(
            f"expected a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE} (1 GiB), found {text!r}"
        )
    return value


def channels(text: str) -> int:
    """--channels: how many channel threads, QEMU's multifd-channels range."""
    try:
        return check_count(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 1 to {MAX_CHANNELS}, found {text!r}") from None


def workers(text: str) -> int:
    """--workers: diff's comparing threads."""
    try:
        return check_workers(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 1 to {MAX_WORKERS}, found {text!r}") from None


def below_4g(text: str) -> int:
    """--below-4g: bytes of main RAM under 4 GiB, in whole x86 pages, at most 4 GiB."""
    value = parse_size(text)
    if why := below_4g_problem(value):
        raise argparse.ArgumentTypeError(f"expected {why}, found {text!r}")
    return value


def block_at(text: str) -> tuple[str, int]:
    """--map BLOCK=ADDR: a RAM block name and a page-aligned guest-physical address."""
    name, sep, addr_text = text.rpartition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected BLOCK=ADDR, e.g. vga.vram=0xfd000000, found {text!r}")
    try:
        addr = parse_size(addr_text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected BLOCK=ADDR with a number for ADDR, found {text!r}") from None
    if why := address_problem(addr):
        raise argparse.ArgumentTypeError(f"expected ADDR to be {why}, found {text!r}")
    return name, addr


OFFSET_HELP = (
    "where the QEMU stream starts (the offset= of file:PATH,offset=N); default: behind a libvirt "
    "header, else 0, else the first QEVM magic in the first MiB"
)


def add_open_options(parser: argparse.ArgumentParser, offset_help: str = OFFSET_HELP) -> None:
    """--offset, --page-size and --bitmap-order: how every command opens its files."""
    parser.add_argument("--offset", type=file_offset, metavar="N", help=offset_help)
    parser.add_argument(
        "--page-size",
        type=page_size,
        metavar="BYTES",
        help="target page size (a power of two, 512 to 1G) of a classic stream that does not record it; "
        "refused when it contradicts the file (a mapped-ram file or target-page-bits records it)",
    )
    parser.add_argument(
        "--bitmap-order",
        choices=("little", "big"),
        default="little",
        help="byte order of the host that wrote the bitmaps (big: s390x, ppc64)",
    )


def open_args(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``mappedram.open`` that the common options give."""
    return {
        "offset": getattr(args, "offset", None),
        "page_size": args.page_size,
        "bitmap_layout": BIG_ENDIAN_64 if args.bitmap_order == "big" else LITTLE_ENDIAN_64,
    }
