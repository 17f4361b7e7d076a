"""A real QEMU for the tests: the project's boot-sector guest (x86) or a bare machine, driven over QMP."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

GUEST_SOURCE = Path(__file__).resolve().parent / "guest" / "boot.S"
RAM_MB = 64
MACHINE = "pc"


def qemu_binary(target: str = "x86_64") -> str | None:
    """qemu-system-TARGET if it is 10.0 or later (mapped-ram with the 10.0 stream layout)."""
    path = shutil.which(f"qemu-system-{target}")
    if path is None:
        return None
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"version (\d+)\.", out)
    return path if match and int(match.group(1)) >= 10 else None


def build_guest(workdir: Path, ram_mb: int = RAM_MB, source: Path = GUEST_SOURCE, long_mode: bool = False) -> Path:
    """Assemble a boot-sector guest (boot.S: 32-bit code; long_mode.S: 64-bit) with GNU as
    and pad it to 1 MiB (SeaBIOS on q35 refuses a tiny disk)."""
    obj, elf, img = (workdir / f"{source.stem}{suffix}" for suffix in (".o", ".elf", ".img"))
    end = (ram_mb - 1) << 20
    arch = ["--64"] if long_mode else ["--32", f"--defsym=RAM_END={end}"]
    subprocess.run(["as", *arch, "-o", obj, source], check=True)
    emulation = "elf_x86_64" if long_mode else "elf_i386"
    subprocess.run(["ld", "-m", emulation, "-Ttext=0x7c00", "-e", "_start", "-o", elf, obj], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", elf, img], check=True)
    data = img.read_bytes()
    assert len(data) == 512 and data[510:] == b"\x55\xaa", len(data)
    img.write_bytes(data + bytes((1 << 20) - 512))
    return img


class QMPError(RuntimeError):
    pass


class Vm:
    """One QEMU process with a QMP socket. Use as a context manager."""

    def __init__(
        self,
        workdir: Path,
        image: Path | None,
        *,
        incoming: bool = False,
        name: str = "vm",
        ram_mb: int = RAM_MB,
        machine: str = MACHINE,
        target: str = "x86_64",
        smp: int = 1,
        extra_args: Sequence[str] = (),
    ) -> None:
        """``image`` is the x86 boot disk (None: no disk, no VGA, for a bare machine);
        ``smp`` the number of vCPUs (the guest runs on the first, the firmware halts the
        others); ``extra_args`` go on the command line as they are (devices, memory
        backends, -S)."""
        binary = qemu_binary(target)
        assert binary is not None
        self.sock_path = workdir / f"{name}.qmp"
        self.log = (workdir / f"{name}.log").open("wb")
        args = [binary, "-machine", machine, "-accel", "tcg", "-m", str(ram_mb), "-smp", str(smp)]
        args += ["-display", "none", "-monitor", "none", "-serial", "none", "-parallel", "none"]
        args += ["-nodefaults", "-net", "none"]
        if image is not None:
            args += ["-vga", "std", "-drive", f"file={image},format=raw,if=ide,file.locking=off,snapshot=on"]
        args += [*extra_args, "-qmp", f"unix:{self.sock_path},server=on,wait=off"]
        if incoming:
            args += ["-incoming", "defer"]
        self.args = args
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        self.sock = self._connect()
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited: {self.proc.returncode}")
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(self.sock_path))
                s.settimeout(120)
                return s
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.file.readline()
            if not line:
                raise QMPError("QMP connection closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def cmd(self, name: str, **args: Any) -> Any:
        self.file.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise QMPError(f"{name}: {reply['error']}")
        return reply.get("return")

    def hmp(self, line: str) -> str:
        return self.cmd("human-monitor-command", **{"command-line": line})

    def read_u32(self, addr: int) -> int:
        out = self.hmp(f"xp /1wx {addr:#x}")
        return int(out.split(":")[1].split()[0], 16)

    def set_caps(self, **caps: bool) -> None:
        self.cmd(
            "migrate-set-capabilities",
            capabilities=[{"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()],
        )

    def wait_migration(self, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.cmd("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise QMPError(f"migration {status}: {info.get('error-desc')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"migration still {status}")
            time.sleep(0.05)

    def status(self) -> str:
        return self.cmd("query-status")["status"]

    def close(self) -> None:
        try:
            self.cmd("quit")
        except (QMPError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.sock.close()
        self.log.close()

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def boot_and_wait(vm: Vm, timeout: float = 60) -> None:
    """Until the guest has stamped its pages and its counters run."""
    last_page = ((RAM_MB - 1) << 20) - 0x1000
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if vm.read_u32(last_page + 4) == 0x4D415250 and vm.read_u32(0x100000) > 2:
            return
        time.sleep(0.1)
    raise TimeoutError("the guest did not start stamping its pages")


def save(vm: Vm, uri: str, *, live: bool = False, **caps: bool) -> dict[str, Any]:
    """migrate to ``uri`` with mapped-ram (and ``caps``); a paused save stops the VM first."""
    vm.set_caps(**caps)
    vm.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 30})
    if not live:
        vm.cmd("stop")
    vm.cmd("migrate", uri=uri)
    return vm.wait_migration()


def restore(vm: Vm, uri: str, **caps: bool) -> dict[str, Any]:
    vm.set_caps(**caps)
    vm.cmd("migrate-incoming", uri=uri)
    return vm.wait_migration()
