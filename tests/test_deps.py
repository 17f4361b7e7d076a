"""What the dependency floors and the installed package rely on, checked on any numpy."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from mappedram.formats import bitmap as bm

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("size", [0, 1, 7, bm._UNPACK_SLICE - 1, 3 * bm._UNPACK_SLICE + 5])
def test_popcount_without_bitwise_count(size):
    """numpy 1.26 takes popcount_unpacked: slice borders must neither drop nor double a byte."""
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    expected = int.from_bytes(data.tobytes(), "little").bit_count()
    assert bm.popcount_unpacked(data) == expected
    assert bm.popcount(data) == expected


def test_popcount_of_a_view_with_a_stride():
    data = np.arange(1000, dtype=np.uint8)[::3]
    expected = sum(int(b).bit_count() for b in data.tolist())
    assert bm.popcount_unpacked(data) == expected == bm.popcount(data)


def test_python_m_mappedram_prints_the_installed_version():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-m", "mappedram", "--version"], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout == f"mappedram {metadata.version('mappedram')}\n"
