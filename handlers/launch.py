"""Settings the launch path (scripts/serve, the container's main) puts in TorchServe's
environment, because they must be in place before a worker imports torch. No torch import here:
the launch path reads this too. The worker reports what it found (launch_env_report, in its tuning line)."""

from __future__ import annotations

import os

from handlers.cpu_features import CpuFeatures

# oneDNN's primitive cache: inputs of varying shape (text batches) reuse built primitives.
LAUNCH_ENV = {"LRU_CACHE_CAPACITY": "1024"}
# Transparent huge pages for torch's large allocations, as AWS's Graviton images set it. Only on
# aarch64: on the x86 machine we measured (AMD EPYC, 2 CPUs) it made ResNet50 slower, batch 1
# 138/123 ms -> 157/167 ms and batch 8 795/817 ms -> 824/864 ms (two runs each).
AARCH64_LAUNCH_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}
# oneDNN's default math mode for the whole process, read once when torch loads (set later, it has
# no effect). AWS's Graviton images set it to BF16. We do not: the worker turns fast math on per
# model through torch's own switches (handlers.precision_modes), which also reach what this variable
# cannot (on torch 2.14.1 aarch64, a 2-D nn.Linear runs in NVPL's BLAS, outside oneDNN). Where an
# operator sets it, the worker reports it and keeps oneDNN out of models that must stay fp32.
FAST_MATH_VAR = "DNNL_DEFAULT_FPMATH_MODE"
CORE_LOCK_DIR_VAR = "GS_CORE_LOCK_DIR"  # one folder per server: its workers' core claims
BUSY_DIR_VAR = "GS_BUSY_DIR"  # one folder per server: a file per worker while it handles a batch (for draining)
PRECISION_CACHE_DIR_VAR = "GS_PRECISION_CACHE_DIR"  # auto's kept outcomes (handlers.auto_precision); the operator's wins


def launch_settings(features: CpuFeatures | None = None) -> dict[str, str]:
    features = features or CpuFeatures.detect()
    if not features.is_arm:
        return dict(LAUNCH_ENV)
    return {**LAUNCH_ENV, **AARCH64_LAUNCH_ENV}


def launch_environment(environ: dict[str, str], core_lock_dir: str, busy_dir: str = "",
                       features: CpuFeatures | None = None, precision_cache_dir: str = "") -> dict[str, str]:
    """``environ`` plus our launch settings; a value the operator already set wins (the
    server's own folders for core claims and busy markers excepted)."""
    kept = {PRECISION_CACHE_DIR_VAR: precision_cache_dir} if precision_cache_dir else {}
    folders = {CORE_LOCK_DIR_VAR: core_lock_dir, **({BUSY_DIR_VAR: busy_dir} if busy_dir else {})}
    return {**launch_settings(features), **kept, **environ, **folders}


def launch_env_report(environ: dict[str, str] | None = None, features: CpuFeatures | None = None) -> str:
    """What a worker found of the launch settings, for its tuning line: "launch env K=V ... (not set: ...)"."""
    environ = os.environ if environ is None else environ
    expected = launch_settings(features)
    # Also what an operator may set beyond ours (THP on x86, oneDNN's default math): reported, not required.
    reported = dict.fromkeys((*expected, "THP_MEM_ALLOC_ENABLE", FAST_MATH_VAR))
    found = [f"{key}={environ[key]}" for key in reported if key in environ]
    missing = [key for key in expected if key not in environ]
    return "launch env " + (" ".join(found) or "none") + (f" (not set: {', '.join(missing)})" if missing else "")
