"""The VM description after EOF: hostile JSON becomes a problem, never an exception."""

from __future__ import annotations

import json
import os

import pytest
from craft import pattern_block, write_snapshot

import mappedram
from mappedram.cli import main
from mappedram.formats import structs as S
from mappedram.mapper.convert import to_stream
from mappedram.mapper.vmdesc import MAX_DEPTH, check_description


def replace_vmdesc(path, text: bytes) -> int:
    """Put ``text`` in place of the file's VM description; returns the JSON's offset."""
    with mappedram.open(path) as snap:
        at = snap.vmdesc_location[0]
    with open(path, "r+b") as f:
        f.truncate(at)
        f.seek(at)
        f.write(S.VmDescriptionHead.build({"length": len(text)}) + text)
    return at + S.VmDescriptionHead.sizeof()


@pytest.fixture(scope="module")
def devices(paused_mr):
    with mappedram.open(paused_mr) as snap:
        return mappedram.DeviceState.from_snapshot(snap)


@pytest.fixture
def with_devices(tmp_path, devices):
    """A small mapped-ram file with the fixture's 33 device sections and their description."""
    path = write_snapshot(tmp_path / "dev.sav", {"pc.ram": pattern_block(4)}, devices=devices, alignment=4096)
    with mappedram.open(path) as snap:
        desc = snap.vmdesc
        spans = [(d.idstr, d.offset, d.end) for d in snap.devices]
    return path, desc, spans


def vmdesc_problems(path):
    report = mappedram.verify(path)
    return [(p.offset, p.text) for p in report.problems]


def test_real_descriptions_pass_the_check(fixture_path):
    with mappedram.open(fixture_path) as snap:
        assert snap.vmdesc is not None and len(snap.vmdesc["devices"]) == len(snap.devices)
        check_description(snap.vmdesc, snap.size)  # raises on a misfit
    assert vmdesc_problems(fixture_path) == []


def test_100000_nested_brackets(with_devices):
    path, _, spans = with_devices
    json_at = replace_vmdesc(path, b"[" * 100_000)
    found = vmdesc_problems(path)
    assert found[0] == (
        json_at - 5,
        f"expected a VM description in JSON, found JSON nested more than {MAX_DEPTH} deep at {json_at + MAX_DEPTH:#x}",
    )
    with mappedram.open(path) as snap:  # the sections are delimited by their footers instead
        assert [(d.idstr, d.offset, d.end) for d in snap.devices] == spans
    assert main(["dump", str(path)]) == 0


def test_nesting_at_the_limit_is_accepted_and_brackets_in_strings_do_not_count(with_devices):
    path, desc, _ = with_devices
    deep = dict(desc, extra="[" * 500)  # a name full of brackets is no nesting
    nested: object = 0
    for _ in range(MAX_DEPTH - 1):  # the top-level object is one level
        nested = [nested]
    deep["nested"] = nested
    replace_vmdesc(path, json.dumps(deep).encode())
    assert vmdesc_problems(path) == []
    with mappedram.open(path) as snap:
        assert snap.vmdesc["extra"] == "[" * 500
    deep["nested"] = [nested]
    json_at = replace_vmdesc(path, json.dumps(deep).encode())
    (offset, text), *_ = vmdesc_problems(path)
    assert offset == json_at - 5 and f"nested more than {MAX_DEPTH} deep" in text


def test_escaped_quote_does_not_end_a_string(with_devices):
    path, desc, _ = with_devices
    text = json.dumps(dict(desc, extra='\\"' + "{" * 300)).encode()
    assert b'\\\\\\"' in text  # a backslash, then an escaped quote, inside the string
    replace_vmdesc(path, text)
    assert vmdesc_problems(path) == []


