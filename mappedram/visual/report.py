"""``mappedram report``: one self-contained HTML page about a snapshot file.

Header, capabilities, verify's verdict and problems, the RAM blocks, the file's layout,
the device sections (with what the VM description says of them) and the pictures,
inline as data: URIs. No script, no network: a Content-Security-Policy forbids both,
and every string taken from the file is escaped (``escape``).
"""

from __future__ import annotations

import base64
import html
import os
from typing import Any, Iterable, Sequence

from .. import __version__
from ..errors import FormatError
from ..mapper.output import check_output
from ..mapper.snapshot import Snapshot
from ..mapper.source import Source
from ..mapper.verify import Report, verify
from ..progress import human
from ..textsafe import printable
from . import plot
from .layout import KINDS, layout
from .output import write_output


def escape(text: str) -> str:
    """Text for the page: what is not printable shown escaped (as on the terminal), then
    the HTML specials; a control character or NUL from the file never reaches the page."""
    return html.escape(printable(text))


CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; word-break: break-all; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .5em 0; } td, th { padding: .2em .7em; text-align: left; }
th { background: #f0f0f0; } tr:nth-child(even) td { background: #fafafa; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; } code, td.o { font-family: monospace; }
.verdict { padding: .6em 1em; border-radius: 4px; font-weight: bold; display: inline-block; }
.valid { background: #e3f4e1; color: #1b5e20; } .invalid { background: #fde0dc; color: #b71c1c; }
dl { display: grid; grid-template-columns: max-content auto; gap: .15em 1.2em; } dt { color: #666; }
dd { margin: 0; word-break: break-all; } img { max-width: 100%; border: 1px solid #ddd; }
.swatch { display: inline-block; width: .9em; height: .9em; border: 1px solid #777; vertical-align: middle; }
.muted { color: #777; }
"""


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]], numeric: Sequence[int] = ()) -> str:
    """An HTML table; cells are escaped here unless they are _Raw."""
    head = "".join(
        f'<th class="n">{escape(h)}</th>' if i in numeric else f"<th>{escape(h)}</th>" for i, h in enumerate(headers)
    )
    body = []
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            text = value.html if isinstance(value, _Raw) else escape("" if value is None else str(value))
            cells.append(f'<td class="n">{text}</td>' if i in numeric else f"<td>{text}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class _Raw:
    """Markup made here (not from the file), put into a table as is."""

    def __init__(self, html: str) -> None:
        self.html = html


def _hex(value: int | None) -> str:
    return "" if value is None else f"{value:#x}"


def _verdict(report: Report) -> str:
    if report.ok:
        notes = "".join(f" ({escape(n)})" for n in report.notes)
        return f'<p><span class="verdict valid">valid</span>{notes}</p>'
    rows = [(_hex(p.offset), p.offset, p.text) for p in report.problems]
    count = len(report.problems)
    return f'<p><span class="verdict invalid">invalid: {count} problem{"s" if count != 1 else ""}</span></p>' + _table(
        ["offset", "offset (decimal)", "problem"], rows, numeric=(1,)
    )


def _summary(snap: Snapshot) -> str:
    """From what opening the file read (no walk of the stream, which may fail further on)."""
    lv = snap.libvirt
    vmdesc = snap.vmdesc
    devices = vmdesc.get("devices") if isinstance(vmdesc, dict) else None
    items = [
        ("file", f"{snap.path} ({snap.size} bytes, {human(snap.size)})"),
        (
            "libvirt header",
            f"v{lv.version} {'complete' if lv.complete else 'INCOMPLETE'}, format {lv.format}, "
            f"data_len {lv.data_len}, {lv.byteorder}-endian"
            if lv
            else "none",
        ),
        ("stream", f"QEVM v{snap.version} at {snap.stream_start:#x}, format {snap.format}"),
        ("machine", snap.machine_type or "(no configuration section)"),
        ("capabilities", ", ".join(snap.capabilities) or "(none)"),
        ("page size", str(snap.page_size)),
        ("RAM", f"{snap.ram_total} bytes ({human(snap.ram_total or 0)}) in {len(snap.blocks)} blocks"),
        (
            "VM description",
            f"{len(devices)} devices" if isinstance(devices, list) else "(none)" if vmdesc is None else "(unusual)",
        ),
    ]
    if snap.uuid:
        items.append(("uuid", snap.uuid))
    return "<dl>" + "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in items) + "</dl>"


def _blocks(snap: Snapshot) -> str:
    info = snap.describe(sections=False)  # a classic stream's blocks walk its page records
    mapped = snap.policy.block_has_mapped_ram_header
    headers = ["block", "used_length", "size", "present", "pages", "share"]
    if mapped:
        headers += ["bitmap_offset", "bitmap_size", "pages_offset"]
    rows = []
    for b in info["blocks"]:
        share = f"{b['pages_present'] / b['pages_total']:.1%}" if b["pages_total"] else ""
        row: list[object] = [b["name"], b["used_length"], human(b["used_length"]), b["pages_present"], b["pages_total"]]
        row.append(share if b["in_file"] else "not in the file (x-ignore-shared)")
        if mapped:
            row += [_hex(b.get("bitmap_offset")), b.get("bitmap_size"), _hex(b.get("pages_offset"))]
        rows.append(row)
    return _table(headers, rows, numeric=(1, 3, 4, 7) if mapped else (1, 3, 4))


def _layout(snap: Snapshot) -> str:
    rows = [
        (
            _Raw(f'<span class="swatch" style="background:{plot.COLORS[s.kind]}"></span>'),
            _hex(s.start),
            _hex(s.end),
            s.size,
            human(s.size),
            KINDS[s.kind],
            s.label,
        )
        for s in layout(snap)
    ]
    return _table(["", "start", "end", "bytes", "size", "kind", "what"], rows, numeric=(3,))


def _vmdesc_devices(vmdesc: object) -> dict[tuple[str, int], dict[str, Any]]:
    """The VM description's devices by (name, instance); anything malformed is left out."""
    devices = vmdesc.get("devices") if isinstance(vmdesc, dict) else None
    out = {}
    for dev in devices if isinstance(devices, list) else []:
        if isinstance(dev, dict) and isinstance(dev.get("name"), str) and isinstance(dev.get("instance_id"), int):
            out[(dev["name"], dev["instance_id"])] = dev
    return out


def _names(items: object, limit: int = 6) -> str:
    listed = items if isinstance(items, list) else []
    names = [f["name"] for f in listed if isinstance(f, dict) and isinstance(f.get("name"), str)]
    more = f", ... {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _devices(snap: Snapshot) -> str:
    described = _vmdesc_devices(snap.vmdesc)
    rows = []
    for sec in snap.devices:
        dev = described.get((sec.idstr or "", sec.instance_id or 0), {})
        fields = dev.get("fields")
        rows.append(
            (
                _hex(sec.offset),
                sec.idstr,
                sec.instance_id,
                sec.version_id,
                sec.payload_length,
                dev.get("vmsd_name", ""),
                len(fields) if isinstance(fields, list) else "",
                _names(fields),
                _names(dev.get("subsections")),
            )
        )
    note = "" if described else '<p class="muted">The file has no VM description: no field names.</p>'
    return (
        f"<p>{len(snap.devices)} device sections</p>"
        + note
        + _table(
            [
                "offset",
                "idstr",
                "instance",
                "version",
                "payload bytes",
                "vmsd",
                "fields",
                "first fields",
                "subsections",
            ],
            rows,
            numeric=(2, 3, 4, 6),
        )
    )


def _stream_sections(snap: Snapshot) -> str:
    rows = [
        (_hex(s.offset), s.kind, s.command or s.idstr, s.section_id, s.payload_length)
        for s in snap.sections
        if not (s.kind == "full" and s.idstr != "ram")
    ]
    return _table(["offset", "kind", "what", "section id", "payload bytes"], rows, numeric=(3, 4))


def _picture(snap: Snapshot) -> str:
    try:
        figure = plot.snapshot_figure(snap)
    except plot.MissingMatplotlib as err:
        return f'<p class="muted">{escape(str(err))}</p>'
    data = base64.b64encode(plot.render(figure, "png")).decode("ascii")
    alt = f"layout and population of {os.path.basename(snap.path)}"
    return f'<p><img src="data:image/png;base64,{data}" alt="{escape(alt)}"></p>'


def render_report(path: str | os.PathLike[str], **open_args: Any) -> tuple[str, Report]:
    """The HTML page and verify's report. A file that does not open gets a page with its
    verdict only."""
    report = verify(path, **open_args)
    title = f"mappedram report: {os.fspath(path)}"
    parts = [f"<h1>{escape(title)}</h1>", f'<p class="muted">made by mappedram {escape(__version__)}</p>']
    parts += ["<h2>Verdict</h2>", _verdict(report)]
    try:
        snap = Snapshot(path, **open_args)
    except FormatError:
        snap = None  # verify's problem says why
    if snap is not None:
        with snap:
            parts += ["<h2>Header</h2>", _summary(snap)]
            for heading, part in [
                ("RAM blocks", _blocks),
                ("Pictures", _picture),
                ("Layout", _layout),
                ("Devices", _devices),
                ("Other sections", _stream_sections),
            ]:
                parts.append(f"<h2>{heading}</h2>")
                try:
                    parts.append(part(snap))
                except FormatError as err:  # a stream that cannot be walked to its end
                    parts.append(f'<p class="muted">not shown: {escape(str(err))}</p>')
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )
    return page, report


def write_report(
    path: str | os.PathLike[str], out: str | os.PathLike[str], *, overwrite: bool = True, **open_args: Any
) -> Report:
    """Write the page to ``out`` (appears only when complete); returns verify's report.
    ``out`` may not be the input, nor exist without ``overwrite``: refused before any work."""
    src = Source(path)
    try:
        check_output(out, overwrite=overwrite, source_fds=[src.fd])
        page, report = render_report(path, **open_args)
        write_output(out, page.encode("utf-8"), overwrite=overwrite, source_fds=[src.fd])
    finally:
        src.close()
    return report
