"""The one exception a malformed snapshot raises."""

from __future__ import annotations


class FormatError(ValueError):
    """A snapshot file is not what the format says it must be.

    ``offset`` is the absolute file offset where the problem was found, ``expected``
    says what the format requires there, ``found`` (optional) what the file holds.
    """

    def __init__(self, offset: int, expected: str, found: str | None = None) -> None:
        self.offset = offset
        self.expected = expected
        self.found = found
        text = f"offset {offset:#x} ({offset}): expected {expected}"
        if found is not None:
            text += f", found {found}"
        super().__init__(text)
