"""Settings the launch path (scripts/serve, the container entrypoint) puts in TorchServe's
environment, because they must be in place before a worker imports torch. No torch import here:
the launch path reads this too. The worker reports what it found (handlers.tuning)."""

LAUNCH_ENV = {
    "LRU_CACHE_CAPACITY": "1024",  # oneDNN primitive cache: varying input shapes reuse primitives
    "THP_MEM_ALLOC_ENABLE": "1",  # transparent huge pages for large tensors (fewer TLB misses)
}
CORE_LOCK_DIR_VAR = "GS_CORE_LOCK_DIR"  # one folder per server: its workers' core claims


def launch_environment(environ: dict[str, str], core_lock_dir: str) -> dict[str, str]:
    """``environ`` plus our launch settings; a value the operator already set wins."""
    return {**LAUNCH_ENV, CORE_LOCK_DIR_VAR: core_lock_dir, **environ}
