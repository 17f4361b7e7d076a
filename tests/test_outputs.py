"""The output file rules (mapper/output.py) through the CLI and the library: what may be
written, what is refused, the mode of new files and the names in the errors."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
from craft import PAGE, patch_header, pattern_block, write_snapshot

import mappedram
from mappedram.cli import main
from mappedram.mapper.encoder import StreamComposer
from mappedram.mapper.writer import SnapshotWriter

COMMANDS = {
    "extract": lambda src, out: ["extract", src, "--block", "pc.ram", "-o", out],
    "export-elf": lambda src, out: ["export-elf", src, "-o", out],
    "convert-stream": lambda src, out: ["convert", src, out, "--to", "stream"],
    "convert-mapped-ram": lambda src, out: ["convert", src, out, "--to", "mapped-ram", "--channels", "2"],
}


@pytest.fixture
def src(tmp_path):
    return write_snapshot(tmp_path / "in.sav", {"pc.ram": pattern_block(64, zero=(3, 4))})


def _run(kind, src, out, *extra):
    return main([*COMMANDS[kind](str(src), str(out)), *extra])


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _one_error_line(capsys, path, text):
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"mappedram: {path}: ") and text in err, err
    assert ".partial" not in err


def _others(directory, *keep):
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


def _check_output(kind, src, out):
    """The output holds what it should: the RAM of ``src``."""
    with mappedram.open(src) as snap:
        ram = snap.block("pc.ram").read()
    if kind == "extract":
        assert np.array_equal(np.fromfile(out, dtype=np.uint8), ram)
    elif kind == "export-elf":
        data = open(out, "rb").read()
        assert ram.tobytes() in data
    else:
        assert mappedram.verify(out).ok
        assert np.array_equal(mappedram.restore(out)["pc.ram"], ram)


# -- targets that are not regular files --------------------------------------------------
@pytest.mark.parametrize("kind", COMMANDS)
@pytest.mark.parametrize("device", [(1, 3), (1, 7)], ids=["null", "full"])
def test_device_target_refused_and_kept(src, tmp_path, capsys, kind, device):
    node = tmp_path / "dev"
    os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(*device))
    assert _run(kind, src, node, "--force") == 2
    _one_error_line(capsys, node, "not a regular file")
    st = os.lstat(node)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(*device)
    assert _others(tmp_path, "in.sav", "dev") == []


@pytest.mark.parametrize("path", ["/dev/null", "/dev/full"])
def test_real_dev_null_and_full_stay_devices(src, capsys, path):
    before = os.lstat(path)
    assert stat.S_ISCHR(before.st_mode)
    for kind in COMMANDS:
        assert _run(kind, src, path, "--force") == 2
        _one_error_line(capsys, path, "not a regular file")
        after = os.lstat(path)
        assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev and after.st_ino == before.st_ino
    assert not [n for n in os.listdir("/dev") if n.endswith(".partial")]


@pytest.mark.parametrize("kind", COMMANDS)
def test_fifo_target_refused_without_hanging(src, tmp_path, capsys, kind):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert _run(kind, src, fifo, "--force") == 2
    _one_error_line(capsys, fifo, "not a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert _others(tmp_path, "in.sav", "pipe") == []


@pytest.mark.parametrize("kind", COMMANDS)
def test_directory_target_refused_no_stray_file(src, tmp_path, capsys, kind):
    out = tmp_path / "outdir"
    out.mkdir()
    assert _run(kind, src, out) == 2
    _one_error_line(capsys, out, "is a directory")
    assert _others(tmp_path, "in.sav", "outdir") == [] and os.listdir(out) == []
    assert _run(kind, src, out, "--force") == 2  # --force does not replace a directory
    assert out.is_dir() and os.listdir(out) == []


def test_stdout_dash_refused(src, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for kind in COMMANDS:
        assert _run(kind, src, "-") == 2
        _one_error_line(capsys, "-", "standard output")
    assert _others(tmp_path, "in.sav") == []


# -- symbolic links: written through, never replaced --------------------------------------
@pytest.mark.parametrize("kind", COMMANDS)
def test_symlink_written_through(src, tmp_path, capsys, kind):
    real = tmp_path / "real.out"
    real.write_bytes(b"old")
    link = tmp_path / "link.out"
    link.symlink_to(real.name)
    assert _run(kind, src, link) == 2  # the file it points to exists: --force needed
    _one_error_line(capsys, link, "exists; give --force")
    assert real.read_bytes() == b"old"
    assert _run(kind, src, link, "--force") == 0
    assert link.is_symlink() and os.readlink(link) == real.name
    _check_output(kind, src, real)
    assert _others(tmp_path, "in.sav", "real.out", "link.out") == []


def test_dangling_symlink_refused(src, tmp_path, capsys):
    link = tmp_path / "link.out"
    link.symlink_to(tmp_path / "nowhere" / "x")
    for kind in COMMANDS:
        assert _run(kind, src, link, "--force") == 2
        _one_error_line(capsys, link, "symbolic link to nothing")
    assert link.is_symlink() and _others(tmp_path, "in.sav", "link.out") == []


# -- the input is never the output ----------------------------------------------------
@pytest.mark.parametrize("kind", COMMANDS)
@pytest.mark.parametrize("via", ["same", "hardlink", "symlink"])
@pytest.mark.parametrize("mode", [0o644, 0o444])
def test_output_onto_input_refused(src, tmp_path, capsys, kind, via, mode):
    os.chmod(src, mode)
    before = _sha(src)
    out = {"same": src, "hardlink": tmp_path / "hard.sav", "symlink": tmp_path / "sym.sav"}[via]
    if via == "hardlink":
        os.link(src, out)
    elif via == "symlink":
        out.symlink_to(src)
    assert _run(kind, src, out, "--force") == 2
    _one_error_line(capsys, out, "is the input file")
    assert _sha(src) == before and stat.S_IMODE(os.stat(src).st_mode) == mode
    assert mappedram.verify(src).ok


def test_library_refuses_input_as_output(src):
    before = _sha(src)
    with mappedram.open(src) as snap:
        with pytest.raises(OSError, match="is the input file"):
            mappedram.extract(snap, "pc.ram", src)
        with pytest.raises(OSError, match="is the input file"):
            mappedram.export_elf(mappedram.PhysicalView(snap), src)
    for to in ("stream", "mapped-ram"):
        with pytest.raises(OSError, match="is the input file"):
            mappedram.convert(src, src, to)
    assert _sha(src) == before


# -- existing files: --force -----------------------------------------------------------
@pytest.mark.parametrize("kind", COMMANDS)
def test_existing_file_needs_force(src, tmp_path, capsys, kind):
    out = tmp_path / "out"
    out.write_bytes(b"keep me")
    assert _run(kind, src, out) == 2
    _one_error_line(capsys, out, "exists; give --force to replace it")
    assert out.read_bytes() == b"keep me"
    assert _others(tmp_path, "in.sav", "out") == []
    assert _run(kind, src, out, "--force") == 0
    _check_output(kind, src, out)
    assert _others(tmp_path, "in.sav", "out") == []


def test_library_overwrite_keyword(src, tmp_path):
    out = tmp_path / "out"
    out.write_bytes(b"keep me")
    with mappedram.open(src) as snap:
        with pytest.raises(FileExistsError) as err:
            mappedram.extract(snap, "pc.ram", out, overwrite=False)
        assert err.value.filename == str(out)
        assert out.read_bytes() == b"keep me"
        mappedram.extract(snap, "pc.ram", out)  # the library default replaces
    _check_output("extract", src, out)
    # the writer: a live save replaces the previous one by default, refuses with overwrite=False
    data = pattern_block(8, seed=4)
    with pytest.raises(FileExistsError):
        SnapshotWriter(out, {"pc.ram": data}, overwrite=False)
    assert _others(tmp_path, "in.sav", "out") == []
    write_snapshot(out, {"pc.ram": data})
    assert np.array_equal(mappedram.restore(out)["pc.ram"], data)


def test_writer_refuses_device_target(tmp_path):
    node = tmp_path / "null"
    os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    with pytest.raises(OSError, match="not a regular file"):
        SnapshotWriter(node, {"pc.ram": pattern_block(4)})
    assert stat.S_ISCHR(os.lstat(node).st_mode) and os.listdir(tmp_path) == ["null"]


# -- names ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", COMMANDS)
def test_250_byte_name(src, tmp_path, kind):
    out = tmp_path / ("x" * 250)
    assert _run(kind, src, out) == 0
    _check_output(kind, src, out)
    assert _others(tmp_path, "in.sav", out.name) == []


def test_255_byte_name_with_multibyte_characters(src, tmp_path):
    out = tmp_path / ("é" * 127 + "x")  # 255 bytes: the temporary name is cut inside a character
    assert len(os.fsencode(out.name)) == 255
    assert _run("extract", src, out) == 0
    _check_output("extract", src, out)


def test_missing_directory_names_the_output(src, tmp_path, capsys):
    out = tmp_path / "no" / "such" / "out"
    assert _run("extract", src, out) == 2
    _one_error_line(capsys, out, "No such file or directory")


def test_full_disk_error_names_the_output(src, tmp_path):
    """A write that fails (here: EFBIG under a file size limit) names the output, not the input."""
    out = tmp_path / "out.raw"
    script = textwrap.dedent(
        """
        import resource, signal, sys
        from mappedram.cli import main
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (PAGE, PAGE))
        sys.exit(main(["extract", sys.argv[1], "--block", "pc.ram", "-o", sys.argv[2]]))
        """
    ).replace("PAGE", str(PAGE))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, "-c", script, str(src), str(out)], capture_output=True, text=True, env=env)
    assert run.returncode == 2
    assert run.stderr == f"mappedram: {out}: File too large\n"
    assert _others(tmp_path, "in.sav") == []


# -- permissions ----------------------------------------------------------------------------
@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("kind", COMMANDS)
@pytest.mark.parametrize(
    "source_mode, mask, expected",
    [(0o600, 0o022, 0o600), (0o644, 0o022, 0o644), (0o644, 0o077, 0o600), (0o640, 0o000, 0o640), (0o444, 0, 0o444)],
)
def test_output_never_more_readable_than_input(src, tmp_path, umask, kind, source_mode, mask, expected):
    os.chmod(src, source_mode)
    umask(mask)
    out = tmp_path / "out"
    assert _run(kind, src, out) == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == expected
    _check_output(kind, src, out)


def test_writer_output_is_private(tmp_path, umask):
    umask(0)
    path = write_snapshot(tmp_path / "vm.sav", {"pc.ram": pattern_block(4)})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_partial_file_is_private_while_written(src, tmp_path, umask):
    """The temporary file is never wider than the final one (0600 for a 0600 input)."""
    os.chmod(src, 0o600)
    umask(0)
    with mappedram.open(src) as snap:
        seen = []
        out = tmp_path / "out"

        def look(done, total):
            seen.extend(stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir() if p.name.endswith(".partial"))

        mappedram.extract(snap, "pc.ram", out, progress=look)
    assert seen and set(seen) == {0o600}


def test_errno_of_refusals(src, tmp_path):
    """The library raises OSError subclasses a caller can tell apart."""
    (tmp_path / "d").mkdir()
    with mappedram.open(src) as snap:
        with pytest.raises(IsADirectoryError):
            mappedram.extract(snap, "pc.ram", tmp_path / "d")
        with pytest.raises(OSError) as err:
            mappedram.extract(snap, "pc.ram", src)
        assert err.value.errno == errno.EINVAL


# -- convert: inputs it cannot carry over, and huge claims ---------------------------------------
def test_convert_refuses_mixed_page_sizes(tmp_path, capsys):
    path = write_snapshot(tmp_path / "in.sav", {"a": pattern_block(16), "b": pattern_block(16, seed=2)})
    info = patch_header(path, "b", page_size=8192)
    for to in ("stream", "mapped-ram"):
        assert main(["convert", str(path), str(tmp_path / "out"), "--to", to]) == 1
        err = capsys.readouterr().err
        assert err == (
            f"mappedram: {path}: offset {info['entry_offset']:#x} ({info['entry_offset']}): "
            "expected block 'b' to have the stream's page size 4096, found 8192\n"
        )
    assert _others(tmp_path, "in.sav") == []


def _claiming_stream(path, ram_bytes, page=5):
    """A classic stream whose one block claims ``ram_bytes`` and stores one page."""
    comp = StreamComposer(PAGE)
    head = comp.head()
    pieces, _, _ = comp.ram_start(len(head), [("pc.ram", ram_bytes)])
    data = head + b"".join(p for _, p in pieces) + comp.part_start()
    data += comp.page_record("pc.ram", page, bytes([7]) * PAGE) + comp.section_end() + comp.tail()
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("claim", [3 << 30, 1 << 40])
def test_convert_of_a_huge_claim_to_stream_streams(tmp_path, claim):
    src = _claiming_stream(tmp_path / "in.sav", claim)
    out = tmp_path / "out.sav"
    tracemalloc.start()
    try:
        assert main(["convert", str(src), str(out), "--to", "stream"]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20
    with mappedram.open(out) as snap:
        block = snap.block("pc.ram")
        assert block.used_length == claim and block.populated == 1
        assert bytes(block.page(5)) == bytes([7]) * PAGE and bytes(block.page(4)) == bytes(PAGE)
    assert mappedram.verify(out).ok


def test_convert_of_a_claim_beyond_memory_to_mapped_ram(tmp_path, capsys):
    src = _claiming_stream(tmp_path / "in.sav", 1 << 50)
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "mapped-ram"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mappedram: {src}: block 'pc.ram' claims {1 << 50} bytes of RAM, more than")
    assert err.endswith("; not converted\n") and err.count("\n") == 1
    assert _others(tmp_path, "in.sav") == []


def test_convert_of_a_3_gib_claim_to_mapped_ram(tmp_path):
    """Memory follows the pages stored, not the claim: the lazily zeroed buffer is never touched
    beyond them, and the output stores the one page."""
    src = _claiming_stream(tmp_path / "in.sav", 3 << 30)
    out = tmp_path / "out.sav"
    assert main(["convert", str(src), str(out), "--to", "mapped-ram"]) == 0
    with mappedram.open(out) as snap:
        block = snap.block("pc.ram")
        assert block.used_length == 3 << 30 and block.populated == 1
        assert bytes(block.page(5)) == bytes([7]) * PAGE
    assert os.stat(out).st_blocks * 512 < 64 << 20  # sparse: the bitmap and one page


def test_convert_to_mapped_ram_reports_progress_while_reading(tmp_path):
    blocks = {"a": pattern_block(100, zero=(5, 6)), "b": pattern_block(50, seed=2)}
    src = write_snapshot(tmp_path / "in.sav", blocks)
    seen = []
    mappedram.convert(src, tmp_path / "out.sav", "mapped-ram", progress=lambda done, total: seen.append((done, total)))
    total = (98 + 50) * PAGE  # the populated pages: the zero pages were not stored
    assert {t for _, t in seen} == {total}
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1][0] == total
    assert len(seen) > 2  # not only 0% and 100%: once per extent read


def test_writeback_starts_every_32_mib(tmp_path):
    """Big outputs have the disk start on what is written as they go (the fsync at the
    end then waits for the last piece): once per WRITEBACK_BYTES, through the real
    sync_file_range where the C library has it."""
    from mappedram.mapper.output import WRITEBACK_BYTES, Writeback, sync_file_range

    started: list[int] = []
    fd = os.open(tmp_path / "big", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        wb = Writeback(fd, start=started.append)
        for _ in range(3 * WRITEBACK_BYTES // (1 << 20) + 5):
            wb.wrote(1 << 20)
        assert started == [fd, fd, fd]
        real = sync_file_range()
        if sys.platform.startswith("linux"):
            assert real is not None
        if real is not None:
            os.pwrite(fd, bytes(WRITEBACK_BYTES), 0)
            assert real(fd) == 0  # the call is well formed: EINVAL/EBADF would come back here
            assert real(-1) == errno.EBADF
    finally:
        os.close(fd)
