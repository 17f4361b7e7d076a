"""The libvirt domain XML and cookie: dump --libvirt-xml and libvirt.domain_xml/cookie in --json."""

from __future__ import annotations

import json

import pytest
from conftest import fixture_file, load_manifest
from craft import pattern_block, write_snapshot

import mappedram
from mappedram.cli import main
from mappedram.formats import structs as S
from mappedram.mapper.prologue import XML_READ_LIMIT

LIBVIRT = "pc64-f-paused-mr-libvirt.bin"
PAD = 64 << 10  # libvirt's padding behind the XML and cookie


def libvirt_image(tmp_path, xml: bytes, cookie: bytes | None = None, pad: int = PAD, name: str = "lv.sav"):
    """A mapped-ram file behind a libvirt header laid out as libvirt 11 lays it out:
    XML, NUL, cookie, NUL, zeros; cookie_offset = XML length with its NUL."""
    data = xml + b"\0" + (cookie + b"\0" if cookie is not None else b"") + bytes(pad)
    cookie_offset = len(xml) + 1 if cookie is not None else 0
    header = S.LibvirtHeaderLE.build({"data_len": len(data), "format": "sparse", "cookie_offset": cookie_offset})
    return write_snapshot(tmp_path / name, {"pc.ram": pattern_block(2)}, prefix=header + data)


def dump(capsys, *args):
    code = main(["dump", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_real_file_xml_as_written(capsys):
    path = fixture_file(LIBVIRT)
    xml = load_manifest(LIBVIRT)["libvirt"]["xml"]  # what make.py put in front
    with mappedram.open(path) as snap:
        assert (snap.libvirt.domain_xml, snap.libvirt.cookie) == (xml, None)
    code, out, _ = dump(capsys, "--libvirt-xml", path)
    assert code == 0 and out == xml
    code, out, _ = dump(capsys, "--json", path)
    info = json.loads(out)["libvirt"]
    assert (info["domain_xml"], info["cookie"], info["data_len"]) == (xml, None, 65697)


def test_xml_and_cookie_split_at_cookie_offset(tmp_path, capsys):
    xml = b"<domain type='kvm'>\n  <name>vm</name>\n</domain>\n"
    cookie = b"<cookie>\n  <cpu mode='custom'/>\n</cookie>\n"
    path = libvirt_image(tmp_path, xml, cookie)
    code, out, _ = dump(capsys, "--json", path)
    info = json.loads(out)
    assert (info["libvirt"]["domain_xml"], info["libvirt"]["cookie"]) == (xml.decode(), cookie.decode())
    assert info["problems"] == []
    code, out, _ = dump(capsys, "--libvirt-xml", "--json", path)
    assert json.loads(out) == {"file": str(path), "domain_xml": xml.decode(), "cookie": cookie.decode()}


def test_hostile_xml_is_escaped_on_the_terminal(tmp_path, capsys):
    xml = "<name>\x1b]0;owned\x07</name>\r\n<x>\u2028forged</x>".encode()
    path = libvirt_image(tmp_path, xml)
    code, out, _ = dump(capsys, "--libvirt-xml", path)
    assert code == 0
    assert out.splitlines() == ["<name>\\x1b]0;owned\\x07</name>\\x0d", "<x>\\u2028forged</x>"]
    code, out, _ = dump(capsys, "--json", path)
    assert "\x1b" not in out and json.loads(out)["libvirt"]["domain_xml"] == xml.decode()


def test_an_xml_without_its_nul_is_read_up_to_the_limit(tmp_path, capsys):
    """data_len of 16 MiB + 1 KiB and no NUL: 16 MiB read, said once, the rest not."""
    data = b"A" * (XML_READ_LIMIT + 1024)
    header = S.LibvirtHeaderLE.build({"data_len": len(data), "format": "sparse"})
    path = write_snapshot(tmp_path / "long.sav", {"pc.ram": pattern_block(2)}, prefix=header + data)
    with mappedram.open(path) as snap:
        assert snap.libvirt.domain_xml == "A" * XML_READ_LIMIT
        (problem,) = snap.problems
        assert problem.offset == S.LIBVIRT_HEADER_SIZE and "within 16 MiB" in problem.text
    code, out, err = dump(capsys, "--libvirt-xml", path)
    assert code == 0 and out == "A" * XML_READ_LIMIT + "\n"
    assert err.splitlines() == [f"mappedram: warning: offset 0x5c: {problem.text}"]


def test_undecodable_bytes_are_replaced(tmp_path):
    path = libvirt_image(tmp_path, b"<a>\xff\xfe</a>")
    with mappedram.open(path) as snap:
        assert snap.libvirt.domain_xml == "<a>\ufffd\ufffd</a>"


def test_no_libvirt_header(capsys, paused_mr):
    code, out, err = dump(capsys, "--libvirt-xml", paused_mr)
    assert (code, out) == (2, "")
    assert err.splitlines() == [f"mappedram: {paused_mr}: no libvirt save header (LibvirtQemudSave), so no domain XML"]


def test_one_view_at_a_time(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["dump", "--libvirt-xml", "--state", str(fixture_file(LIBVIRT))])
    assert stop.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
