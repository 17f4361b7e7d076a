"""mappedram: read, check, restore and write QEMU mapped-ram snapshot files."""

from .errors import FormatError
from .formats.bitmap import BIG_ENDIAN_64, LITTLE_ENDIAN_64, BitmapLayout
from .formats.policy import Mode
from .mapper.blocks import MappedRamBlock, RamBlock, StreamRamBlock
from .mapper.convert import convert
from .mapper.extract_all import extract_all
from .mapper.physical import PhysicalView, export_elf
from .mapper.restore import extract, restore, restore_into
from .mapper.snapshot import Snapshot, open
from .mapper.verify import Report, verify
from .mapper.writer import DeviceState, SnapshotWriter
from .visual.diff import DiffResult, diff

__version__ = "0.1.0"

__all__ = [
    "BIG_ENDIAN_64",
    "LITTLE_ENDIAN_64",
    "BitmapLayout",
    "DeviceState",
    "DiffResult",
    "FormatError",
    "MappedRamBlock",
    "Mode",
    "RamBlock",
    "Report",
    "Snapshot",
    "PhysicalView",
    "SnapshotWriter",
    "StreamRamBlock",
    "convert",
    "diff",
    "export_elf",
    "extract",
    "extract_all",
    "open",
    "restore",
    "restore_into",
    "verify",
]
