"""What the dependency floors and the installed package rely on, checked on any numpy."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_python_m_mappedram_prints_the_installed_version():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-m", "mappedram", "--version"], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout == f"mappedram {metadata.version('mappedram')}\n"
