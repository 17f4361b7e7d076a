"""The lowest versions pyproject.toml allows, for CI's floor run.

`floors.py constraints` prints a pip constraints file pinning every requirement of the build,
the package and its test extra to its `>=` bound; `floors.py python` prints the lowest Python.
A requirement without a `>=` bound is an error: each one must state the floor CI tests.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
FLOOR = re.compile(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*[^;]*?>=\s*([0-9][0-9A-Za-z.]*)")


def main(what: str) -> int:
    project = tomllib.loads(PYPROJECT.read_text())
    if what == "python":
        print(FLOOR.match("python" + project["project"]["requires-python"]).group(2))
        return 0
    requirements = (
        project["build-system"]["requires"]
        + project["project"]["dependencies"]
        + project["project"]["optional-dependencies"]["test"]
    )
    for requirement in requirements:
        match = FLOOR.match(requirement)
        if match is None:
            print(f"floors.py: {PYPROJECT}: {requirement!r} has no >= floor", file=sys.stderr)
            return 1
        print(f"{match.group(1)}=={match.group(2)}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] not in (["constraints"], ["python"]):
        sys.exit("usage: floors.py constraints|python")
    sys.exit(main(sys.argv[1]))
