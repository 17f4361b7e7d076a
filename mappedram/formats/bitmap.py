"""The mapped-ram per-block bitmap (FORMAT.md §3.4).

QEMU writes ``file_bmap`` as raw host ``unsigned long`` words: bit n of the bitmap is
bit n % BITS_PER_LONG of word n / BITS_PER_LONG, in the writing host's byte order.
On a little-endian 64-bit host that is an LSB-first byte bitmap; a big-endian host
(s390x, ppc64) reverses the bytes inside each word. The numpy functions work on
"LSB bytes", the little-endian view, and convert from or to the file's layout; they
import numpy when called. Counting bits needs no numpy (``popcount``, ``stray_bits``):
``mappedram dump`` of a huge guest counts its bitmap in less time than numpy's import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Literal

if TYPE_CHECKING:
    import numpy as np

# Bytes counted at once by popcount: a 64 KiB piece stays in cache. An all-zero or all-one
# piece is only compared; of the others the zero bytes are dropped (~0.5 ns a byte here)
# before int.from_bytes and bit_count (~1.2 ns a byte left): a sparse bitmap costs about
# half of counting every byte, a dense random one about 1.4 times.
POPCOUNT_PIECE = 1 << 16
_ZERO_PIECE = bytes(POPCOUNT_PIECE)
_ONES_PIECE = b"\xff" * POPCOUNT_PIECE


@dataclass(frozen=True)
class BitmapLayout:
    """How the writing host stored its ``unsigned long`` words."""

    word_bytes: int = 8
    byteorder: Literal["little", "big"] = "little"

    def size(self, num_pages: int) -> int:
        """BITS_TO_LONGS(num_pages) * sizeof(unsigned long)."""
        bits = 8 * self.word_bytes
        return -(-num_pages // bits) * self.word_bytes

    def to_lsb(self, raw: np.ndarray) -> np.ndarray:
        """File bytes (uint8, whole words) -> LSB-first bytes. No copy for little-endian."""
        if self.byteorder == "little":
            return raw
        import numpy as np

        return np.ascontiguousarray(raw.reshape(-1, self.word_bytes)[:, ::-1]).reshape(-1)

    def from_lsb(self, lsb: np.ndarray) -> np.ndarray:
        """LSB-first bytes -> file bytes; the swap is its own inverse."""
        return self.to_lsb(lsb)

    def pack(self, present: np.ndarray) -> bytes:
        """A bool array of pages -> the bitmap bytes as this host would write them."""
        import numpy as np

        lsb = np.packbits(np.asarray(present, dtype=bool), bitorder="little")
        out = np.zeros(self.size(len(present)), dtype=np.uint8)
        out[: len(lsb)] = lsb
        return self.from_lsb(out).tobytes()

    def stray_bits(self, tail: bytes, keep: int) -> int:
        """Set bits of ``tail`` (whole words, as the file holds them) past its first
        ``keep`` bits: bit n is bit n % 64 of word n / 64, whatever the byte order."""
        count = 0
        for at in range(0, len(tail), self.word_bytes):
            word = int.from_bytes(tail[at : at + self.word_bytes], self.byteorder)
            count += (word >> max(keep - 8 * at, 0)).bit_count()
        return count


LITTLE_ENDIAN_64 = BitmapLayout()
BIG_ENDIAN_64 = BitmapLayout(byteorder="big")


def popcount(data: bytes | bytearray) -> int:
    """Number of set bits in ``data`` (any byte order: a word's bits stay in the word)."""
    count = 0
    for at in range(0, len(data), POPCOUNT_PIECE):
        piece = data[at : at + POPCOUNT_PIECE]
        if piece == _ZERO_PIECE:
            continue
        if piece == _ONES_PIECE:
            count += 8 * POPCOUNT_PIECE
            continue
        count += int.from_bytes(piece.translate(None, b"\0"), "little").bit_count()
    return count


def unpack(lsb: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` bits as a bool array (page i -> present)."""
    import numpy as np

    return np.unpackbits(lsb, count=count, bitorder="little").view(bool)


def runs(present: np.ndarray, base: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Runs of True as (first page, length) arrays; pages are numbered from ``base``."""
    import numpy as np

    edges = np.diff(present.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return starts + base, ends - starts


def merge_runs(chunks: Iterator[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[int, int]]:
    """Join per-chunk runs that touch at chunk borders into (first page, count) pairs."""
    open_start = open_len = 0
    for starts, lengths in chunks:
        for start, length in zip(starts.tolist(), lengths.tolist()):
            if open_len and open_start + open_len == start:
                open_len += length
                continue
            if open_len:
                yield open_start, open_len
            open_start, open_len = start, length
    if open_len:
        yield open_start, open_len
