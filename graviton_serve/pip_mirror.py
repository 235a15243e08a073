"""This machine's pip index settings, handed to a container build that cannot reach PyPI's own
index: which keys, the local folders they name (mounted read-only into the build), and the
pip.conf the build reads (``graviton_serve.image``).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

# What of the machine's pip configuration the build gets: where packages come from, and how long a
# read may stall (the machine's proxy can; the default is 15 s).
MIRRORED_PIP_KEYS = ("index-url", "extra-index-url", "find-links", "default-timeout")


def pip_settings(python: str = sys.executable) -> dict[str, str]:
    """This machine's pip index settings (MIRRORED_PIP_KEYS), as pip reports them."""
    result = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True)
    files: dict[str, str] = {}
    environment: dict[str, str] = {}
    for line in result.stdout.splitlines():
        match = re.match(r"^([^.]*)\.([a-z-]+)='(.*)'$", line.strip())
        if match and match.group(2) in MIRRORED_PIP_KEYS:
            # PIP_* variables (":env:") override every configuration file, as in pip itself.
            (environment if match.group(1) == ":env:" else files)[match.group(2)] = match.group(3)
    return {**files, **environment}


def local_folders(settings: dict[str, str]) -> list[Path]:
    """The local folders those settings name, to mount into the build. A ``…/simple`` index's files
    lie beside it, so its parent is mounted."""
    folders: set[Path] = set()
    for value in settings.values():
        for item in value.split():
            path = Path(item[len("file://"):]) if item.startswith("file://") else Path(item)
            if item.startswith(("http://", "https://")) or not path.is_absolute() or not path.exists():
                continue
            folders.add(path.parent if path.name == "simple" else path)
    return sorted(folders)


def pip_config_text(settings: dict[str, str]) -> str:
    lines = ["[global]", "cert = /etc/ssl/certs/ca-certificates.crt"]
    lines += [f"{key} = {value}" for key, value in sorted(settings.items())]
    return "\n".join(lines) + "\n"
