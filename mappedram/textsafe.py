"""Text from a snapshot file made safe to print on a terminal.

Block names, section idstrs, the machine type, capabilities and the VM description are
whatever the file says. Printed raw, a newline in one forges a second output line and an
ESC starts a terminal control sequence. ``printable`` escapes every character that is
not printable (controls, format characters such as bidi overrides, line and paragraph
separators, surrogates of undecodable file names) as ``\\xNN``, ``\\uNNNN`` or
``\\UNNNNNNNN``, and keeps printable non-ASCII text as it is. JSON output needs none of
this: ``json.dumps`` with ``ensure_ascii`` escapes the same characters.
"""

from __future__ import annotations


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: object) -> str:
    """``str(text)`` with every non-printable character escaped (space stays)."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in s)
