"""Run pytest as another x86-64 CPU (handlers.cpu_features.AS_CPU): the features the worker's
decisions read and the caps on torch's kernels, set before torch loads.

    python -m tests.tooling.as_cpu avx2 -m cpu_sensitive
"""

from __future__ import annotations

import os
import sys

from handlers.cpu_features import AS_CPU, ATEN_VAR, kernel_limits


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in AS_CPU:
        sys.exit(f"usage: python -m tests.tooling.as_cpu {{{','.join(AS_CPU)}}} [pytest arguments]")
    name, arguments = argv[0], argv[1:]
    limits = kernel_limits(name)
    print(f"[as {name}] {AS_CPU[name].description}: {' '.join(f'{k}={v}' for k, v in limits.items())}", flush=True)
    if ATEN_VAR in AS_CPU[name].kernel_limits and ATEN_VAR not in limits:
        print(f"[as {name}] {ATEN_VAR} left unset: this host lacks that capability's flags, and ATen would run "
              "them unchecked; ATen runs the host's best kernels", flush=True)
    os.execve(sys.executable, [sys.executable, "-m", "pytest", *arguments], {**os.environ, **limits})


if __name__ == "__main__":
    main(sys.argv[1:])
