"""The container's main: TorchServe in the foreground, drained on SIGTERM, TorchServe's status out.

    python -m graviton_serve.container            # what the image runs
    python -m graviton_serve.container --ready    # readiness probe: every model READY, not draining
    python -m graviton_serve.container --live     # liveness probe / HEALTHCHECK: /ping answers Healthy

(Probes are commands, not plain HTTP GETs: with token auth on, TorchServe 0.12 refuses even
/ping without the token, and the token is made at start, so only a process that reads the key
file can send it.)

Settings come from the environment and are validated before anything starts (an error names
the variable and exits 2):

    GS_MODEL_STORE        /home/model-server/model-store   the .mar files served
    GS_CONFIG             /home/model-server/config.properties
    GS_RUN_DIR            /home/model-server/run           key_file.json, logs, temp files
    TS_DISABLE_TOKEN_AUTH false                            true: no token (private networks only)
    GS_DRAIN_TIMEOUT_S    30                               how long SIGTERM waits for in-flight requests
    GS_READY_TIMEOUT_S    600                              how long start-up may take

(The two defaults are drain.DRAIN_TIMEOUT_S and server.READY_TIMEOUT_S; tests/test_container.py
checks that this table says the same.)

On SIGTERM (or SIGINT) the container marks itself draining (the readiness probe fails, so a
load balancer stops sending), waits until every queued and running request is answered (or the
drain timeout), then stops TorchServe and exits with its status. TorchServe alone would drop
in-flight requests: its frontend closes their connections on SIGTERM (see graviton_serve.drain and
graviton_serve.foreground).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from graviton_serve.drain import DRAIN_TIMEOUT_S, is_draining
from graviton_serve.foreground import serve_foreground
from graviton_serve.progress import say
from graviton_serve.run_folder import RunFolder
from graviton_serve.server import READY_TIMEOUT_S, ServerError, TorchServe
from graviton_serve.torchserve_config import ConfigError
from handlers.cpu_features import CpuAsError

HOME = Path("/home/model-server")


class SettingsError(ValueError):
    pass


def _flag(environ: dict[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("true", "1", "yes"):
        return True
    if raw in ("false", "0", "no"):
        return False
    raise SettingsError(f"{name}={environ[name]!r}: expected true or false")


def _seconds(environ: dict[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) == 0:
        raise SettingsError(f"{name}={environ[name]!r}: expected a whole number of seconds above 0")
    return int(raw)


@dataclass(frozen=True)
class ContainerSettings:
    model_store: Path
    config: Path
    run_dir: Path
    disable_token_auth: bool
    drain_timeout_s: int
    ready_timeout_s: int

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> "ContainerSettings":
        environ = dict(os.environ if environ is None else environ)
        settings = cls(
            model_store=Path(environ.get("GS_MODEL_STORE") or HOME / "model-store"),
            config=Path(environ.get("GS_CONFIG") or HOME / "config.properties"),
            run_dir=Path(environ.get("GS_RUN_DIR") or HOME / "run"),
            disable_token_auth=_flag(environ, "TS_DISABLE_TOKEN_AUTH", False),
            drain_timeout_s=_seconds(environ, "GS_DRAIN_TIMEOUT_S", DRAIN_TIMEOUT_S),
            ready_timeout_s=_seconds(environ, "GS_READY_TIMEOUT_S", READY_TIMEOUT_S),
        )
        if not settings.model_store.is_dir():
            raise SettingsError(f"GS_MODEL_STORE={settings.model_store}: no such folder (mount the model store there)")
        if not any(settings.model_store.glob("*.mar")):
            raise SettingsError(f"GS_MODEL_STORE={settings.model_store}: no .mar archive in it")
        if not settings.config.is_file():
            raise SettingsError(f"GS_CONFIG={settings.config}: no such file")
        try:
            settings.run_dir.mkdir(parents=True, exist_ok=True)
            writable = os.access(settings.run_dir, os.W_OK)
        except OSError:
            writable = False
        if not writable:
            raise SettingsError(f"GS_RUN_DIR={settings.run_dir}: cannot write there (the key file and logs go there); "
                                f"with a read-only root filesystem, mount a tmpfs on it (README, Containers)")
        return settings

    def server(self) -> TorchServe:
        overrides = {"disable_token_authorization": "true"} if self.disable_token_auth else {}
        return TorchServe(self.run_dir, self.model_store, self.config, overrides=overrides)


def run(settings: ContainerSettings) -> int:
    server = settings.server()
    say(f"token auth {'OFF (TS_DISABLE_TOKEN_AUTH)' if settings.disable_token_auth else f'on, keys in {server.run_folder.key_file}'}")
    return serve_foreground(server, settings.drain_timeout_s, settings.ready_timeout_s)


def ready(settings: ContainerSettings) -> int:
    """0 if every model has a READY worker and the container is not draining (readiness probe)."""
    if is_draining(RunFolder(settings.run_dir)):
        print("draining", file=sys.stderr)
        return 1
    server = settings.server()
    client = server.management()
    status = {name: client.status(name) for name in server.expected_models()}
    not_ready = {name: state for name, state in status.items() if state != "READY"}
    if not_ready:
        print(f"not ready: {not_ready}", file=sys.stderr)
        return 1
    return 0


def live(settings: ContainerSettings) -> int:
    """0 if TorchServe's /ping answers Healthy (liveness probe, Docker HEALTHCHECK)."""
    import requests

    server = settings.server()
    try:
        response = requests.get(server.url("inference", "ping"), headers=server.auth(), timeout=5)
        healthy = response.status_code == 200 and response.json().get("status") == "Healthy"
    except (OSError, ValueError, KeyError, requests.RequestException) as error:
        print(f"not live: {error}", file=sys.stderr)
        return 1
    if not healthy:
        print(f"not live: /ping answered {response.status_code} {response.text[:200]}", file=sys.stderr)
    return 0 if healthy else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        settings = ContainerSettings.from_environment()
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if argv == ["--ready"]:
        return ready(settings)
    if argv == ["--live"]:
        return live(settings)
    if argv:
        print("usage: python -m graviton_serve.container [--ready | --live]", file=sys.stderr)
        return 2
    try:
        return run(settings)
    except (ConfigError, ServerError, CpuAsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
