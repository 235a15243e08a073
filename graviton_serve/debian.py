"""Debian roots made with debootstrap: this machine's architecture, or arm64 under qemu-user.

Used for the container images' local base (graviton_serve.image) and the emulated arm64 root of
the aarch64 tests (tests/tooling/aarch64_root). Needs root; Debian's ``debootstrap`` is installed
with apt-get when missing.

qemu-user is version 10, from Debian's bookworm-backports (``qemu_aarch64``): bookworm's own 7.2
dies with SIGSEGV at ``import torch`` for PyPI's aarch64 torch 2.13 and 2.14 (the project's pin),
under every emulated CPU; 10.0 runs it, and knows Graviton3's core (``neoverse-v1``). It is
fetched once into the cache without touching the machine's apt sources.

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

from graviton_serve.paths import CACHE_DIR
from graviton_serve.progress import say

SUITE = "bookworm"  # Python 3.11, as the project requires
MIRROR = "http://deb.debian.org/debian"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
QEMU_PACKAGE = ("qemu-user", "bookworm-backports")  # 10.0.x; its qemu-aarch64 is a static binary
QEMU_DIR = CACHE_DIR / "qemu-user"
QEMU_BINARY = QEMU_DIR / "qemu-aarch64"  # present only once a fetch has completed
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
BINFMT_NAME = "graviton-serve-aarch64"  # our own entry: the newest matching entry wins, and ours is removed after
# An ELF64 little-endian executable or shared object for machine 183 (AArch64), as Debian's qemu
# entries match it (the mask ignores the ABI version and the ET_EXEC/ET_DYN bit).
ELF_AARCH64_MAGIC = r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
ELF_AARCH64_MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"


class DebianError(RuntimeError):
    pass


def machine_arch() -> str:
    """Debian's (and OCI's) name for this machine's architecture: amd64, arm64."""
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def ensure_tools(arch: str) -> None:
    """debootstrap (apt-get installs it when missing), and qemu-user for a foreign arm64 root."""
    if os.geteuid() != 0:
        raise DebianError("making a Debian root needs root (debootstrap, chroot, binfmt_misc)")
    if shutil.which("debootstrap") is None:
        if shutil.which("apt-get") is None:
            raise DebianError("debootstrap not found and no apt-get to install it")
        apt_install(["debootstrap"])
    if arch != machine_arch():
        qemu_aarch64()


def qemu_aarch64() -> Path:
    """The static ``qemu-aarch64`` of Debian's ``qemu-user`` from bookworm-backports (10.0.x),
    fetched once into ``QEMU_DIR`` (``fetch_from_deb``). Raises DebianError naming the step."""
    if QEMU_BINARY.exists():
        return QEMU_BINARY
    package, suite = QEMU_PACKAGE
    binary = fetch_from_deb(package, suite, "usr/bin/qemu-aarch64", QEMU_BINARY, "~63 MB")
    say(f"qemu-user: {qemu_version(binary)} at {binary}")
    return binary


def fetch_from_deb(package: str, suite: str, member: str, binary: Path, size: str) -> Path:
    """The file ``member`` of Debian's ``package`` from ``suite``, fetched once to ``binary``
    (beside it: VERSION). ``apt-get download`` runs with a private APT configuration (its own
    sources list, package lists and cache), so the machine's apt sources and state stay as they
    are and nothing is installed; the package is verified against Debian's archive key like any
    apt download. Raises DebianError naming the step."""
    folder = binary.parent
    if binary.exists():
        return binary
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise DebianError(f"{package} comes from Debian {suite}: apt-get and dpkg-deb are needed to fetch it")
    say(f"{package}: fetching it from Debian {suite} into {folder} (apt-get download, private sources; {size}, once)")
    work = folder.with_name(folder.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    for sub in ("lists/partial", "cache/archives/partial", "download", "unpacked"):
        (work / sub).mkdir(parents=True)
    signed = f"[signed-by={KEYRING}] " if KEYRING.exists() else ""
    (work / "sources.list").write_text(f"deb {signed}{MIRROR} {suite} main\n")
    (work / "status").write_text("")
    settings = {"Dir::Etc::SourceList": work / "sources.list", "Dir::Etc::SourceParts": work / "none",
                "Dir::State::Lists": work / "lists", "Dir::State::status": work / "status", "Dir::Cache": work / "cache"}
    if os.geteuid() == 0:
        settings["APT::Sandbox::User"] = "root"  # the private folders are root's; apt's _apt user cannot write them
    (work / "apt.conf").write_text("".join(f'{key} "{value}";\n' for key, value in settings.items()))
    environment = {**os.environ, "APT_CONFIG": str(work / "apt.conf")}
    run(["apt-get", "update", "-qq"], f"apt-get update ({suite} only)", env=environment)
    run(["apt-get", "download", "-qq", f"{package}/{suite}"], f"apt-get download {package}/{suite}",
        env=environment, cwd=work / "download")
    deb = next((work / "download").glob(f"{package}_*.deb"))
    run(["dpkg-deb", "-x", str(deb), str(work / "unpacked")], f"dpkg-deb -x {deb.name}")
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True).stdout.strip()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copy2(work / "unpacked" / member, binary.with_suffix(".partial"))
    (folder / "VERSION").write_text(f"{package} {version} from Debian {suite}\n")
    binary.with_suffix(".partial").rename(binary)  # last: its presence means the fetch is complete
    shutil.rmtree(work)
    return binary


def qemu_version(binary: Path) -> str:
    """The first line ``qemu-aarch64 --version`` prints, e.g. "qemu-aarch64 version 10.0.2 (Debian ...)"."""
    printed = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    return (printed.stdout.splitlines() or ["unknown"])[0].strip()


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
    """binfmt_misc mounted and our qemu-aarch64 (``qemu_aarch64``) registered for the block, under
    our own entry name: the kernel tries the newest entry first, so ours wins over a qemu the
    machine may have registered. Only what we added is undone."""
    qemu = qemu_aarch64()
    mounted = registered = False
    entry = BINFMT_DIR / BINFMT_NAME
    try:
        if not (BINFMT_DIR / "register").exists():
            run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)], "mount binfmt_misc")
            mounted = True
        if entry.exists():  # left by a run that was killed: replace it
            entry.write_text("-1")
        (BINFMT_DIR / "register").write_text(f":{BINFMT_NAME}:M::{ELF_AARCH64_MAGIC}:{ELF_AARCH64_MASK}:{qemu}:F")
        registered = True
        yield
    except PermissionError as error:
        raise DebianError(f"cannot register qemu-aarch64 with binfmt_misc ({error}); a container needs --privileged") from None
    finally:
        if registered and entry.exists():
            entry.write_text("-1")
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


def run(command: list[str], what: str, log: Path | None = None, **options) -> None:
    """Runs ``command`` (``options`` go to subprocess.run: env, cwd); its output goes to ``log``
    (appended) when given. DebianError on failure."""
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as log_file:
            result = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, **options)
        detail = f"log {log}"
    else:
        result = subprocess.run(command, capture_output=True, text=True, **options)
        detail = (result.stderr or result.stdout).strip()[-500:]
    if result.returncode != 0:
        raise DebianError(f"{what} failed ({result.returncode}): {detail}")
