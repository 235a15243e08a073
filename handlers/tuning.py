"""Worker-init tuning, run once per worker by the handler core.

For now: intra-op threads follow the CPUs this process may run on (its affinity, which
containers and taskset narrow), unless OMP_NUM_THREADS says otherwise. With one worker per
model this is what avoids TorchServe's default of N workers x N threads on N cores.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def configure_threads(model_name: str, device: torch.device) -> int:
    """Set torch's intra-op threads once; log the decision and its reason. Returns the count."""
    from_env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if from_env.isdigit() and int(from_env) > 0:
        threads, reason = int(from_env), "OMP_NUM_THREADS"
    else:
        threads, reason = usable_cpus(), "CPUs in this process's affinity"
    torch.set_num_threads(threads)
    log.info("%s: tuning: device=%s threads=%d (from %s)", model_name, device, threads, reason)
    return threads
