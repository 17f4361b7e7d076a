"""convert: the libvirt header kept with the output's format, compressed outputs as libvirt
writes them, streaming in both directions (memory bounded, progress), and QEMU restoring
what convert made of a compressed libvirt image."""

from __future__ import annotations

import hashlib
import os
import shutil
import time

import pytest
from conftest import fixture_file, load_manifest
from test_compressed import (
    COOKIE,
    FORMATS,
    LEGACY,
    XML,
    libvirt_header,
    peak_rss_kib,
    sparse_guest_stream,
    write_image,
    write_sparse_image,
)

import mappedram
from mappedram.cli import main
from mappedram.formats import structs as S
from mappedram.mapper.convert import to_mapped_ram
from mappedram.mapper.forward import ForwardSnapshot

MAPPED = "pc64-a-paused-mr.bin"


def hashes_of(name: str) -> dict[str, str]:
    return {b["name"]: b["sha256"] for b in load_manifest(name)["blocks"] if "sha256" in b}


def header_and_data(path) -> tuple[dict, bytes]:
    raw = path.read_bytes()[: len(libvirt_header("raw"))]
    header = S.LibvirtHeaderLE.parse(raw)
    return header, raw[S.LIBVIRT_HEADER_SIZE :]


@pytest.fixture(scope="module")
def legacy_image(tmp_path_factory):
    return write_image(tmp_path_factory.mktemp("conv") / "legacy.raw.sav", "raw", fixture_file(LEGACY).read_bytes())


# -- the libvirt header ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, fmt, mode",
    [(["--to", "mapped-ram"], "sparse", "mapped-ram"), (["--to", "stream"], "raw", "stream")]
    + [(["--to", "stream", "--compress", f.values[0]], f.values[0], "stream") for f in FORMATS],
    ids=["sparse", "raw"] + [f.values[0] for f in FORMATS],
)
def test_libvirt_header_kept_with_the_output_format(legacy_image, tmp_path, args, fmt, mode):
    out = tmp_path / "out.sav"
    assert main(["convert", str(legacy_image), str(out), *args]) == 0
    header, data = header_and_data(out)
    before, before_data = header_and_data(legacy_image)
    assert header.format == fmt and header.magic == b"LibvirtQemudSave"
    for field in ("version", "data_len", "was_running", "cookie_offset", "unused"):
        assert header[field] == before[field], field
    assert data == before_data and data.startswith(XML + COOKIE)  # domain XML, cookie, padding
    with mappedram.open(out) as snap:
        assert snap.format == mode and snap.problems == []
        assert snap.stream_start == S.LIBVIRT_HEADER_SIZE + header.data_len  # as libvirt: not aligned
        if mode == "mapped-ram":
            assert all(b.pages_offset % (1 << 20) == 0 for b in snap if b.in_file)  # absolute, as QEMU
    report = mappedram.verify(out, hash_blocks=True)
    assert report.ok
    for name, digest in hashes_of(LEGACY).items():
        assert report.hashes[name] == digest


@pytest.mark.parametrize("fmt", FORMATS)
def test_compressed_image_converts_both_ways(tmp_path, fmt):
    image = write_image(tmp_path / f"in.{fmt}", fmt, fixture_file(LEGACY).read_bytes())
    sparse, raw = tmp_path / "sparse.sav", tmp_path / "raw.sav"
    assert main(["convert", str(image), str(sparse), "--to", "mapped-ram"]) == 0
    assert main(["convert", str(image), str(raw), "--to", "stream"]) == 0
    for out, fmt_out in ((sparse, "sparse"), (raw, "raw")):
        assert header_and_data(out)[0].format == fmt_out
        report = mappedram.verify(out, hash_blocks=True)
        assert report.ok and all(report.hashes[n] == d for n, d in hashes_of(LEGACY).items())
    assert os.stat(sparse).st_blocks * 512 < 80 << 20  # absent pages are holes (84 MiB of RAM)


def test_big_endian_header_stays_big_endian(tmp_path):
    header = S.LibvirtHeaderBE.build({"data_len": len(XML) + 4096, "format": "raw", "was_running": 1})
    image = tmp_path / "be.sav"
    image.write_bytes(header + XML + bytes(4096) + fixture_file(LEGACY).read_bytes())
    out = tmp_path / "out.sav"
    assert main(["convert", str(image), str(out), "--to", "mapped-ram"]) == 0
    parsed = S.LibvirtHeaderBE.parse(out.read_bytes()[: S.LIBVIRT_HEADER_SIZE])
    assert parsed.format == "sparse" and parsed.was_running == 1 and parsed.version == 2
    with mappedram.open(out) as snap:
        assert snap.libvirt.byteorder == "big" and snap.libvirt.format == "sparse"


