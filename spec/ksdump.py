"""Print the Kaitai parse tree of a snapshot, from the command line.

    node spec/compile.js python spec/build      # once: compile the .ksy with the official compiler
    python3 spec/ksdump.py FILE [--offset N] [--depth D]

Fields and instances are printed as the Web IDE shows them; byte strings longer than
32 bytes are abbreviated, and the `pages` instances (whole page regions) are shown by
size only. The spec finds the stream itself (behind a libvirt header, or the first QEVM
v3 magic in the first MiB); ``--offset N`` parses a bare stream at N, e.g. further on.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import sys
from pathlib import Path
from typing import Any

BUILD = Path(__file__).resolve().parent / "build"
SKIP = {"pages"}  # instances too big to print
ALIASES = {"prev"}  # another node of the tree (a block's predecessor): printing it would repeat the list


def load_spec(build: Path = BUILD) -> Any:
    """The compiled spec module (``node spec/compile.js python spec/build`` makes it)."""
    if not (build / "qemu_mapped_ram.py").exists():
        raise SystemExit(f"no compiled spec in {build}: run `node spec/compile.js python {build}` first")
    sys.path.insert(0, str(build))
    try:
        return importlib.import_module("qemu_mapped_ram")
    finally:
        sys.path.remove(str(build))


def members(obj: Any) -> list[str]:
    """Field and instance names of a parsed Kaitai object, in declaration order."""
    names = [n for n in vars(obj) if not n.startswith("_")]
    for cls in type(obj).__mro__:
        for name, value in vars(cls).items():
            if isinstance(value, property) and not name.startswith("_") and name not in names:
                names.append(name)
    return names


def show(value: Any, indent: int, depth: int, out: list[str]) -> None:
    pad = "  " * indent
    if hasattr(value, "_io") and depth > 0:
        for name in members(value):
            if name in ALIASES:
                continue
            if name in SKIP:
                out.append(f"{pad}{name}: <{getattr(value, 'used_length', '?')} bytes, not printed>")
                continue
            try:
                child = getattr(value, name)
            except Exception as err:  # an instance that does not apply here
                out.append(f"{pad}{name}: <{type(err).__name__}: {err}>")
                continue
            if child is None:
                continue
            if hasattr(child, "_io") or isinstance(child, list):
                out.append(f"{pad}{name}:")
                show(child, indent + 1, depth - 1, out)
            else:
                out.append(f"{pad}{name}: {scalar(child)}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out.append(f"{pad}[{i}]:")
            show(item, indent + 1, depth - 1, out)
    else:
        out.append(f"{pad}{scalar(value)}")


def scalar(value: Any) -> str:
    if isinstance(value, bytes):
        head = value[:32].hex(" ")
        return f"[{len(value)} bytes] {head}{' ...' if len(value) > 32 else ''}"
    if isinstance(value, enum.Enum):
        return f"{value.name} ({value.value:#x})"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value} ({value:#x})"
    return repr(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--offset", type=lambda s: int(s, 0), help="parse the QEVM stream from this offset")
    parser.add_argument("--depth", type=int, default=12, help="how deep to print (default 12)")
    parser.add_argument("--build", type=Path, default=BUILD, help=f"the compiled spec (default {BUILD})")
    args = parser.parse_args()
    spec = load_spec(args.build)
    from kaitaistruct import KaitaiStream

    with open(args.file, "rb") as f:
        io = KaitaiStream(f)
        if args.offset is None:
            root: Any = spec.QemuMappedRam(io)
        else:
            io.seek(args.offset)
            root = spec.QemuMappedRam.QevmStream(io)
        out: list[str] = []
        show(root, 0, args.depth, out)
    print("\n".join(out))


if __name__ == "__main__":
    main()
