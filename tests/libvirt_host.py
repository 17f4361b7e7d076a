"""A real libvirt 11 for the tests: virtlogd and libvirtd started as root, one TCG domain
booting the project's guest (tests/guest/boot.S), driven with virsh.

Facts this relies on (QEMU.md, /work/notes/libvirt-facts.md): libvirtd needs virtlogd to
start a domain; QEMU runs as another user (libvirt-qemu), so every path it opens itself
(the boot disk, a pmemsave file) lies in a directory it can enter or write; a save image
and a restored one go through file descriptors libvirtd opens as root.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from xml.sax.saxutils import escape

from qemu_vm import RAM_MB, qemu_binary

URI = "qemu:///system"
SOCKET = Path("/run/libvirt/libvirt-sock")
# Each daemon's default pid file when run as root (libvirtd.conf, virtlogd.conf).
DAEMONS = {"virtlogd": Path("/run/virtlogd.pid"), "libvirtd": Path("/run/libvirtd.pid")}
DOMAIN_PREFIX = "mappedram-test-"
QEMU_LOGS = Path("/var/log/libvirt/qemu")
LIBVIRT_MIN = 11


def missing() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root: the tests start libvirtd and virtlogd themselves"
    for tool in ("virsh", "libvirtd", "virtlogd", "lzop", "as"):
        if shutil.which(tool) is None:
            return f"needs {tool} (see .ci/install-libvirt)"
    if qemu_binary() is None:
        return "needs qemu-system-x86_64 >= 10.0 (see .ci/install-qemu)"
    version = subprocess.run(["libvirtd", "--version"], capture_output=True, text=True).stdout
    match = re.search(r"(\d+)\.\d+", version)
    if not match or int(match.group(1)) < LIBVIRT_MIN:
        return f"needs libvirt >= {LIBVIRT_MIN} (sparse save images), found {version.strip() or 'none'}"
    return None


def _alive(pid: int) -> bool:
    """A process that runs (a zombie no longer does: PID 1 may never reap the daemons)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _running_pid(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid) else None


def virsh(*args: str, check: bool = True, timeout: float = 120) -> str:
    proc = subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"virsh {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


class Daemons:
    """virtlogd and libvirtd: the ones already running are used as they are; the ones
    started here are stopped by ``stop()``, by their pid."""

    def __init__(self, timeout: float = 60) -> None:
        self.started: dict[str, int] = {}
        try:
            for name, pidfile in DAEMONS.items():
                if _running_pid(pidfile) is None:
                    subprocess.run([name, "-d"], check=True, capture_output=True, timeout=timeout)
                    self.started[name] = self._wait_pidfile(name, pidfile, timeout)
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _wait_pidfile(name: str, pidfile: Path, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (pid := _running_pid(pidfile)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} -d wrote no pid to {pidfile}")
            time.sleep(0.05)
        return pid

    @staticmethod
    def _wait_ready(timeout: float) -> None:
        """Until libvirtd's socket accepts and its QEMU driver answers."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(SOCKET))
                virsh("uri")
                return
            except (OSError, RuntimeError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the daemons started here, libvirtd first; wait until each is gone."""
        for name in reversed(list(self.started)):
            pid = self.started.pop(name)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + timeout
            while _alive(pid):
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    break
                time.sleep(0.05)


def domain_xml(name: str, disk: Path, ram_mb: int = RAM_MB) -> str:
    """The minimal TCG domain of QEMU.md: machine pc, one IDE raw disk, no video, no balloon."""
    emulator = qemu_binary()
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{ram_mb}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <devices>
    <emulator>{escape(str(emulator))}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{escape(str(disk))}'/>
      <target dev='hda' bus='ide'/>
    </disk>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def remove_stale_domains() -> None:
    """Domains an earlier, killed test run left behind (its pid is in the name)."""
    for name in virsh("list", "--all", "--name").split():
        owner = name.removeprefix(DOMAIN_PREFIX)
        if name.startswith(DOMAIN_PREFIX) and owner.isdigit() and not _alive(int(owner)):
            virsh("destroy", name, check=False)
            virsh("undefine", name, check=False)
            (QEMU_LOGS / f"{name}.log").unlink(missing_ok=True)


class Domain:
    """One persistent domain, named after this process; ``remove()`` destroys and undefines it."""

    def __init__(self, workdir: Path, disk: Path) -> None:
        self.name = f"{DOMAIN_PREFIX}{os.getpid()}"
        xml = workdir / f"{self.name}.xml"
        xml.write_text(domain_xml(self.name, disk))
        virsh("define", str(xml))

    def start(self) -> None:
        virsh("start", self.name)

    def state(self) -> str:
        return virsh("domstate", self.name).strip()

    def hmp(self, line: str) -> str:
        return virsh("qemu-monitor-command", self.name, "--hmp", line)

    def read_u32(self, addr: int) -> int:
        """A guest-physical word, through QEMU's monitor."""
        return int(self.hmp(f"xp /1wx {addr:#x}").split(":")[1].split()[0], 16)

    def pmemsave(self, path: Path, size: int = RAM_MB << 20) -> None:
        """QEMU's own copy of guest-physical [0, size): ``path`` must be writable by QEMU's user."""
        self.hmp(f'pmemsave 0 {size:#x} "{path}"')

    def save(self, path: Path, image_format: str, *extra: str) -> None:
        virsh("save", self.name, str(path), "--image-format", image_format, *extra)

    def restore(self, path: Path, *, paused: bool = False) -> None:
        virsh("restore", str(path), *(["--paused"] if paused else []))

    def resume(self) -> None:
        virsh("resume", self.name)

    def destroy(self) -> None:
        virsh("destroy", self.name)

    def remove(self) -> None:
        """Destroyed, undefined, and its QEMU log (one file per name) deleted."""
        if self.state() != "shut off":
            virsh("destroy", self.name, check=False)
        virsh("undefine", self.name, check=False)
        (QEMU_LOGS / f"{self.name}.log").unlink(missing_ok=True)