def test_classic_stream_page_size_guess_reads_a_deep_description(tmp_path):
    """Opening a classic stream without target-page-bits reads the JSON for its page size."""
    small = write_snapshot(tmp_path / "small.sav", {"pc.ram": pattern_block(4)})
    legacy = tmp_path / "legacy.sav"
    with mappedram.open(small) as snap:
        to_stream(snap, legacy)
    with mappedram.open(legacy) as snap:
        assert snap.target_page_bits is None and snap.format == "stream"
    json_at = replace_vmdesc(legacy, b"[" * 100_000)
    with mappedram.open(legacy) as snap:
        assert snap.page_size == 4096
        assert snap.problems[0].offset == json_at - 5
        assert "nested more than" in snap.problems[0].text


@pytest.mark.parametrize(
    "mutate, found",
    [
        (lambda d: d["devices"][0]["fields"][0].update(size="INF"), "Infinity, which is not JSON"),
        (lambda d: d["devices"][0]["fields"][0].update(size="NAN"), "NaN, which is not JSON"),
        (lambda d: d["devices"][0]["fields"][0].update(size=1e400), "Infinity, which is not JSON"),
        (lambda d: d["devices"][0]["fields"][0].update(size=-1), "the number -1 at devices[0].fields[0].size"),
        (lambda d: d["devices"][0]["fields"][0].update(size=True), "the boolean true at devices[0].fields[0].size"),
        (lambda d: d["devices"][0]["fields"][0].update(size=4.0), "the number 4.0 at devices[0].fields[0].size"),
        (lambda d: d["devices"][0]["fields"][0].update(size=10**30), "at devices[0].fields[0].size, where an integer"),
        (
            lambda d: d["devices"][0]["fields"][0].update(array_len="2"),
            'the string "2" at devices[0].fields[0].array_len',
        ),
        (
            lambda d: d["devices"][0].update(subsections=[{"vmsd_name": 5, "fields": []}]),
            "the number 5 at devices[0].subsections[0].vmsd_name, where a string belongs",
        ),
        (
            lambda d: d["devices"][0].update(subsections=[{"vmsd_name": "x" * 256, "fields": []}]),
            "a name longer than 255 bytes at devices[0].subsections[0].vmsd_name",
        ),
        (lambda d: d["devices"][1].update(name=None), "null at devices[1].name, where a string belongs"),
        (lambda d: d["devices"][1].pop("name"), "nothing at devices[1].name, where a string belongs"),
        (lambda d: d["devices"][2].update(fields={}), "an object at devices[2].fields, where a list belongs"),
        (lambda d: d["devices"].append(7), "the number 7 at devices[33], where an object belongs"),
        (lambda d: d.update(devices="all"), 'the string "all" at devices, where a list belongs'),
        (lambda d: d.update(page_size=0), "the number 0 at page_size, where an integer from 1"),
    ],
)
def test_misshapen_description_is_a_problem(with_devices, mutate, found):
    path, desc, spans = with_devices
    desc = json.loads(json.dumps(desc))
    mutate(desc)
    text = json.dumps(desc).replace('"INF"', "Infinity").replace('"NAN"', "NaN").encode()
    json_at = replace_vmdesc(path, text)
    problems = vmdesc_problems(path)
    assert problems[0][0] == json_at - 5
    assert problems[0][1].startswith("expected a VM description in JSON, found ") and found in problems[0][1]
    with mappedram.open(path) as snap:
        assert [(d.idstr, d.offset, d.end) for d in snap.devices] == spans
    assert main(["verify", str(path)]) == 1


def test_json_syntax_error_names_its_offset(with_devices):
    path, desc, _ = with_devices
    text = json.dumps(desc).encode()
    json_at = replace_vmdesc(path, text[:100] + b"\x01" + text[101:])
    (offset, message), *_ = vmdesc_problems(path)
    assert offset == json_at - 5
    assert message == f"expected a VM description in JSON, found Invalid control character at {json_at + 100:#x}"


def test_top_level_not_an_object(with_devices):
    path, _, _ = with_devices
    replace_vmdesc(path, b"[1, 2]")
    (_, message), *_ = vmdesc_problems(path)
    assert message == "expected a VM description in JSON, found a list where a JSON object belongs"
    assert os.path.getsize(path) > 0
