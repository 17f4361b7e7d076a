"""Where x86 pc and q35 machines put RAM in guest-physical memory (QEMU's hw/i386 rules).

Facts, no I/O: the command line checks its options with them at start, and the physical
view places blocks with them.
"""

from __future__ import annotations

PAGE = 4096  # QEMU maps x86 RAM in whole 4 KiB target pages
FOUR_GIB = 1 << 32
VGA_WINDOW = (0xA0000, 0xC0000)  # legacy video memory, read from the VGA device, not RAM


def below_4g_problem(size: int) -> str | None:
    """Why ``size`` cannot be the bytes of main RAM mapped below 4 GiB, or None."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0 or size % PAGE or size > FOUR_GIB:
        return f"a multiple of {PAGE} (the x86 page) up to 4 GiB"
    return None
