"""An arm64 Debian root with Python 3.11 and the handlers' aarch64 dependencies, so that our
aarch64 code path (oneDNN + ACL, Graviton's CPU features) runs on this x86 machine under
qemu-user. Speeds there mean nothing; the path taken and the numbers produced do.

Made once and cached (``.cache/aarch64-root``), as root:
1. Debian's ``qemu-user-static`` and ``debootstrap`` (apt-get, when missing);
2. a Debian arm64 root with Python 3.11 (graviton_serve.debian: ``debootstrap --foreign``, then the
   second stage under emulation through a binfmt_misc entry registered for that step only);
3. the Python packages, resolved and installed for aarch64 by ``uv`` on the host: pip cannot
   evaluate another machine's markers (torch 2.10's CUDA wheels are marked x86_64), and pip under
   emulation took 4 minutes. Same versions as this venv, except torch and torchvision: the
   project's pin when its aarch64 wheel installs and imports under emulation, else the nearest
   release that does (see FAILS_UNDER_EMULATION).

Running: ``qemu-aarch64-static -L <root> <root>/usr/bin/python3`` is one process with no chroot
and no mounts: every file outside the root (the checkout, /proc, /sys, /tmp) is the host's.

Test tooling, not shipped (tests/ stays out of the images). Built by scripts/aarch64-root, and by
scripts/test beside the demo store; from the checkout's root:

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
from graviton_serve.debian import QEMU
from graviton_serve.paths import CACHE_DIR
from graviton_serve.progress import say

SITE_PACKAGES = "usr/local/lib/python3.11/dist-packages"  # on Debian's sys.path, outside dpkg's files
# torchvision releases built against each torch release.
TORCHVISION_FOR = {"2.14.1": "0.29.1", "2.13.0": "0.28.0", "2.10.0": "0.25.0"}
# Tried here (2026-11-29, qemu-user 7.2 from Debian bookworm): from 2.11 on, PyPI's aarch64 torch
# is a CUDA build (nvidia-*-cu13 wheels; 5.8 GB installed). 2.14.1 (the pin) and 2.13.0 install,
# but `import torch` dies with SIGSEGV under emulation, as Graviton2, Graviton3 or "max" alike.
# Whether they run on a real Graviton was not tried here. 2.10.0, the newest aarch64 CPU build
# (oneDNN + ACL), runs: it is the nearest release that does.
FAILS_UNDER_EMULATION = {
    "2.14.1": "PyPI's aarch64 wheel (a CUDA 13 build) installs, but `import torch` dies with SIGSEGV under qemu-user",
    "2.13.0": "PyPI's aarch64 wheel (a CUDA 13 build) installs, but `import torch` dies with SIGSEGV under qemu-user",
}
NEAREST_AARCH64_TORCH = "2.10.0"
# What the handlers import, pinned to this venv's versions so the two sides differ only in ISA.
SAME_AS_HOST = ("transformers", "tokenizers", "safetensors", "numpy", "pillow", "pyyaml", "torchserve")

# Emulated CPUs. Graviton3 (Neoverse V1): SVE at 256 bits with bf16. Plain "max" has 512-bit SVE,
# where oneDNN picks its own sve_512 kernels and ignores fast math. Graviton2: Neoverse N1, no bf16.
GRAVITON3 = "max,sve-default-vector-length=32"
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

    def command(self, *args: str) -> list[str]:
        return [QEMU, "-L", str(self.root), str(self.root / "usr/bin/python3"), *args]

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
    # Rebuilt when the project's pin moves (the new one is tried) or this venv's versions change.
    if stamp is None or stamp.get("pin") != _project_pin("torch") or stamp.get("packages") != _package_recipe(stamp.get("torch", "")):
        return None
    return Aarch64Python(root, stamp["torch"])


def ensure_root(cache_dir: Path = CACHE_DIR) -> Aarch64Python:
    """Build what is missing (Debian root, then packages) and return the root's Python."""
    ready = ready_python(cache_dir)
    if ready is not None:
        say(f"aarch64 root: ready at {ready.root} (torch {ready.torch}); nothing to do")
        return ready
    root = root_dir(cache_dir)
    _require_root_user()
    if not (root / "usr/bin/python3").exists():
        _build_debian_root(root)
    torch_version = _install_packages(root)
    return Aarch64Python(root, torch_version)


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


def _install_packages(root: Path) -> str:
    """Install into the root's site-packages: torch at the project's pin if it installs and
    imports under emulation, else the nearest release that does (said in the output)."""
    pin = _project_pin("torch")
    site = root / SITE_PACKAGES
    refused: list[str] = []
    for torch_version in dict.fromkeys((pin, NEAREST_AARCH64_TORCH)):
        if torch_version in FAILS_UNDER_EMULATION:
            refused.append(f"torch {torch_version}: {FAILS_UNDER_EMULATION[torch_version]} (measured; not tried again)")
            continue
        say(f"aarch64 root: installing torch {torch_version} and the handlers' packages for aarch64 (uv, on the host)")
        shutil.rmtree(site, ignore_errors=True)
        installed = subprocess.run(_uv_install(site, _package_recipe(torch_version)), capture_output=True, text=True,
                                   env={**os.environ, "UV_NATIVE_TLS": "1"})
        if installed.returncode != 0:
            refused.append(f"torch {torch_version} does not install for aarch64: {_last_line(installed.stderr)}")
            continue
        say("aarch64 root: checking that `import torch` works under emulation (~20 s)")
        python = Aarch64Python(root, torch_version)
        imported = subprocess.run(python.command("-c", "import torch, torchvision, transformers"), capture_output=True,
                                  text=True, env=python.environment(GRAVITON2), timeout=600)
        if imported.returncode != 0:
            refused.append(f"torch {torch_version}: `import torch` fails under emulation (exit {imported.returncode}: "
                           f"{_last_line(imported.stderr)})")
            continue
        for reason in refused:
            say(f"aarch64 root: not the project's pin: {reason}")
        _write_stamp(root, torch_version)
        say(f"aarch64 root: ready (torch {torch_version}, torchvision {TORCHVISION_FOR[torch_version]})")
        return torch_version
    raise RootError("no torch release works in the aarch64 root: " + "; ".join(refused))


def _uv_install(site: Path, requirements: list[str]) -> list[str]:
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        raise RootError("uv not found: it comes with the test extra (pip install -e '.[test]')")
    return [uv, "pip", "install", "--target", str(site), "--python-platform", "aarch64-manylinux_2_28",
            "--python-version", "3.11", "--only-binary", ":all:", "--compile-bytecode", *requirements]


def _package_recipe(torch_version: str) -> list[str]:
    if torch_version not in TORCHVISION_FOR:
        return []
    host = [f"{name}=={metadata.version(name)}" for name in SAME_AS_HOST]
    return [f"torch=={torch_version}", f"torchvision=={TORCHVISION_FOR[torch_version]}", *host]


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


def _write_stamp(root: Path, torch_version: str) -> None:
    stamp = {"pin": _project_pin("torch"), "torch": torch_version, "packages": _package_recipe(torch_version)}
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
