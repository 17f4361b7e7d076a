"""The JSON VM description after EOF (FORMAT.md §1.6): finding it, checking its shape, using its sizes."""

from __future__ import annotations

import json
import re
import struct
from typing import Any

from ..formats.headers import VMDESC_HEAD
from .source import Source

# The description is "for analysis only" and sits at the very end; how far back from the
# end we look for its marker. A description larger than this is treated as absent.
VMDESC_SEARCH_LIMIT = 64 << 20
_SCAN_CHUNK = 1 << 20
_HEAD = VMDESC_HEAD.size
# QEMU's descriptions nest 13 deep (devices, fields, struct, fields, ...); the json module
# recurses once per level, so deeper text is refused before it is parsed.
MAX_DEPTH = 100
_ESCAPE = re.compile(rb"\\.", re.DOTALL)  # a backslash and the character it escapes
_SQUARE = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


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
    """The description at ``offset`` (its 0x06 byte), parsed and checked.

    Raises ValueError (FormatError for I/O) whose text says what was found and where:
    the caller reports it as "expected a VM description in JSON, found <text>". What
    it returns has the shape ``check_description`` demands, so its users trust it.
    """
    start = offset + _HEAD
    data = src.read(start, length, "the VM description JSON")
    too_deep = _first_too_deep(data)
    if too_deep is not None:
        raise ValueError(f"JSON nested more than {MAX_DEPTH} deep at {start + too_deep:#x}")
    try:
        value = json.loads(data, parse_constant=_no_constant)
    except json.JSONDecodeError as err:  # pos counts characters; the text is ASCII in practice
        raise ValueError(f"{err.msg.removesuffix(' at')} at {start + err.pos:#x}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{err} in the JSON at {start:#x}") from None
    check_description(value, src.size)
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name}, which is not JSON (QEMU writes only finite integers)")


def _first_too_deep(data: bytes) -> int | None:
    """Offset of the first bracket nested deeper than MAX_DEPTH, outside strings, or None.

    The json module recurses once per level (100,000 ``[`` exhaust the stack). An escape
    and the character it escapes are blanked first (same length, so offsets stay); then
    quotes toggle strings and the depth is a running sum, a chunk at a time in numpy
    (imported only when ``_shallow`` cannot tell: QEMU's descriptions need no numpy).
    """
    if data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
        return None
    if b"\\" in data:
        data = _ESCAPE.sub(b"__", data)
    if len(data) <= _SCAN_CHUNK and _shallow(data):
        return None
    import numpy as np

    in_string, depth = 0, 0
    for base in range(0, len(data), _SCAN_CHUNK):
        chunk = np.frombuffer(data, np.uint8, min(_SCAN_CHUNK, len(data) - base), base)
        quotes = np.cumsum(chunk == ord('"'), dtype=np.int32)
        outside = ((quotes + in_string) & 1) == 0
        step = (chunk == ord("[")).astype(np.int32) + (chunk == ord("{"))
        step -= (chunk == ord("]")).astype(np.int32) + (chunk == ord("}"))
        level = np.cumsum(step * outside, dtype=np.int32) + depth
        deep = np.flatnonzero(level > MAX_DEPTH)
        if deep.size:
            return base + int(deep[0])
        in_string = (in_string + int(quotes[-1])) & 1
        depth = int(level[-1])
    return None


def _shallow(data: bytes) -> bool:
    """True when no bracket outside strings of ``data`` (its escapes blanked) nests
    deeper than MAX_DEPTH (False: not known). The brackets outside strings, innermost
    pairs removed MAX_DEPTH times, leave no opening one: a chain of MAX_DEPTH + 1 open
    brackets would leave its outermost."""
    brackets = b"".join(data.split(b'"')[::2]).translate(_SQUARE, _NOT_BRACKETS)
    for _ in range(MAX_DEPTH):
        inner_gone = brackets.replace(b"[]", b"")
        if len(inner_gone) == len(brackets):
            break
        brackets = inner_gone
    return b"[" not in brackets


