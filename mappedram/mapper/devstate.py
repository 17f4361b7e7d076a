"""Device sections decoded field by field with the VM description (FORMAT.md §1.6).

QEMU writes, after EOF, a JSON description of every FULL device section: for each field
its name, its VMStateInfo type name and the bytes it wrote (``size``); arrays either as
one entry with ``array_len`` or as one entry per element with ``index``; nested
VMStateDescriptions under ``struct`` (or inline, for ``tmp`` and ``vstruct`` fields);
then the subsections that were sent. The description says how many bytes each field
took, so a field this module cannot make sense of becomes a problem and decoding goes
on at the next field.

On the wire (migration/vmstate.c, vmstate-types.c): every integer is big-endian (the
" equal" and " le" suffixes name a check on load, equal to or less or equal to the
running value, not an encoding); a bool is one byte; a null entry of an array of
pointers is the byte ``'0'`` (0x30); a capability is ``u8 len, name``; a subsection is
``0x05, u8 len, name, be32 version`` followed by its own fields and subsections.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, TextIO

from ..errors import FormatError
from ..formats.constants import SectionType
from ..formats.structs import QevmHeader
from ..textsafe import printable

MAX_DEPTH = 32  # nested structs; QEMU's deepest x86 descriptions have 4
MAX_PAYLOAD = 64 << 20  # a device section larger than this is not decoded
MAX_EMPTY_ELEMENTS = 1 << 16  # an array of zero-byte elements longer than this is refused
SUBSECTION = 0x05
NULL_MARKER = 0x30  # vmstate_info_nullptr writes the character '0'
PCI_NUM_PINS = 4

_INT_TYPE = re.compile(r"(u?)int(8|16|32|64)( equal| le)?")


@dataclass(frozen=True)
class StateProblem:
    """A field that does not fit its description, at a file offset."""

    offset: int
    text: str

    def __str__(self) -> str:
        return f"offset {self.offset:#x}: {self.text}"


@dataclass
class DecodedDevice:
    """One FULL device section, decoded."""

    idstr: str
    instance_id: int
    version_id: int | None
    section_id: int | None
    payload_offset: int
    payload_length: int
    vmsd_name: str | None
    fields: dict[str, Any]
    problems: list[StateProblem] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        """JSON form: bytes as hex strings, problems as {offset, message}."""
        return {
            "idstr": self.idstr,
            "instance_id": self.instance_id,
            "version_id": self.version_id,
            "section_id": self.section_id,
            "vmsd_name": self.vmsd_name,
            "payload_offset": self.payload_offset,
            "payload_length": self.payload_length,
            "fields": jsonable(self.fields),
            "problems": [{"offset": p.offset, "message": p.text} for p in self.problems],
        }


class _Bad(Exception):
    def __init__(self, offset: int, text: str) -> None:
        super().__init__(text)
        self.offset = offset
        self.text = text


class _Decoder:
    """Walks one payload (``data``, found at file offset ``base``) with its description."""

    def __init__(self, data: bytes, base: int) -> None:
        self.data = data
        self.base = base
        self.problems: list[StateProblem] = []

    def note(self, pos: int, text: str) -> str:
        """Record a problem at payload position ``pos``; returns its text for the tree."""
        problem = StateProblem(self.base + pos, text)
        self.problems.append(problem)
        return str(problem)

    def bad_value(self, pos: int, text: str) -> dict[str, str]:
        return {"_problem": self.note(pos, text)}

    def vmsd(self, desc: Any, pos: int, end: int, path: str, depth: int) -> tuple[dict[str, Any], int | None]:
        """The fields, then the subsections, of one VMStateDescription. Returns the values
        and the position after them (None: the rest of ``[pos, end)`` cannot be located)."""
        out: dict[str, Any] = {}
        if depth > MAX_DEPTH:
            out["_problem"] = self.note(pos, f"expected at most {MAX_DEPTH} nested structs at {path}")
            return out, None
        if not isinstance(desc, Mapping):
            out["_problem"] = self.note(pos, f"expected a description object at {path}, found {type(desc).__name__}")
            return out, None
        fields, subsections = desc.get("fields", []), desc.get("subsections", [])
        if not isinstance(fields, list) or not isinstance(subsections, list):
            out["_problem"] = self.note(pos, f"expected lists of fields and subsections at {path}")
            return out, None
        arrays: set[str] = set()
        for fdesc in fields:
            next_pos = self.field(fdesc, pos, end, path, depth, out, arrays)
            if next_pos is None:
                return out, None
            pos = next_pos
        for sdesc in subsections:
            next_pos = self.subsection(sdesc, pos, end, path, depth, out)
            if next_pos is None:
                return out, None
            pos = next_pos
        return out, pos

    def field(
        self, fdesc: Any, pos: int, end: int, path: str, depth: int, out: dict[str, Any], arrays: set[str]
    ) -> int | None:
        name = fdesc.get("name") if isinstance(fdesc, Mapping) else None
        size = fdesc.get("size") if isinstance(fdesc, Mapping) else None
        count = fdesc.get("array_len", 1) if isinstance(fdesc, Mapping) else None
        if not isinstance(name, str) or type(size) is not int or size < 0 or type(count) is not int or count < 0:
            out["_problem"] = self.note(pos, f"expected a field with name and size at {path}, found {fdesc!r:.80}")
            return None
        where = f"{path}/{name}"
        if size * count > end - pos or (size == 0 and count > MAX_EMPTY_ELEMENTS):
            self._store(
                out,
                arrays,
                name,
                fdesc,
                self.bad_value(
                    pos, f"expected {count} x {size} bytes for {where}, found {end - pos} bytes left in the section"
                ),
            )
            return None
        for _ in range(count):
            try:
                value = self.value(fdesc, pos, size, where, depth)
            except _Bad as bad:
                value = self.bad_value(bad.offset, bad.text)
            self._store(out, arrays, name, fdesc, value)
            pos += size
        return pos

    @staticmethod
    def _store(out: dict[str, Any], arrays: set[str], name: str, fdesc: Mapping[str, Any], value: Any) -> None:
        # An array arrives as one entry with array_len, as entries with "index", or (with
        # null pointers in it) as several runs under the same name: all become one list.
        if name in arrays:
            out[name].append(value)
        elif "array_len" in fdesc or "index" in fdesc:
            arrays.add(name)
            out[name] = [out[name], value] if name in out else [value]
        elif name in out:
            arrays.add(name)
            out[name] = [out[name], value]
        else:
            out[name] = value

    def value(self, fdesc: Mapping[str, Any], pos: int, size: int, where: str, depth: int) -> Any:
        kind = fdesc.get("type")
        raw = self.data[pos : pos + size]
        if not isinstance(kind, str):
            raise _Bad(pos, f"expected a type name for {where}, found {kind!r:.40}")
        nested = fdesc.get("struct") if kind == "struct" else fdesc if "fields" in fdesc else None
        if nested is not None:  # "struct", and "tmp"/"vstruct" whose description is inline
            values, after = self.vmsd(nested, pos, pos + size, where, depth + 1)
            if after is not None and after != pos + size:
                values["_problem"] = self.note(
                    after, f"expected {where} to end after {size} bytes, found {after - pos} bytes described"
                )
            return values
        if kind == "struct":
            raise _Bad(pos, f"expected the nested description of {where}, found none")
        match = _INT_TYPE.fullmatch(kind)
        if match:
            width = int(match.group(2)) // 8
            _require_size(pos, size, width, kind, where)
            return int.from_bytes(raw, "big", signed=not match.group(1))
        if kind == "bool":
            _require_size(pos, size, 1, kind, where)
            return raw[0] != 0
        if kind == "nullptr":
            _require_size(pos, size, 1, kind, where)
            if raw[0] != NULL_MARKER:
                raise _Bad(pos, f"expected the null-pointer marker 0x30 for {where}, found {raw[0]:#04x}")
            return None
        if kind == "capability":
            if size < 1 or raw[0] != size - 1:
                found = f"length byte {raw[0]}" if size else "no bytes"
                raise _Bad(pos, f"expected a capability name of {size - 1} bytes for {where}, found {found}")
            return raw[1:].decode("utf-8", "replace")
        if kind == "timer":  # the expiry time, -1 when not pending
            _require_size(pos, size, 8, kind, where)
            return int.from_bytes(raw, "big", signed=True)
        if kind == "float64":
            _require_size(pos, size, 8, kind, where)
            return struct.unpack(">d", raw)[0]
        if kind == "pci irq state":
            _require_size(pos, size, 4 * PCI_NUM_PINS, kind, where)
            return list(struct.unpack(f">{PCI_NUM_PINS}i", raw))
        return bytes(raw)  # buffer, unused_buffer, pci config, bitmap, and types we do not know

    def subsection(self, sdesc: Any, pos: int, end: int, path: str, depth: int, out: dict[str, Any]) -> int | None:
        name = sdesc.get("vmsd_name") if isinstance(sdesc, Mapping) else None
        if not isinstance(name, str):
            out["_problem"] = self.note(pos, f"expected a subsection description with vmsd_name at {path}")
            return None
        encoded = name.encode()
        head = 2 + len(encoded) + 4
        if end - pos < head:
            out[name] = self.bad_value(
                pos, f"expected subsection {name!r} ({head} header bytes), found {end - pos} left"
            )
            return None
        marker, length = self.data[pos], self.data[pos + 1]
        found = self.data[pos + 2 : pos + 2 + length]
        if marker != SUBSECTION or found != encoded:
            what = f"byte {marker:#04x}" if marker != SUBSECTION else f"subsection {found.decode('utf-8', 'replace')!r}"
            out[name] = self.bad_value(pos, f"expected subsection {name!r} (0x05, name, be32 version), found {what}")
            return None
        version = int.from_bytes(self.data[pos + head - 4 : pos + head], "big")
        values, after = self.vmsd(sdesc, pos + head, end, f"{path}/{name}", depth + 1)
        described = sdesc.get("version")
        if type(described) is int and described != version:
            values["_problem"] = self.note(
                pos + head - 4,
                f"expected version {described} of subsection {name!r} (the description's), found {version}",
            )
        out[name] = values
        return after


def _require_size(pos: int, size: int, width: int, kind: str, where: str) -> None:
    if size != width:
        raise _Bad(pos, f"expected {width} bytes for {kind} {where}, found a size of {size}")


_Table = dict[tuple[str, int], Mapping[str, Any]]


def _descriptions(snap: Any) -> _Table:
    """The description of each device by (name, instance id); empty without a description."""
    vmdesc = snap.vmdesc
    devices = vmdesc.get("devices") if isinstance(vmdesc, Mapping) else None
    table: _Table = {}
    for dev in devices if isinstance(devices, list) else ():
        if isinstance(dev, Mapping) and isinstance(dev.get("name"), str):
            instance = dev.get("instance_id", 0)
            table.setdefault((dev["name"], instance if type(instance) is int else -1), dev)
    return table


def decode_section(snap: Any, section: Any) -> DecodedDevice:
    """Decode one device section (an item of ``snap.devices``)."""
    return _decode(snap, section, _descriptions(snap))


def _decode(snap: Any, section: Any, table: _Table) -> DecodedDevice:
    base, length = section.payload_offset, section.payload_length or 0
    desc = table.get((section.idstr, section.instance_id))
    state = DecodedDevice(
        section.idstr,
        section.instance_id,
        section.version_id,
        section.section_id,
        base,
        length,
        desc.get("vmsd_name") if desc is not None and isinstance(desc.get("vmsd_name"), str) else None,
        {},
    )
    if desc is None:
        if table:
            why = f"{section.idstr!r} instance {section.instance_id} in the VM description"
        else:
            why = "a VM description with a device list"
        state.problems.append(StateProblem(base, f"expected {why}, found none"))
        return state
    if length > MAX_PAYLOAD:
        state.problems.append(
            StateProblem(base, f"expected device state of at most {MAX_PAYLOAD} bytes to decode, found {length}")
        )
        return state
    version = desc.get("version")
    if type(version) is int and version != section.version_id:
        state.problems.append(
            StateProblem(
                section.offset, f"expected section version {version} (the description's), found {section.version_id}"
            )
        )
    decoder = _Decoder(snap.read_bytes(base, length), base)
    state.fields, after = decoder.vmsd(desc, 0, length, section.idstr, 0)
    if after is not None and after != length:
        state.fields["_problem"] = decoder.note(
            after, f"expected the end of {section.idstr}'s state, found {length - after} more bytes"
        )
    state.problems += decoder.problems
    return state


def device_state(snap: Any, idstr: str, instance_id: int = 0) -> dict[str, Any]:
    """The decoded fields of one device, e.g. ``device_state(snap, "cpu", 0)["env.eip"]``.

    A field that does not fit its description holds ``{"_problem": "offset 0x…: expected …"}``.
    Raises KeyError when the file has no such device section.
    """
    for section in snap.devices:
        if section.idstr == idstr and section.instance_id == instance_id:
            return decode_section(snap, section).fields
    raise KeyError(f"no device section {idstr!r} instance {instance_id}")


def all_device_states(snap: Any) -> list[DecodedDevice]:
    """Every FULL device section, decoded, in stream order."""
    table = _descriptions(snap)
    return [_decode(snap, section, table) for section in snap.devices]


def configuration_state(snap: Any) -> DecodedDevice | None:
    """The configuration section (machine type, capabilities) decoded with the description's
    "configuration" entry; None when the file has either not."""
    vmdesc = snap.vmdesc
    desc = vmdesc.get("configuration") if isinstance(vmdesc, Mapping) else None
    start = snap.stream_start + QevmHeader.sizeof()
    sections = snap.sections
    end = sections[0].offset if sections else snap.size
    if not isinstance(desc, Mapping) or not start < end <= start + MAX_PAYLOAD:
        return None
    if snap.read_bytes(start, 1)[0] != SectionType.CONFIGURATION:
        return None
    base, length = start + 1, end - start - 1
    version = desc.get("version")
    state = DecodedDevice(
        "configuration", 0, version if type(version) is int else None, None, base, length, "configuration", {}
    )
    decoder = _Decoder(snap.read_bytes(base, length), base)
    state.fields, after = decoder.vmsd(desc, 0, length, "configuration", 0)
    if after is not None and after != length:
        state.fields["_problem"] = decoder.note(
            after, f"expected the end of the configuration section, found {length - after} more bytes"
        )
    state.problems = decoder.problems
    return state


def jsonable(value: Any) -> Any:
    """Decoded values as JSON: bytes become hex strings."""
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value


# -- ``mappedram dump --state`` and ``--desc`` ----------------------------------------------
def print_device_states(snap: Any, out: TextIO, *, desc: bool = False, as_json: bool = False) -> None:
    """The VM description (``desc``), or every device's decoded state as a tree or JSON.
    Raises FormatError when the file has no usable description."""
    vmdesc = snap.vmdesc
    if vmdesc is None:
        if snap.vmdesc_location is not None:
            raise FormatError(snap.vmdesc_location[0], "a VM description in JSON", "one that does not parse")
        eof = snap.eof_offset
        raise FormatError(snap.size if eof is None else eof + 1, "a VM description after EOF", "none")
    if desc:
        json.dump(vmdesc, out, indent=2)
        out.write("\n")
        return
    if as_json:
        json.dump(states_info(snap), out, indent=2)
        out.write("\n")
    else:
        config = configuration_state(snap)
        for line in format_states(([config] if config else []) + all_device_states(snap)):
            out.write(printable(line) + "\n")  # names and values come from the file


def states_info(snap: Any) -> dict[str, Any]:
    """The JSON form of ``dump --state --json`` (and extract --all's state.json)."""
    config = configuration_state(snap)
    return {
        "file": snap.path,
        "configuration": config.describe() if config else None,
        "devices": [s.describe() for s in all_device_states(snap)],
    }


_HEX_LINE = 32


def format_states(states: list[DecodedDevice]) -> Iterator[str]:
    """Lines of an indented tree: integers in hex (as QEMU's tools show them), buffers as hex dumps."""
    for state in states:
        version = f" v{state.version_id}" if state.version_id is not None else ""
        yield (
            f"{state.idstr} (instance {state.instance_id}{version}, {state.payload_length} bytes "
            f"at {state.payload_offset:#x})"
        )
        yield from _tree(state.fields, "  ")
        for problem in state.problems:
            yield f"  warning: {problem}"


def _scalar(value: Any) -> str:
    if value is None:
        return "nullptr"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:#x}" if value >= 0 else str(value)
    return str(value)


def _tree(values: Mapping[str, Any], indent: str) -> Iterator[str]:
    for name, value in values.items():
        if name == "_problem":
            yield f"{indent}PROBLEM: {value}"
        else:
            yield from _node(name, value, indent)


def _node(name: str, value: Any, indent: str) -> Iterator[str]:
    if isinstance(value, dict):
        if set(value) == {"_problem"}:
            yield f"{indent}{name}: PROBLEM: {value['_problem']}"
            return
        yield f"{indent}{name}:"
        yield from _tree(value, indent + "  ")
    elif isinstance(value, (bytes, bytearray)):
        if len(value) <= _HEX_LINE:
            yield f"{indent}{name}: {value.hex(' ') or '(empty)'}"
        else:
            yield f"{indent}{name}: ({len(value)} bytes)"
            for at in range(0, len(value), _HEX_LINE):
                yield f"{indent}  {at:04x}: {value[at : at + _HEX_LINE].hex(' ')}"
    elif isinstance(value, list):
        if all(not isinstance(v, (dict, list, bytes, bytearray)) for v in value):
            yield f"{indent}{name}: [{', '.join(_scalar(v) for v in value)}]"
        else:
            for i, item in enumerate(value):
                yield from _node(f"{name}[{i}]", item, indent)
    else:
        yield f"{indent}{name}: {_scalar(value)}"
