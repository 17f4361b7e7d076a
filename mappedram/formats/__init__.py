"""Declarative schemas and tables of the QEMU snapshot format; no I/O here."""

from . import bitmap, constants, policy, structs
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
