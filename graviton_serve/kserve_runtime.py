"""The image as KServe's TorchServe runtime (deploy/kserve/servingruntime.yaml): TorchServe in the
foreground as the container's main runs it, and, once every model is READY, KServe's ModelServer
(graviton_serve.kserve_wrapper, in the image's KServe venv) in front of it.

    python -m graviton_serve.kserve_runtime

Settings: the container's (graviton_serve.container: GS_CONFIG, GS_MODEL_STORE, GS_RUN_DIR,
GS_DRAIN_TIMEOUT_S, ...; the ServingRuntime points the first two at KServe's /mnt/models), KServe's
TS_SERVICE_ENVELOPE and PROTOCOL_VERSION (checked before anything starts: an error names the
variable, exit 2), and GS_KSERVE_PYTHON, the Python of the KServe venv (default /opt/kserve/bin/python).

On SIGTERM TorchServe drains as in the plain container (KServe's ModelServer keeps forwarding the
requests in flight meanwhile), then the ModelServer is stopped. Exit status: TorchServe's, or the
ModelServer's if it exits first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from graviton_serve import container
from graviton_serve.foreground import serve_foreground
from graviton_serve.kserve_wrapper import SettingsError as WrapperSettingsError
from graviton_serve.kserve_wrapper import protocol_from_environment, torchserve_addresses
from graviton_serve.progress import say
from graviton_serve.server import ServerError
from graviton_serve.torchserve_config import ConfigError
from handlers.cpu_features import CpuAsError

KSERVE_PYTHON = Path("/opt/kserve/bin/python")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    try:
        settings = container.ContainerSettings.from_environment()
        protocol = protocol_from_environment(dict(os.environ))
        torchserve_addresses(settings.config)  # the wrapper's checks of the config, before TorchServe starts
        python = Path(os.environ.get("GS_KSERVE_PYTHON") or KSERVE_PYTHON)
        if not python.is_file():
            raise container.SettingsError(f"GS_KSERVE_PYTHON={python}: no such file (the image's KServe venv)")
    except (container.SettingsError, WrapperSettingsError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    wrapper: list[subprocess.Popen] = []

    def start_wrapper() -> None:
        environment = {**os.environ, "CONFIG_PATH": str(settings.config), "PYTHONPATH": str(PACKAGE_ROOT)}
        wrapper.append(subprocess.Popen([str(python), "-m", "graviton_serve.kserve_wrapper"], env=environment))
        say(f"KServe ModelServer started (protocol {protocol}; REST :8080, gRPC :8081)")

    def wrapper_exited() -> int | None:
        return wrapper[0].poll() if wrapper else None

    try:
        status = serve_foreground(settings.server(), settings.drain_timeout_s, settings.ready_timeout_s,
                                  on_ready=start_wrapper, stop_when=wrapper_exited)
    except (ConfigError, ServerError, CpuAsError) as error:
        print(f"error: {error}", file=sys.stderr)
        status = 1
    if wrapper and wrapper[0].poll() is None:
        wrapper[0].send_signal(signal.SIGTERM)
        try:
            wrapper[0].wait(timeout=30)
        except subprocess.TimeoutExpired:
            wrapper[0].kill()
    if wrapper and wrapper[0].returncode not in (0, -signal.SIGTERM) and not status:
        status = wrapper[0].returncode if wrapper[0].returncode > 0 else 1
    say(f"KServe runtime exits with status {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
