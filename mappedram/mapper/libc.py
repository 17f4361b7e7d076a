"""C library functions that Python's os module lacks, through ctypes."""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache
from typing import Any


@cache
def libc_function(names: tuple[str, ...], *argtypes: Any) -> Any | None:
    """The first of ``names`` the C library has, taking ``argtypes`` and setting errno for
    ``ctypes.get_errno()``; None where it has none of them (or there is no C library)."""
    path = ctypes.util.find_library("c")
    if not path:
        return None
    libc = ctypes.CDLL(path, use_errno=True)
    for name in names:
        fn = getattr(libc, name, None)
        if fn is not None:
            fn.argtypes = list(argtypes)
            return fn
    return None
