"""The JSON VM description after EOF (FORMAT.md §1.6): finding it and using its sizes."""

from __future__ import annotations

import json
import struct
from typing import Any

from ..formats.structs import VmDescriptionHead
from .source import Source

# The description is "for analysis only" and sits at the very end; how far back from the
# end we look for its marker. A description larger than this is treated as absent.
VMDESC_SEARCH_LIMIT = 64 << 20
_SCAN_CHUNK = 1 << 20
_HEAD = VmDescriptionHead.sizeof()


def find_vmdesc(src: Source) -> tuple[int, int] | None:
    """(offset of the 0x06 byte, json length) of the trailing description, or None.

    JSON text holds no NUL byte, so the last NUL of the file is either the EOF marker
    (0x00) in front of ``06 <be32 len>`` or a byte of that length field.
    """
    end = src.size
    floor = max(0, end - VMDESC_SEARCH_LIMIT)
    hi = end
    while hi > floor:
        lo = max(floor, hi - _SCAN_CHUNK)
        nul = src.read(lo, hi - lo, "the tail of the file").rfind(b"\x00")
        if nul >= 0:
            last_nul = lo + nul
            for pos in range(max(1, last_nul - 4), last_nul + 2):
                if pos + _HEAD > end:
                    break
                head = src.read(pos - 1, _HEAD + 1, "the VM description header")
                length = struct.unpack_from(">I", head, 2)[0]
                if head[:2] == b"\x00\x06" and pos + _HEAD + length == end:
                    return pos, length
            return None
        hi = lo
    return None


def load_vmdesc(src: Source, offset: int, length: int) -> dict[str, Any]:
    """Parse the JSON; raises ValueError (json) or FormatError (I/O)."""
    data = src.read(offset + _HEAD, length, "the VM description JSON")
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("the VM description is not a JSON object")
    return value


def _fields_size(fields: list[dict[str, Any]]) -> int:
    total = 0
    for field in fields:
        total += int(field["size"]) * int(field.get("array_len", 1))
    return total


def _subsections_size(subsections: list[dict[str, Any]] | None) -> int:
    # Each: u8 0x05, u8 namelen, name, be32 version, fields, nested subsections.
    total = 0
    for sub in subsections or ():
        name = sub["vmsd_name"].encode()
        total += 1 + 1 + len(name) + 4 + _fields_size(sub["fields"])
        total += _subsections_size(sub.get("subsections"))
    return total


def device_payload_size(device: dict[str, Any]) -> int:
    """Bytes between a FULL section's header and its footer, from the description.

    Field ``size`` is what was written for one element (``array_len`` repeats it); a
    ``struct`` field's size already includes its own nested subsections.
    """
    return _fields_size(device.get("fields", ())) + _subsections_size(device.get("subsections"))