def test_without_a_libvirt_header_the_output_has_none(tmp_path, capsys):
    src = fixture_file(MAPPED)
    out = tmp_path / "out.sav"
    assert main(["convert", str(src), str(out), "--to", "stream"]) == 0
    with mappedram.open(out) as snap:
        assert snap.libvirt is None and snap.stream_start == 0
    assert main(["convert", str(src), str(tmp_path / "z.sav"), "--to", "stream", "--compress", "zstd"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the input has no libvirt header to keep" in err
    assert not (tmp_path / "z.sav").exists()


def test_compress_goes_with_stream_only(legacy_image, tmp_path, capsys):
    out = tmp_path / "out.sav"
    assert main(["convert", str(legacy_image), str(out), "--to", "mapped-ram", "--compress", "gzip"]) == 2
    assert capsys.readouterr().err == (
        "mappedram: --compress goes with --to stream (libvirt compresses only classic streams)\n"
    )
    assert not out.exists()
    with pytest.raises(SystemExit) as exit_:
        main(["convert", str(legacy_image), str(out), "--to", "stream", "--compress", "rar"])
    assert exit_.value.code == 2 and "invalid choice: 'rar'" in capsys.readouterr().err


def test_round_trip_of_a_qemu_mapped_ram_file(tmp_path):
    stream, back = tmp_path / "stream.sav", tmp_path / "back.sav"
    assert main(["convert", str(fixture_file(MAPPED)), str(stream), "--to", "stream"]) == 0
    assert main(["convert", str(stream), str(back), "--to", "mapped-ram"]) == 0
    for path in (stream, back):
        report = mappedram.verify(path, hash_blocks=True)
        assert report.ok and all(report.hashes[n] == d for n, d in hashes_of(MAPPED).items())


def test_device_state_over_the_limit_is_one_line(tmp_path):
    image = write_image(tmp_path / "in.sav", "gzip", fixture_file(LEGACY).read_bytes())
    with ForwardSnapshot(image, device_state_limit=64) as snap:
        with pytest.raises(mappedram.FormatError, match="expected at most 64 bytes of device state"):
            to_mapped_ram(snap, tmp_path / "out.sav")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.sav"]  # no output, no .partial


# -- streaming: memory and progress ----------------------------------------------------------
def test_streaming_convert_memory_of_a_4_gib_guest(tmp_path):
    """Both directions from a random-access file, and from a zstd image: peak memory well
    below 100 MiB, and the same as for a 16th of the guest."""
    results = {}
    for size in (256 << 20, 4 << 30):
        stream = tmp_path / f"s{size}.sav"
        with open(stream, "wb") as f:
            for piece in sparse_guest_stream(size, 256 << 10):
                f.write(piece)
        image = write_sparse_image(tmp_path / f"z{size}.sav", size, 256 << 10)
        mapped, back, from_image = (tmp_path / f"{n}{size}.sav" for n in ("m", "b", "i"))
        runs = {
            "stream->mapped-ram": [str(stream), str(mapped), "--to", "mapped-ram"],
            "mapped-ram->stream": [str(mapped), str(back), "--to", "stream"],
            "zstd->mapped-ram": [str(image), str(from_image), "--to", "mapped-ram"],
        }
        for what, args in runs.items():
            rss, code = peak_rss_kib("convert", *args)
            assert code == 0
            results[what, size] = rss
        digests = [mappedram.verify(p, hash_blocks=True).hashes for p in (stream, mapped, back, from_image)]
        assert digests[0] and all(d == digests[0] for d in digests)
    for what in ("stream->mapped-ram", "mapped-ram->stream", "zstd->mapped-ram"):
        small, big = results[what, 256 << 20], results[what, 4 << 30]
        assert big < 100 << 10 and big < small + (24 << 10), (what, small, big)


def test_progress_moves_for_a_compressed_image(tmp_path):
    image = write_image(tmp_path / "in.sav", "xz", fixture_file(LEGACY).read_bytes())
    seen = []
    mappedram.convert(image, tmp_path / "out.sav", "mapped-ram", progress=lambda d, t: seen.append((d, t)))
    compressed = image.stat().st_size - len(libvirt_header("xz"))
    assert {t for _, t in seen} == {compressed} and seen[-1][0] == compressed
    assert len(seen) > 2 and [d for d, _ in seen] == sorted(d for d, _ in seen)


# -- QEMU restores what convert made of a compressed libvirt image ---------------------------
@pytest.mark.qemu
def test_qemu_restores_converted_compressed_images(tmp_path):
    from qemu_vm import Vm, boot_and_wait, build_guest, qemu_binary, restore, save

    if qemu_binary() is None or shutil.which("as") is None:
        if os.environ.get("CI"):
            raise RuntimeError("CI needs qemu-system-x86_64 >= 10 and GNU as: run .ci/install-qemu")
        pytest.skip("needs qemu-system-x86_64 >= 10.0 and GNU as (see .ci/install-qemu)")
    image = build_guest(tmp_path)
    plain = tmp_path / "plain.sav"
    with Vm(tmp_path, image, name="src") as vm:
        boot_and_wait(vm)
        vm.cmd("stop")
        save(vm, f"file:{plain}")
    compressed = write_image(tmp_path / "zstd.sav", "zstd", plain.read_bytes())
    start = len(libvirt_header("zstd"))
    for to, mapped_ram in (("mapped-ram", True), ("stream", False)):
        out = tmp_path / f"out-{to}.sav"
        assert main(["convert", str(compressed), str(out), "--to", to]) == 0
        with mappedram.open(out) as snap:
            assert snap.stream_start == start
        with Vm(tmp_path, image, incoming=True, name=f"dst-{to}") as dst:
            restore(dst, f"file:{out},offset={start:#x}", mapped_ram=mapped_ram)
            dst.cmd("cont")
            first = 0x100000
            before = dst.read_u32(first)
            deadline = time.monotonic() + 30
            while dst.read_u32(first) == before:
                assert time.monotonic() < deadline, "the guest's counter does not move"
                time.sleep(0.1)
    digest = hashlib.sha256(mappedram.restore(compressed)["pc.ram"]).hexdigest()
    assert digest == hashlib.sha256(mappedram.restore(plain)["pc.ram"]).hexdigest()