def check_description(value: Any, file_size: int) -> None:
    """The shape the reader relies on: raises ValueError naming the first misfit.

    Top level an object; ``page_size`` a positive integer; ``devices`` a list of objects
    with a string ``name``, an integer ``instance_id``, ``fields`` and ``subsections``.
    A field's ``size`` and ``array_len`` are integers from 0 to the file's size (bytes
    of device state cannot outnumber the file's); a subsection has a ``vmsd_name`` of at
    most 255 UTF-8 bytes (it is written with a u8 length), fields and subsections.
    Keys this reader does not use are not checked. Nesting is bounded by MAX_DEPTH.
    """
    if not isinstance(value, dict):
        raise ValueError(f"{_kind(value)} where a JSON object belongs")
    if "page_size" in value:
        _int(value["page_size"], "page_size", 1, 1 << 63)
    devices = value.get("devices")
    if devices is None:
        return
    _list(devices, "devices")
    for i, dev in enumerate(devices):
        where = f"devices[{i}]"
        _object(dev, where)
        _str(dev.get("name", _MISSING), f"{where}.name")
        if "instance_id" in dev:
            _int(dev["instance_id"], f"{where}.instance_id", 0, 1 << 32)
        _check_state(dev, where, file_size)


def _check_state(obj: dict[str, Any], where: str, file_size: int) -> None:
    fields = obj.get("fields", [])
    _list(fields, f"{where}.fields")
    for j, field in enumerate(fields):
        at = f"{where}.fields[{j}]"
        _object(field, at)
        _int(field.get("size", _MISSING), f"{at}.size", 0, file_size + 1)
        if "array_len" in field:
            _int(field["array_len"], f"{at}.array_len", 0, file_size + 1)
    subsections = obj.get("subsections", [])
    _list(subsections, f"{where}.subsections")
    for k, sub in enumerate(subsections):
        at = f"{where}.subsections[{k}]"
        _object(sub, at)
        name = _str(sub.get("vmsd_name", _MISSING), f"{at}.vmsd_name")
        if len(name.encode("utf-8", "surrogatepass")) > 255:
            raise ValueError(f"a name longer than 255 bytes at {at}.vmsd_name")
        _check_state(sub, at, file_size)  # depth bounded by MAX_DEPTH


_MISSING = object()  # a key that is not there


def _kind(value: Any) -> str:
    if value is _MISSING:
        return "nothing"
    if isinstance(value, bool):
        return f"the boolean {json.dumps(value)}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {json.dumps(value[:40])}" + ("..." if len(value) > 40 else "")
    return {dict: "an object", list: "a list", type(None): "null"}.get(type(value), type(value).__name__)


def _object(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"{_kind(value)} at {where}, where an object belongs")


def _list(value: Any, where: str) -> None:
    if not isinstance(value, list):
        raise ValueError(f"{_kind(value)} at {where}, where a list belongs")


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{_kind(value)} at {where}, where a string belongs")
    return value


def _int(value: Any, where: str, low: int, end: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < end:
        raise ValueError(f"{_kind(value)} at {where}, where an integer from {low} to {end - 1} belongs")
    return value


def _fields_size(fields: list[dict[str, Any]]) -> int:
    return sum(field["size"] * field.get("array_len", 1) for field in fields)


def _subsections_size(subsections: list[dict[str, Any]]) -> int:
    # Each: u8 0x05, u8 namelen, name, be32 version, fields, nested subsections.
    total = 0
    for sub in subsections:
        name = sub["vmsd_name"].encode("utf-8", "surrogatepass")
        total += 1 + 1 + len(name) + 4 + _fields_size(sub.get("fields", []))
        total += _subsections_size(sub.get("subsections", []))
    return total


def device_payload_size(device: dict[str, Any]) -> int:
    """Bytes between a FULL section's header and its footer, from a checked description.

    Field ``size`` is what was written for one element (``array_len`` repeats it); a
    ``struct`` field's size already includes its own nested subsections.
    """
    return _fields_size(device.get("fields", [])) + _subsections_size(device.get("subsections", []))
