"""Shared test set-up: the real QEMU 10.0 fixtures of tests/fixtures/ (made by its make.py),
decompressed sparse and cached in tests/.fixtures/."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("MAPPEDRAM_FIXTURES", REPO / "tests" / "fixtures"))
CACHE = REPO / "tests" / ".fixtures"
CHUNK = 1 << 20
NAMES = sorted(p.name.removesuffix(".manifest.json") for p in FIXTURES.glob("*.manifest.json"))


def _decompress(src: Path, dest: Path) -> None:
    """zstd -d --sparse, in Python: all-zero MiB chunks become holes."""
    import zstandard

    tmp = dest.with_suffix(".partial")
    with src.open("rb") as fin, tmp.open("wb") as fout:
        reader = zstandard.ZstdDecompressor().stream_reader(fin)
        zero = bytes(CHUNK)
        while chunk := reader.read(CHUNK):
            if chunk == zero[: len(chunk)]:
                fout.seek(len(chunk), os.SEEK_CUR)
            else:
                fout.write(chunk)
        fout.truncate()
    tmp.replace(dest)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK * 8):
            h.update(chunk)
    return h.hexdigest()


def fixture_file(name: str) -> Path:
    """The decompressed fixture ``name`` (e.g. ``pc64-a-paused-mr.bin``), checked by its sha256.

    The cache keeps the checked digest beside each file: a regenerated fixture (same size,
    new content) is decompressed again."""
    manifest = load_manifest(name)
    dest, stamp = CACHE / name, CACHE / f"{name}.sha256"
    if not dest.exists() or not stamp.exists() or stamp.read_text() != manifest["file_sha256"]:
        CACHE.mkdir(exist_ok=True)
        stamp.unlink(missing_ok=True)
        _decompress(FIXTURES / f"{name}.zst", dest)
        digest = _sha256(dest)
        if digest != manifest["file_sha256"]:
            dest.unlink()
            raise AssertionError(f"{name}: decompressed sha256 {digest} != manifest {manifest['file_sha256']}")
        stamp.write_text(digest)
    return dest


def load_manifest(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.manifest.json").read_text())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if NAMES:
        return
    if os.environ.get("CI"):
        raise pytest.UsageError(f"no QEMU fixtures at {FIXTURES}; CI must have them")
    skip = pytest.mark.skip(reason=f"no QEMU fixtures at {FIXTURES} (set MAPPEDRAM_FIXTURES)")
    for item in items:
        if "fixture_name" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


@pytest.fixture(scope="session", params=NAMES or ["none"])
def fixture_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def fixture_path(fixture_name: str) -> Path:
    return fixture_file(fixture_name)


@pytest.fixture(scope="session")
def manifest(fixture_name: str) -> dict:
    return load_manifest(fixture_name)


@pytest.fixture(scope="session")
def paused_mr() -> Path:
    """The plain paused mapped-ram fixture, for tests that need one real file."""
    return fixture_file("pc64-a-paused-mr.bin")
