"""What each RAM migration mode allows, said once.

QEMU spreads ``migrate_mapped_ram()`` checks over ram.c and multifd.c; here one table
says which RAM_SAVE_FLAG_* words a mode may carry and which channel syncs happen at
which event, and the reader, verifier and writer ask it instead of testing the mode.
Sources: FORMAT.md §3.5, §3.6 and §4.2 (ram_load_precopy's ``invalid_flags``,
multifd_ram_sync_per_round, multifd_recv_sync_main).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping

from .constants import CAP_MAPPED_RAM, RamFlag


class Mode(enum.Enum):
    MAPPED_RAM = "mapped-ram"
    STREAM = "stream"  # the classic stream: pages inline as PAGE/ZERO records


class Event(enum.Enum):
    """Points where a channel sync may be due."""

    ROUND_END = "round-end"  # writer: a pass over the dirty pages is queued
    LOAD_END = "load-end"  # reader: every block's pages are queued


class Sync(enum.Enum):
    NONE = "none"
    LOCAL = "local"  # wait until every channel thread is idle; nothing is written to the stream


@dataclass(frozen=True)
class ModePolicy:
    mode: Mode
    valid_flags: RamFlag  # flags a RAM word may carry in this mode
    decoded_flags: RamFlag  # the subset this project decodes
    pages_in_stream: bool  # PAGE/ZERO records in the stream, else at fixed offsets
    block_has_mapped_ram_header: bool
    syncs: Mapping[Event, Sync] = field(default_factory=dict)

    def sync_at(self, event: Event) -> Sync:
        return self.syncs.get(event, Sync.NONE)

    def word_problem(self, flags: int) -> str | None:
        """Why a RAM word with these flag bits is not allowed here, or None."""
        if flags & ~int(self.valid_flags):  # int: ~ of an IntFlag drops the bits it does not name
            return f"RAM flags valid under {self.mode.value} ({flag_names(self.valid_flags)})"
        if flags & ~int(self.decoded_flags):
            return f"RAM flags this reader decodes ({flag_names(self.decoded_flags)})"
        return None

    def later_word_problem(self, flags: int) -> str | None:
        """``word_problem`` for any word but the one opening the RAM section."""
        return self.word_problem(flags) or ("no second MEM_SIZE word" if flags & RamFlag.MEM_SIZE else None)


def flag_names(flags: int) -> str:
    """``MEM_SIZE|EOS`` for 0x14; unknown bits in hex."""
    names = [f.name for f in RamFlag if f.name and flags & f]
    rest = flags & ~sum(RamFlag)
    return "|".join(names + ([f"{rest:#x}"] if rest else [])) or "0"


POLICIES: Mapping[Mode, ModePolicy] = {
    Mode.MAPPED_RAM: ModePolicy(
        mode=Mode.MAPPED_RAM,
        # QEMU rejects HOOK|MULTIFD_FLUSH|PAGE|XBZRLE|ZERO; FULL and COMPRESS_PAGE are gone.
        valid_flags=RamFlag.MEM_SIZE | RamFlag.EOS,
        decoded_flags=RamFlag.MEM_SIZE | RamFlag.EOS,
        pages_in_stream=False,
        block_has_mapped_ram_header=True,
        # Sender: a local thread sync at the end of every dirty pass, no flush word.
        # Receiver: one sync after the block list, "once and for all".
        syncs={Event.ROUND_END: Sync.LOCAL, Event.LOAD_END: Sync.LOCAL},
    ),
    Mode.STREAM: ModePolicy(
        mode=Mode.STREAM,
        valid_flags=RamFlag.MEM_SIZE
        | RamFlag.EOS
        | RamFlag.PAGE
        | RamFlag.ZERO
        | RamFlag.CONTINUE
        | RamFlag.XBZRLE
        | RamFlag.MULTIFD_FLUSH,
        decoded_flags=RamFlag.MEM_SIZE
        | RamFlag.EOS
        | RamFlag.PAGE
        | RamFlag.ZERO
        | RamFlag.CONTINUE
        | RamFlag.MULTIFD_FLUSH,
        pages_in_stream=True,
        block_has_mapped_ram_header=False,
        # A file stream has one writer channel: pages are in order in the stream itself.
        # QEMU loads it inline; our parallel reader, once the pages are indexed, syncs
        # its channels once at the end like mapped-ram.
        syncs={Event.LOAD_END: Sync.LOCAL},
    ),
}


# The capability in the configuration section that announces a mode; a stream that
# announces none is a classic stream.
MODE_CAPABILITIES: Mapping[Mode, str] = {Mode.MAPPED_RAM: CAP_MAPPED_RAM}


def policy_for(capabilities: tuple[str, ...] | list[str]) -> ModePolicy:
    """The policy of a stream whose configuration announced these capabilities."""
    announced = [mode for mode, cap in MODE_CAPABILITIES.items() if cap in capabilities]
    return POLICIES[announced[0] if announced else Mode.STREAM]
