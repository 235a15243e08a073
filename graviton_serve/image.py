"""The container images, built with podman from docker/Dockerfile on a machine without an image registry.

    scripts/image                 # localhost/graviton-serve:cpu, for this machine's architecture
    scripts/image --variant gpu   # localhost/graviton-serve:gpu (PyPI's torch builds: CUDA 13)
    scripts/image --if-possible   # what scripts/test runs: one reason line and exit 0 where it cannot

Where a registry is reachable, ``docker build -f docker/Dockerfile .`` needs none of this (README,
"Containers"). Here three things stand in, each as a build argument, so the Dockerfile assumes
nothing about this machine:

1. The engine: podman (apt-get installs it when missing; root only), always run with the project's
   own ``containers.conf`` (``CONTAINERS_CONF``), never the machine's: this kind of VM caps open files
   at 20000 (podman's default ulimit asks for 1048576) and its cgroups defeat crun.
2. ``BASE_IMAGE``: ``python:3.11-slim-bookworm`` cannot be pulled, so a Debian bookworm minbase with
   Python 3.11 is made with debootstrap, the machine's extra CA certificates added (HTTPS leaves through
   a proxy with its own CA), and imported as ``localhost/graviton-serve-base:bookworm-<arch>``; once.
3. ``TORCH_INDEX_URL`` empty (PyTorch's CPU index is unreachable, so torch is PyPI's build, which on
   Linux is a CUDA build: the cpu and gpu tags come out the same here) and ``PIP_CONFIG_FILE``: this
   machine's pip index settings, its local package folders mounted read-only into the build only.

Errors: ``ImageError`` with the step and the log file's path; ``Unavailable`` where podman cannot
be had (not root, no apt-get).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from contextlib import nullcontext
import threading
import time
from pathlib import Path

from graviton_serve import debian
from graviton_serve.pip_mirror import local_folders, pip_config_text, pip_settings
from graviton_serve.debian import machine_arch
from graviton_serve.paths import CACHE_DIR, MODEL_STORE, ROOT
from graviton_serve.progress import say

DOCKERFILE = ROOT / "docker" / "Dockerfile"
IMAGE = "localhost/graviton-serve"
BASE_IMAGE = "localhost/graviton-serve-base"
BASE_PACKAGES = "python3,python3-pip,python3-venv,python-is-python3,ca-certificates"
ENGINE_PACKAGES = ["podman", "runc", "catatonit", "uidmap"]
IMAGES_DIR = CACHE_DIR / "images"
CONTAINERS_CONF_TEXT = """\
# Written by graviton_serve.image; podman reads it through CONTAINERS_CONF (never the machine's own).
[containers]
# This kind of VM caps open files at 20000; podman's default (1048576) fails in setrlimit.
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
# crun refuses this kind of VM's hybrid cgroups; no systemd here.
runtime = "runc"
cgroup_manager = "cgroupfs"
"""


class ImageError(RuntimeError):
    """A step failed: the message names it (and its log file, where it has one)."""


class Unavailable(ImageError):
    """podman cannot be had on this machine: the reason is the message."""


def image_tag(variant: str = "cpu") -> str:
    return f"{IMAGE}:{variant}"


class Podman:
    """podman with the project's containers.conf. Every call goes through ``run``."""

    def __init__(self, conf_dir: Path = IMAGES_DIR):
        self.conf = conf_dir / "containers.conf"

    def environment(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def command(self, *args: str) -> list[str]:
        return ["podman", *args]

    def shell_prefix(self) -> str:
        """What a user types to call the same engine by hand."""
        return f"CONTAINERS_CONF={shlex.quote(str(self.conf))} podman"

    def ensure(self) -> None:
        """Installs podman when missing (root + apt-get) and writes the project's containers.conf."""
        if shutil.which("podman") is None:
            reason = unavailable_reason()
            if reason:
                raise Unavailable(reason)
            try:
                debian.apt_install(ENGINE_PACKAGES)
            except debian.DebianError as error:
                raise ImageError(str(error)) from None
        self.conf.parent.mkdir(parents=True, exist_ok=True)
        if not self.conf.is_file() or self.conf.read_text() != CONTAINERS_CONF_TEXT:
            self.conf.write_text(CONTAINERS_CONF_TEXT)

    def run(self, *args: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(self.command(*args), env=self.environment(), capture_output=True, timeout=timeout)
        if check and result.returncode != 0:
            raise ImageError(f"podman {' '.join(args[:2])} failed ({result.returncode}): "
                             f"{_last_lines(result.stderr.decode(errors='replace'))}")
        return result

    def output(self, *args: str, timeout: float | None = 120) -> str:
        return self.run(*args, timeout=timeout).stdout.decode().strip()

    def image_exists(self, tag: str) -> bool:
        return self.run("image", "exists", tag, check=False).returncode == 0

    def image_id(self, tag: str) -> str | None:
        result = self.run("image", "inspect", "--format", "{{.Id}}", tag, check=False)
        return result.stdout.decode().strip() if result.returncode == 0 else None

    def tags(self, image_id: str) -> list[str]:
        result = self.run("image", "inspect", "--format", "{{join .RepoTags \" \"}}", image_id, check=False)
        return result.stdout.decode().split() if result.returncode == 0 else []

    def image_size(self, tag: str) -> int:
        return int(self.output("image", "inspect", "--format", "{{.Size}}", tag))


def unavailable_reason() -> str | None:
    """Why podman cannot be used or installed here, or None when it can."""
    if shutil.which("podman"):
        return None
    if os.geteuid() != 0:
        return "podman is not installed and installing it needs root (apt-get install podman runc catatonit uidmap)"
    if shutil.which("apt-get") is None:
        return "podman is not installed and this machine has no apt-get to install it with"
    return None


# --- the base image ------------------------------------------------------------------------------------


def ensure_base(engine: Podman, arch: str) -> str:
    """``localhost/graviton-serve-base:bookworm-<arch>``: made once with debootstrap, then reused
    (arm64 on another machine: under emulation, ~7 min)."""
    tag = f"{BASE_IMAGE}:{debian.SUITE}-{arch}"
    if engine.image_exists(tag):
        say(f"base image: {tag} (cached)")
        return tag
    root = IMAGES_DIR / f"base-{debian.SUITE}-{arch}.partial"
    log = IMAGES_DIR / f"base-{arch}.log"
    try:
        debian.debootstrap(root, arch, BASE_PACKAGES, log, f"base image {tag}")
    except debian.DebianError as error:
        raise ImageError(str(error)) from None
    # The machine's own CA certificates (a proxy's, here), so that pip and apt inside the build
    # trust what the machine trusts.
    extra = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
    for certificate in extra:
        shutil.copy2(certificate, root / "usr/local/share/ca-certificates" / certificate.name)
    if extra:
        with debian.aarch64_binfmt() if arch != machine_arch() else nullcontext():
            try:
                debian.run(["chroot", str(root), "update-ca-certificates"], "update-ca-certificates", log)
            except debian.DebianError as error:
                raise ImageError(str(error)) from None
    say(f"base image: importing as {tag}")
    with subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE) as tar:
        imported = subprocess.run(engine.command("import", "--arch", arch, "-", tag), stdin=tar.stdout,
                                  env=engine.environment(), capture_output=True)
    if imported.returncode != 0 or tar.returncode not in (0, None):
        raise ImageError(f"podman import failed: {_last_lines(imported.stderr.decode(errors='replace'))}")
    shutil.rmtree(root)
    return tag


# --- the build -------------------------------------------------------------------------------------------


def build(variant: str = "cpu", arch: str | None = None, base: str | None = None,
          torch_index: str = "", engine: Podman | None = None) -> str:
    """Builds docker/Dockerfile as ``localhost/graviton-serve:<variant>``; returns the tag.

    variant: "cpu" or "gpu" (gpu forces PyPI's torch, a CUDA 13 build). base: an image to build FROM
    (default: the local bookworm base, made once). torch_index: TORCH_INDEX_URL, "" for PyPI's builds.
    Progress: one line per Dockerfile step with its elapsed time; the full log under .cache/images/.
    Raises ImageError (step and log path) or Unavailable.
    """
    engine = engine or Podman()
    engine.ensure()
    arch = arch or machine_arch()
    if not any(MODEL_STORE.glob("*.mar")):
        raise ImageError(f"{MODEL_STORE} has no .mar: build the demo store first (python -m graviton_serve.cli build-store)")
    base = base or ensure_base(engine, arch)
    tag = image_tag(variant if arch == machine_arch() else f"{variant}-{arch}")
    previous = engine.image_id(tag)
    settings = pip_settings()
    log = IMAGES_DIR / f"build-{variant}-{arch}.log"
    with tempfile.TemporaryDirectory(prefix="gs-pip-") as pip_dir:
        Path(pip_dir, "pip.conf").write_text(pip_config_text(settings))
        mounts = [f"--volume={pip_dir}:/run/graviton-serve-pip:ro"]
        mounts += [f"--volume={folder}:{folder}:ro" for folder in local_folders(settings)]
        command = engine.command(
            "build", "--format", "docker", "--platform", f"linux/{arch}", "--file", str(DOCKERFILE),
            "--build-arg", f"BASE_IMAGE={base}",
            "--build-arg", f"TORCH_INDEX_URL={'' if variant == 'gpu' else torch_index}",
            "--build-arg", "PIP_CONFIG_FILE=/run/graviton-serve-pip/pip.conf",
            *mounts, "--tag", tag, str(ROOT))
        cold = "~7 min" if arch == machine_arch() else "an hour or more: every RUN step runs under qemu-user"
        say(f"image: building {tag} from {DOCKERFILE.relative_to(ROOT)} on {base} (cold: {cold}; log {log})")
        started = time.monotonic()
        with debian.aarch64_binfmt() if arch != machine_arch() else nullcontext():
            _run_build(command, engine.environment(), log)
    size = engine.image_size(tag)
    if previous and previous != engine.image_id(tag) and not engine.tags(previous):
        # The image this tag named before, now named by no tag: GBs nothing uses (unless a container does).
        engine.run("rmi", previous, check=False)
    say(f"image: {tag} built in {time.monotonic() - started:.0f} s, {size / 1e9:.2f} GB")
    return tag


def _run_build(command: list[str], env: dict[str, str], log: Path) -> None:
    """podman build: its STEP lines as they start, pip's milestones, and a line a minute while a
    long step (pip, a layer's commit) prints nothing."""
    log.parent.mkdir(parents=True, exist_ok=True)
    step = {"line": "", "started": time.monotonic(), "said": time.monotonic()}
    done = threading.Event()

    def tick() -> None:
        while not done.wait(15):
            if time.monotonic() - step["said"] >= 60:
                say(f"image:   still at {step['line'][:40]}… ({time.monotonic() - step['started']:.0f} s)")
                step["said"] = time.monotonic()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    with open(log, "w") as log_file, subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                                       stderr=subprocess.STDOUT, text=True) as build_process:
        for line in build_process.stdout:
            log_file.write(line)
            shown = line.startswith(("STEP ", "--> Using cache", "Installing collected", "Successfully installed"))
            if line.startswith("STEP "):
                step.update(line=line.strip(), started=time.monotonic())
            if shown:
                say(f"image: {'  (cached)' if line.startswith('-->') else line.strip()[:110]}")
                step["said"] = time.monotonic()
        code = build_process.wait()
    done.set()
    if code != 0:
        with open(log) as log_file:
            tail = "".join(log_file.readlines()[-15:])
        raise ImageError(f"podman build failed ({code}) at {step['line'][:60]!r} after "
                         f"{time.monotonic() - step['started']:.0f} s; log {log}:\n{tail}")


def _last_lines(text: str, count: int = 5) -> str:
    return " | ".join(line for line in text.strip().splitlines()[-count:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/image", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--arch", choices=["amd64", "arm64"], default=machine_arch(),
                        help="arm64 on an x86 machine: the base and every RUN step under qemu-user (slow)")
    parser.add_argument("--base", help="build FROM this image instead of the local bookworm base")
    parser.add_argument("--torch-index", default="",
                        help="TORCH_INDEX_URL for the cpu variant (default: none, PyPI's builds; PyTorch's CPU "
                             "index gives smaller CPU builds where it is reachable)")
    parser.add_argument("--if-possible", action="store_true",
                        help="where podman cannot be had, print why and exit 0 (scripts/test)")
    args = parser.parse_args(argv)
    try:
        tag = build(args.variant, arch=args.arch, base=args.base, torch_index=args.torch_index)
    except Unavailable as reason:
        print(f"{'skipped' if args.if_possible else 'error'}: container image not built: {reason}", file=sys.stderr)
        return 0 if args.if_possible else 1
    except ImageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"run it: {Podman().shell_prefix()} run --rm -p 127.0.0.1:8080:8080 {tag}  (README, Containers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
