"""Debian roots made with debootstrap: this machine's architecture, or arm64 under qemu-user.

Used for the container images' local base (graviton_serve.image) and the emulated arm64 root of
the aarch64 tests (tests/tooling/aarch64_root). Needs root; Debian's ``debootstrap`` (and, for
arm64 on another machine, ``qemu-user-static``) are installed with apt-get when missing.

An arm64 root on x86: ``debootstrap --foreign`` (download, verify, unpack), then its second stage
inside the root under emulation, through a binfmt_misc entry registered only for that step (flag
F: qemu is opened at registration, so nothing is copied into the root). What ``aarch64_binfmt``
mounts and registers is removed afterwards, also on failure.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

from graviton_serve.progress import say

SUITE = "bookworm"  # Python 3.11, as the project requires
MIRROR = "http://deb.debian.org/debian"
QEMU = "qemu-aarch64-static"
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
QEMU_BINFMT_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")  # Debian's entry, shipped by qemu-user-static


class DebianError(RuntimeError):
    pass


def machine_arch() -> str:
    """Debian's (and OCI's) name for this machine's architecture: amd64, arm64."""
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def ensure_tools(arch: str) -> None:
    """debootstrap, and qemu-user-static for a foreign arm64 root; apt-get installs what is missing."""
    if os.geteuid() != 0:
        raise DebianError("making a Debian root needs root (debootstrap, chroot, binfmt_misc)")
    tools = {"debootstrap": "debootstrap"}
    if arch != machine_arch():
        tools[QEMU] = "qemu-user-static"
    missing = [package for tool, package in tools.items() if shutil.which(tool) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise DebianError(f"{', '.join(missing)} not found and no apt-get to install them")
    apt_install(missing)


def apt_install(packages: list[str]) -> None:
    """Debian's ``packages`` (root); the package lists are refreshed only when the install needs it."""
    say(f"installing {' '.join(packages)} (apt-get, ~30 s)")
    wait = ["-o", "DPkg::Lock::Timeout=600"]  # another set-up step may be installing at the same time
    install = ["apt-get", *wait, "install", "-y", "-qq", "--no-install-recommends", *packages]
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, env=environment, capture_output=True).returncode != 0:
        run(["apt-get", *wait, "update", "-qq"], "apt-get update")
        run(install, "apt-get install " + " ".join(packages))


def debootstrap(target: Path, arch: str, include: str, log: Path, what: str) -> None:
    """A minbase root of ``SUITE`` for ``arch`` with the packages ``include`` (comma-separated) at
    ``target`` (replaced). Raises DebianError naming the step and its log."""
    ensure_tools(arch)
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    command = ["debootstrap", "--variant=minbase", f"--arch={arch}", f"--include={include}"]
    if arch == machine_arch():
        say(f"{what}: debootstrap {SUITE} {arch} (~80 s)")
        run([*command, SUITE, str(target), MIRROR], "debootstrap", log)
        return
    say(f"{what}: debootstrap {SUITE} {arch}, first stage (download and unpack, ~30 s)")
    run([*command, "--foreign", SUITE, str(target), MIRROR], "debootstrap --foreign", log)
    say(f"{what}: second stage under emulation (configures ~110 packages; about 5 min)")
    with aarch64_binfmt(), unmount_below(target):
        run(["chroot", str(target), "/debootstrap/debootstrap", "--second-stage"], "debootstrap --second-stage", log)


@contextmanager
def aarch64_binfmt():
    """binfmt_misc mounted and qemu-aarch64 registered for the block; only what we added is undone."""
    mounted = registered = False
    try:
        if not (BINFMT_DIR / "register").exists():
            run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)], "mount binfmt_misc")
            mounted = True
        entry = BINFMT_DIR / "qemu-aarch64"
        if not entry.exists():
            if not QEMU_BINFMT_CONF.exists():
                raise DebianError(f"{QEMU_BINFMT_CONF} not found: it comes with Debian's qemu-user-static")
            (BINFMT_DIR / "register").write_text(QEMU_BINFMT_CONF.read_text().strip())
            registered = True
        yield
    except PermissionError as error:
        raise DebianError(f"cannot register qemu-aarch64 with binfmt_misc ({error}); a container needs --privileged") from None
    finally:
        if registered:
            (BINFMT_DIR / "qemu-aarch64").write_text("-1")
        if mounted:
            subprocess.run(["umount", str(BINFMT_DIR)])


@contextmanager
def unmount_below(folder: Path):
    """debootstrap mounts /proc and /sys inside the root; make sure nothing stays mounted there."""
    try:
        yield
    finally:
        prefix = str(folder.resolve()) + "/"
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for point in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", "-l", point])


def run(command: list[str], what: str, log: Path | None = None) -> None:
    """Runs ``command``; its output goes to ``log`` (appended) when given. DebianError on failure."""
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as log_file:
            result = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT)
        detail = f"log {log}"
    else:
        result = subprocess.run(command, capture_output=True, text=True)
        detail = (result.stderr or result.stdout).strip()[-500:]
    if result.returncode != 0:
        raise DebianError(f"{what} failed ({result.returncode}): {detail}")
