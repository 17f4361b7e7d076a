"""Where x86 pc and q35 machines put RAM in guest-physical memory (QEMU's hw/i386 rules).

Facts, no I/O: the command line checks its options with them at start, and the physical
view (mapper/physical.py) places blocks with them.
"""

from __future__ import annotations

PAGE = 4096  # QEMU maps x86 RAM in whole 4 KiB target pages
FOUR_GIB = 1 << 32
ADDRESS_END = 1 << 64  # the first address past guest-physical memory (and an ELF64 p_paddr)
VGA_WINDOW = (0xA0000, 0xC0000)  # legacy video memory, read from the VGA device, not RAM
MAIN_RAM = "pc.ram"  # split at the PCI hole: below_4g() bytes from 0, the rest from 4 GiB
BIOS = "pc.bios"  # mapped just below 4 GiB


def below_4g(machine_type: str | None, ram_size: int) -> int:
    """Bytes of main RAM mapped below 4 GiB for this machine type and RAM size: pc (i440fx)
    3 GiB when RAM >= 3.5 GiB, q35 2 GiB when RAM >= 2.75 GiB, else all of it (pc_piix.c,
    pc_q35.c)."""
    machine = machine_type or ""
    if "q35" in machine:
        return 0x80000000 if ram_size >= 0xB0000000 else ram_size
    if "i440fx" in machine or machine.startswith("pc-") or machine == "pc":
        return 0xC0000000 if ram_size >= 0xE0000000 else ram_size
    raise ValueError(f"no guest-physical layout known for machine type {machine_type!r}; give below_4g_size=")


def below_4g_problem(size: int) -> str | None:
    """Why ``size`` cannot be the bytes of main RAM mapped below 4 GiB, or None."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0 or size % PAGE or size > FOUR_GIB:
        return f"a multiple of {PAGE} (the x86 page) up to 4 GiB"
    return None


def address_problem(addr: int) -> str | None:
    """Why a block cannot be placed at guest-physical ``addr`` (export-elf --map), or None."""
    if isinstance(addr, bool) or not isinstance(addr, int) or not 0 <= addr < ADDRESS_END:
        return f"a guest-physical address below {ADDRESS_END:#x}"
    if addr % PAGE:
        return f"a multiple of {PAGE} (the x86 page)"
    return None
