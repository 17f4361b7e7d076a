"""What a walk over the stream finds: its top-level elements, and problems that do not stop it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Problem:
    """Something wrong that does not stop the walk; verify reports these."""

    offset: int
    text: str

    def __str__(self) -> str:
        return f"offset {self.offset:#x} ({self.offset}): {self.text}"


@dataclass(slots=True)
class Section:
    """One top-level element of the stream (filled in as the walker gets past it)."""

    kind: str  # start, part, end, full, command, eof
    offset: int
    section_id: int | None = None
    idstr: str | None = None
    instance_id: int | None = None
    version_id: int | None = None
    payload_offset: int | None = None
    payload_length: int | None = None
    footer_offset: int | None = None
    command: str | None = None
    end: int | None = None  # just past the footer (or the payload)

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}
