"""mappedram report: one self-contained HTML page, checked as parsed HTML and as rendered by Chromium."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import fixture_file
from craft import patch, pattern_block, write_snapshot
from fuzz_harness import hot_offsets, make_seeds, mutate, time_limit

import mappedram
from mappedram import FormatError
from mappedram.cli import main
from mappedram.visual.diff import NotComparable
from mappedram.visual.layout import layout, population
from mappedram.visual.report import render_report

A = "pc64-a-paused-mr.bin"
LEGACY = "pc64-d-paused-legacy.bin"
EVIL = ("<script>alert(1)</script>", 'a&b"<img src=x onerror=alert(2)>')
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Elements(HTMLParser):
    """Every start tag with its attributes, and the text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _Elements:
    parser = _Elements()
    parser.feed(page)
    return parser


def _evil_snapshot(tmp_path: Path) -> Path:
    return write_snapshot(tmp_path / "evil.sav", {EVIL[0]: pattern_block(4), EVIL[1]: pattern_block(2)})


def test_report_is_self_contained(tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", str(fixture_file(A)), "-o", str(out)]) == 0
    assert "(valid)" in capsys.readouterr().out
    parsed = _parse(out.read_text(encoding="utf-8"))
    tags = [t for t, _ in parsed.tags]
    assert "script" not in tags and "link" not in tags and "iframe" not in tags
    for _, attrs in parsed.tags:  # nothing fetched: every src is inline data
        for name in ("src", "href"):
            assert attrs.get(name) is None or attrs[name].startswith("data:"), attrs
    csp = [a["content"] for t, a in parsed.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp == ["default-src 'none'; img-src data:; style-src 'unsafe-inline'"]
    text = " ".join(parsed.text)
    with mappedram.open(fixture_file(A)) as snap:
        for block in snap.blocks.values():
            assert block.name in text
        for sec in snap.devices:
            assert sec.idstr in text
    assert "valid" in text and "pc-i440fx-10.0" in text and "mapped-ram" in text


def test_block_names_are_escaped(tmp_path):
    page, report = render_report(_evil_snapshot(tmp_path))
    assert report.ok
    parsed = _parse(page)
    assert [t for t, _ in parsed.tags].count("script") == 0
    assert not [a for t, a in parsed.tags if t == "img" and a.get("src") == "x"]
    text = "".join(parsed.text)
    assert EVIL[0] in text and EVIL[1] in text  # shown as text, not markup


def test_report_of_an_invalid_file(tmp_path, capsys):
    bad = tmp_path / "stray.sav"
    shutil.copyfile(fixture_file(A), bad)
    with mappedram.open(bad) as snap:
        rsdp = snap.block("/rom@etc/acpi/rsdp")  # one page: bit 1 of its bitmap is past the end
        at = rsdp.bitmap_offset
    patch(bad, at, b"\x03")
    problems = mappedram.verify(bad).problems
    assert problems
    out = tmp_path / "bad.html"
    assert main(["report", str(bad), "-o", str(out)]) == 1
    text = " ".join(_parse(out.read_text(encoding="utf-8")).text)
    assert f"invalid: {len(problems)} problem" in text
    assert all(p.text in text and f"{p.offset:#x}" in text for p in problems)


def test_report_of_a_file_that_does_not_open(tmp_path, capsys):
    junk = tmp_path / "junk.sav"
    junk.write_bytes(b"\0" * 1000)
    out = tmp_path / "junk.html"
    assert main(["report", str(junk), "-o", str(out)]) == 1
    text = " ".join(_parse(out.read_text(encoding="utf-8")).text)
    assert "invalid: 1 problem" in text and "QEVM magic" in text


def test_report_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)
    page, _ = render_report(fixture_file(LEGACY))
    parsed = _parse(page)
    assert not [t for t, _ in parsed.tags if t == "img"]
    assert "pip install 'mappedram[plot]'" in "".join(parsed.text)
    assert "RAM page records" in "".join(parsed.text)  # the layout table needs no matplotlib


# -- in a real browser ------------------------------------------------------------------------

# A page of the test's own that shows the report in an iframe and, once everything has
# loaded, writes what the browser made of it into its own DOM: the report itself stays
# untouched (its policy forbids scripts). File pages may read each other only with
# --allow-file-access-from-files.
PROBE = """<!DOCTYPE html><html><body><iframe id="r" src="REPORT" width="1400" height="900"></iframe>
<pre id="out"></pre><script>
window.addEventListener("load", () => {
  const doc = document.getElementById("r").contentDocument;
  const images = Array.from(doc.images, (i) => ({width: i.naturalWidth, height: i.naturalHeight, done: i.complete}));
  const tables = Array.from(doc.querySelectorAll("table"), (t) => t.innerText);
  const scripts = doc.querySelectorAll("script").length;
  document.getElementById("out").textContent = JSON.stringify({images, tables, scripts, text: doc.body.innerText});
});
</script></body></html>"""


def _chromium(tmp_path: Path, report: Path) -> tuple[dict, list[str]]:
    """What the browser rendered (images, table texts, scripts, text) and its console lines."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium: CI must run the browser tests (.ci/install-browser)")
        pytest.skip("no chromium on PATH (sudo .ci/install-browser installs Debian's)")
    probe = tmp_path / "probe.html"
    probe.write_text(PROBE.replace("REPORT", report.name), encoding="utf-8")
    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--allow-file-access-from-files",
        "--enable-logging=stderr",
        "--v=0",
        "--dump-dom",
        probe.as_uri(),
    ]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r'<pre id="out">(.*?)</pre>', proc.stdout, re.S)
    assert found and found.group(1), proc.stdout[-2000:]
    out = json.loads(html.unescape(found.group(1)))
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return out, console


def test_report_in_chromium(tmp_path):
    report = tmp_path / "report.html"
    assert main(["report", str(fixture_file(A)), "-o", str(report)]) == 0
    seen, console = _chromium(tmp_path, report)
    assert console == []  # no errors, no policy violations
    assert seen["scripts"] == 0
    blocks = seen["tables"][0]
    with mappedram.open(fixture_file(A)) as snap:
        for block in snap.blocks.values():
            row = f"{block.name}\t{block.used_length}"
            assert row in blocks, row
            assert f"{block.populated}\t{block.num_pages}" in blocks
    assert "valid" in seen["text"]
    pytest.importorskip("matplotlib")  # the picture
    assert seen["images"] and all(i["done"] and i["width"] > 500 and i["height"] > 300 for i in seen["images"])


def test_escaped_names_render_as_text_in_chromium(tmp_path):
    report = tmp_path / "evil.html"
    assert main(["report", str(_evil_snapshot(tmp_path)), "-o", str(report)]) == 0
    seen, console = _chromium(tmp_path, report)
    assert console == [] and seen["scripts"] == 0
    assert EVIL[0] in seen["tables"][0] and EVIL[1] in seen["tables"][0]
    assert all(i["width"] > 1 for i in seen["images"])  # no img from a block name (its src=x would not load)


def test_mutated_files_give_a_page_or_one_error(tmp_path, monkeypatch, paused_mr):
    """The fuzz harness's mutations of real seeds: the report is always written, with the
    verdict; layout, population and diff raise nothing but FormatError (or NotComparable)."""
    for name in ("matplotlib", "matplotlib.figure"):  # the picture is plot's test; keep this fast
        monkeypatch.setitem(sys.modules, name, None)
    seeds = make_seeds(paused_mr, tmp_path)
    prepared = [(seed, seed.read_bytes(), hot_offsets(seed)) for seed in seeds]
    rng = np.random.default_rng(16)
    for i in range(60):
        seed, data, hot = prepared[i % len(prepared)]
        case = tmp_path / "case.bin"
        case.write_bytes(mutate(data, rng, hot))
        with time_limit(20):
            page, report = render_report(case)
            assert ("valid</span>" in page) == report.ok
            try:
                with mappedram.open(case) as snap:
                    layout(snap)
                    for block in snap.blocks.values():
                        population(block)
                mappedram.diff(seed, case)
            except (FormatError, NotComparable):
                pass
