"""Declarative schemas and tables of the QEMU snapshot format; no I/O here.

``structs`` (construct's schemas) is imported by who uses it: the reader does not
(headers.py), and construct's import is most of a small file's ``dump``.
"""

from . import bitmap, constants, policy
from .bitmap import BitmapLayout
from .constants import RamFlag, SectionType, VmCommand
from .policy import Mode, ModePolicy, policy_for

__all__ = [
    "BitmapLayout",
    "Mode",
    "ModePolicy",
    "RamFlag",
    "SectionType",
    "VmCommand",
    "bitmap",
    "constants",
    "policy",
    "policy_for",
    "structs",
]
