"""An arm64 Debian root with Python 3.11 and the handlers' aarch64 dependencies, so that our
aarch64 code path (oneDNN + ACL, Graviton's CPU features) runs on this x86 machine under
qemu-user. Speeds there mean nothing; the path taken and the numbers produced do.

Made once and cached (``.cache/aarch64-root``), as root:
1. qemu-user 10 from Debian bookworm-backports (graviton_serve.debian.qemu_aarch64; fetched into
   the cache, the machine's apt sources untouched) and Debian's ``debootstrap``;
2. a Debian arm64 root with Python 3.11 (graviton_serve.debian: ``debootstrap --foreign``, then the
   second stage under emulation through a binfmt_misc entry registered for that step only);
3. the Python packages, resolved and installed for aarch64 by ``uv`` on the host: pip cannot
   evaluate another machine's markers, and pip under emulation took 4 minutes. The project's
   own pins (torch 2.14.1 and torchvision 0.29.1: PyPI's aarch64 torch, a CUDA 13 build with the
   nvidia-* wheels, 5.8 GB, as a user on Graviton gets it) and this venv's versions of the rest.
   ``import torch`` is then checked under emulation; there is no fallback to another torch.

Running: ``qemu-aarch64 -L <root> <root>/usr/bin/python3`` is one process with no chroot and no
mounts: every file outside the root (the checkout, /proc, /sys, /tmp) is the host's.

Test tooling, not shipped (tests/ stays out of the images). Built by scripts/aarch64-root, and by
scripts/test after the demo store; from the checkout's root:

    python -m tests.tooling.aarch64_root [--optional]   # --optional: without root, say so and exit 0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from graviton_serve import debian
from graviton_serve.paths import CACHE_DIR
from graviton_serve.progress import say

SITE_PACKAGES = "usr/local/lib/python3.11/dist-packages"  # on Debian's sys.path, outside dpkg's files
PINNED = ("torch", "torchvision")  # the project's own pins
# What the handlers import, pinned to this venv's versions so the two sides differ only in ISA.
SAME_AS_HOST = ("transformers", "tokenizers", "safetensors", "numpy", "pillow", "pyyaml", "torchserve")

# Emulated CPUs, as qemu 10 names their cores. Graviton3 is Neoverse V1: SVE at 256 bits, with
# bf16 (HWCAP2_BF16). Graviton2 is Neoverse N1: no SVE, no bf16.
GRAVITON3 = "neoverse-v1"
GRAVITON2 = "neoverse-n1"


class RootError(RuntimeError):
    """A step that cannot be done here, with what to do about it."""


class NeedsRoot(RootError):
    """Not running as root: nothing can be built (the one case the tests skip for)."""


@dataclass(frozen=True)
class Aarch64Python:
    """How to run the root's Python 3.11 under emulation as a given CPU."""

    root: Path
    torch: str
    qemu: Path

    def command(self, *args: str) -> list[str]:
        return [str(self.qemu), "-L", str(self.root), str(self.root / "usr/bin/python3"), *args]

    def environment(self, cpu: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        # Only what a worker would have; nothing of this venv (its PYTHONPATH, VIRTUAL_ENV) leaks in.
        keep = {key: os.environ[key] for key in ("PATH", "HOME", "LANG", "TMPDIR") if key in os.environ}
        return {**keep, "QEMU_CPU": cpu, **(extra or {})}


def root_dir(cache_dir: Path = CACHE_DIR) -> Path:
    return cache_dir / "aarch64-root"


def ready_python(cache_dir: Path = CACHE_DIR) -> Aarch64Python | None:
    """The root's Python if it was built and its packages match what is asked now, else None."""
    root = root_dir(cache_dir)
    stamp = _read_stamp(root)
    # Packages reinstalled when a pin or this venv's versions change; the import checked again
    # when qemu changes.
    qemu = debian.QEMU_BINARY
    if stamp is None or stamp.get("packages") != _package_recipe() or not qemu.exists() \
            or stamp.get("qemu") != debian.qemu_version(qemu):
        return None
    return Aarch64Python(root, stamp["torch"], qemu)


def ensure_root(cache_dir: Path = CACHE_DIR) -> Aarch64Python:
    """Build what is missing (Debian root, then packages) and return the root's Python."""
    ready = ready_python(cache_dir)
    if ready is not None:
        say(f"aarch64 root: ready at {ready.root} (torch {ready.torch}); nothing to do")
        return ready
    root = root_dir(cache_dir)
    _require_root_user()
    try:
        qemu = debian.qemu_aarch64()
    except debian.DebianError as error:
        raise RootError(str(error)) from None
    if not (root / "usr/bin/python3").exists():
        _build_debian_root(root)
    return _install_packages(root, qemu)


def _require_root_user() -> None:
    if os.geteuid() != 0:
        raise NeedsRoot("building the aarch64 root needs root (debootstrap, chroot, binfmt_misc); "
                        "run scripts/aarch64-root with sudo, then the tests as any user")


def _build_debian_root(root: Path) -> None:
    partial = root.with_name(root.name + ".partial")
    try:
        debian.debootstrap(partial, "arm64", "python3", partial.with_name("aarch64-root.log"), "aarch64 root")
    except debian.DebianError as error:
        raise RootError(str(error)) from None
    if root.exists():
        shutil.rmtree(root)
    partial.rename(root)
    say(f"aarch64 root: Debian {debian.SUITE} arm64 with Python 3.11 at {root}")


def _install_packages(root: Path, qemu: Path) -> Aarch64Python:
    """Install the recipe into the root's site-packages (unless the stamp says it is there), then
    check that ``import torch`` works under emulation. RootError says which step failed."""
    recipe, site = _package_recipe(), root / SITE_PACKAGES
    stamp = _read_stamp(root)
    if stamp is None or stamp.get("packages") != recipe:
        say(f"aarch64 root: installing {', '.join(recipe[:2])} and the handlers' packages for aarch64 "
            "(uv, on the host; ~3 GB of wheels the first time)")
        shutil.rmtree(site, ignore_errors=True)
        _stamp_path(root).unlink(missing_ok=True)
        installed = subprocess.run(_uv_install(site, recipe), capture_output=True, text=True,
                                   env={**os.environ, "UV_NATIVE_TLS": "1"})
        if installed.returncode != 0:
            raise RootError(f"the project's pins do not install for aarch64: {_last_line(installed.stderr)}")
    version = debian.qemu_version(qemu)
    torch_version = recipe[0].partition("==")[2]
    say(f"aarch64 root: checking `import torch` under emulation ({version}; ~60 s)")
    python = Aarch64Python(root, torch_version, qemu)
    imported = subprocess.run(python.command("-c", "import torch, torchvision, transformers; print(torch.__version__)"),
                              capture_output=True, text=True, env=python.environment(GRAVITON2), timeout=600)
    if imported.returncode != 0:
        raise RootError(f"`import torch` {torch_version} fails under {version} (exit {imported.returncode}: "
                        f"{_last_line(imported.stderr)})")
    _write_stamp(root, {"torch": imported.stdout.strip(), "packages": recipe, "qemu": version})
    say(f"aarch64 root: ready (torch {imported.stdout.strip()}, {recipe[1]}; {version})")
    return python


def _uv_install(site: Path, requirements: list[str]) -> list[str]:
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        raise RootError("uv not found: it comes with the test extra (pip install -e '.[test]')")
    return [uv, "pip", "install", "--target", str(site), "--python-platform", "aarch64-manylinux_2_28",
            "--python-version", "3.11", "--only-binary", ":all:", "--compile-bytecode", *requirements]


def _package_recipe() -> list[str]:
    """torch and torchvision at the project's pins, then the handlers' packages at this venv's versions."""
    return [f"{name}=={_project_pin(name)}" for name in PINNED] + \
        [f"{name}=={metadata.version(name)}" for name in SAME_AS_HOST]


def _project_pin(package: str) -> str:
    for requirement in metadata.requires("graviton-serve") or []:
        name, _, version = requirement.partition("==")
        if name.strip() == package:
            return version.split(";")[0].strip()
    raise RootError(f"graviton-serve does not pin {package}")


def _stamp_path(root: Path) -> Path:
    return root / "graviton-serve-root.json"


def _read_stamp(root: Path) -> dict | None:
    try:
        return json.loads(_stamp_path(root).read_text())
    except (OSError, ValueError):
        return None


def _write_stamp(root: Path, stamp: dict) -> None:
    _stamp_path(root).write_text(json.dumps(stamp))


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def build_aarch64_root(optional: bool) -> int:
    # Stopped (scripts/test stops it when the store build fails): unwind, so that what the build
    # mounted and registered is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        ensure_root()
    except NeedsRoot as error:
        if not optional:
            raise
        say(f"aarch64 root: not built: {error}; the aarch64 tests will be skipped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.tooling.aarch64_root",
                                     description="build the arm64 root the emulated aarch64 tests run in (cached; as root)")
    parser.add_argument("--optional", action="store_true", help="without root privileges, say so and exit 0 (the tests then skip)")
    args = parser.parse_args(argv)
    try:
        return build_aarch64_root(args.optional)
    except RootError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
