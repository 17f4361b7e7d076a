"""mappedram: read, check, restore and write QEMU mapped-ram snapshot files."""

from .errors import FormatError
from .formats.bitmap import BIG_ENDIAN_64, LITTLE_ENDIAN_64, BitmapLayout
from .mapper.blocks import MappedRamBlock, RamBlock, StreamRamBlock
from .mapper.snapshot import Snapshot, open

__all__ = [
    "BIG_ENDIAN_64",
    "LITTLE_ENDIAN_64",
    "BitmapLayout",
    "FormatError",
    "MappedRamBlock",
    "RamBlock",
    "Snapshot",
    "StreamRamBlock",
    "open",
]
