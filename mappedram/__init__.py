"""mappedram: read, check, restore and write QEMU mapped-ram snapshot files.

The names below are imported on first use (module ``__getattr__``), so that ``import
mappedram`` and the command line start without loading what they do not run (numpy,
construct, the writer).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import FormatError

__version__ = "0.1.0"

# name -> the module that defines it
_LAZY = {
    "BIG_ENDIAN_64": ".formats.bitmap",
    "LITTLE_ENDIAN_64": ".formats.bitmap",
    "BitmapLayout": ".formats.bitmap",
    "Mode": ".formats.policy",
    "MappedRamBlock": ".mapper.blocks",
    "RamBlock": ".mapper.blocks",
    "StreamRamBlock": ".mapper.blocks",
    "convert": ".mapper.convert",
    "PhysicalView": ".mapper.physical",
    "export_elf": ".mapper.physical",
    "extract": ".mapper.restore",
    "restore": ".mapper.restore",
    "restore_into": ".mapper.restore",
    "Snapshot": ".mapper.snapshot",
    "ForwardSnapshot": ".mapper.forward",
    "open": ".mapper.images",  # open_image: a Snapshot, or a ForwardSnapshot for a compressed image
    "Report": ".mapper.verify",
    "verify": ".mapper.verify",
    "DeviceState": ".mapper.writer",
    "SnapshotWriter": ".mapper.writer",
    "extract_all": ".mapper.extract_all",
    "DiffResult": ".visual.diff",
    "diff": ".visual.diff",
}

__all__ = [
    "BIG_ENDIAN_64",
    "LITTLE_ENDIAN_64",
    "BitmapLayout",
    "DeviceState",
    "DiffResult",
    "FormatError",
    "ForwardSnapshot",
    "MappedRamBlock",
    "Mode",
    "PhysicalView",
    "RamBlock",
    "Report",
    "Snapshot",
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

if TYPE_CHECKING:
    from .formats.bitmap import BIG_ENDIAN_64, LITTLE_ENDIAN_64, BitmapLayout
    from .formats.policy import Mode
    from .mapper.blocks import MappedRamBlock, RamBlock, StreamRamBlock
    from .mapper.convert import convert
    from .mapper.extract_all import extract_all
    from .mapper.forward import ForwardSnapshot
    from .mapper.images import open_image as open
    from .mapper.physical import PhysicalView, export_elf
    from .mapper.restore import extract, restore, restore_into
    from .mapper.snapshot import Snapshot
    from .mapper.verify import Report, verify
    from .mapper.writer import DeviceState, SnapshotWriter
    from .visual.diff import DiffResult, diff


_RENAMED = {"open": "open_image"}  # names defined under another name


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mappedram' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), _RENAMED.get(name, name))
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
