"""TorchServe's config.properties: the keys TorchServe 0.12 reads, reading and writing a file
(validated when read: an error names the key), and the properties one server runs with.

A server's properties are its config file, any overrides, and what belongs to that server alone:
its model store (the only place archives may be loaded from) and, when given, its ports and host.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path

# Keys TorchServe 0.12's ConfigManager reads; anything else in a config file is a typo.
KNOWN_KEYS = frozenset("""
inference_address management_address metrics_address grpc_inference_address grpc_inference_port
grpc_management_address grpc_management_port enable_grpc_ssl model_store workflow_store load_models
models default_workers_per_model default_response_timeout default_startup_timeout
unregister_model_timeout job_queue_size max_request_size max_response_size number_of_netty_threads
netty_client_threads number_of_gpu metrics_mode metrics_config enable_metrics_api
disable_system_metrics system_metrics_cmd metric_time_interval model_metrics_auto_detect
disable_token_authorization token_expiration_min enable_model_api allowed_urls use_env_allowed_urls
install_py_dep_per_model enable_envvars_config blacklist_env_vars vmargs async_logging
cors_allowed_origin cors_allowed_methods cors_allowed_headers keystore keystore_pass keystore_type
certificate_file private_key_file limit_max_image_pixels cpu_launcher_enable cpu_launcher_args
ipex_enable ipex_gpu_enable service_envelope decode_input_request prefer_direct_buffer
initial_worker_port initial_distribution_port plugins_path model_server_home use_native_io
io_ratio ts_header_key_sequence_id ts_header_key_sequence_start ts_header_key_sequence_end
ts_open_inference_protocol enable_grpc torchelastic_ts cpp_log_config model_snapshot
""".split())


class ConfigError(ValueError):
    pass


def check_key(key: str, where: str = "") -> None:
    """An unknown key is an error naming it (``where``: a location to put before the message)."""
    if key not in KNOWN_KEYS:
        raise ConfigError(f"{where}unknown key '{key}' (not a TorchServe 0.12 setting)")


def read_properties(path: Path) -> dict[str, str]:
    """A config.properties file as a dict; an unknown or repeated key is an error naming it."""
    properties: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"{path}:{number}: expected key=value, got '{line[:60]}'")
        check_key(key, f"{path}:{number}: ")
        if key in properties:
            raise ConfigError(f"{path}:{number}: key '{key}' is set twice")
        properties[key] = value.strip()
    return properties


def write_properties(path: Path, properties: dict[str, str]) -> None:
    path.write_text("".join(f"{key}={value}\n" for key, value in properties.items()))


@dataclass(frozen=True)
class Ports:
    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070
    grpc_management: int = 7071

    @classmethod
    def free(cls) -> "Ports":
        """Five currently free loopback ports (for tests and side-by-side servers)."""
        return cls(*free_loopback_ports(5))


def free_loopback_ports(count: int, exclude: set[int] = frozenset()) -> list[int]:
    """``count`` currently free loopback ports, none of them in ``exclude`` (ports chosen for
    listeners that are not bound yet)."""
    sockets = []
    try:
        while len(sockets) < count:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            if s.getsockname()[1] in exclude:
                s.close()
                continue
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def listen_address(properties: dict[str, str], key: str) -> tuple[str, int]:
    """(host, port) of a REST address such as ``http://0.0.0.0:8080``; an https address is an
    error naming the key (the HTTP front in front of TorchServe speaks plain HTTP: terminate TLS
    at a load balancer or ingress)."""
    match = re.fullmatch(r"http://(\[[0-9a-fA-F:.]+\]|[^:/\[\]]+):(\d+)/?", properties.get(key, "").strip())
    if not match:
        raise ConfigError(f"config key '{key}' must be a plain HTTP address with a port, e.g. http://127.0.0.1:8080 "
                          f"(got '{properties.get(key, '')[:80]}'; TLS belongs to a load balancer or ingress in front)")
    return match.group(1), int(match.group(2))


@dataclass(frozen=True)
class ServerConfig:
    """The properties one TorchServe runs with, its ports, and the host a client here reaches it at."""

    properties: dict[str, str]
    ports: Ports
    host: str
    rest_addresses: dict[str, tuple[str, int]]  # "inference"/"management"/"metrics" -> (host, port) as configured

    @classmethod
    def render(cls, config_file: Path, model_store: Path, ports: Ports | None = None, host: str | None = None,
               overrides: dict[str, str] | None = None) -> "ServerConfig":
        """``config_file`` (validated) with ``overrides`` (validated), the model store, and, when
        ``ports`` or ``host`` is given, every listener on them."""
        properties = read_properties(config_file)
        for key in sorted(overrides or {}):
            check_key(key)
        properties.update(overrides or {})
        properties["model_store"] = str(model_store)
        # Only archives inside this model store may be loaded.
        properties["allowed_urls"] = "file://" + re.escape(str(model_store)) + "/.*\\.mar"
        if ports or host:
            ports = ports or Ports()
            scheme_host = f"http://{host or '127.0.0.1'}"
            properties["inference_address"] = f"{scheme_host}:{ports.inference}"
            properties["management_address"] = f"{scheme_host}:{ports.management}"
            properties["metrics_address"] = f"{scheme_host}:{ports.metrics}"
            properties["grpc_inference_address"] = host or "127.0.0.1"
            properties["grpc_management_address"] = host or "127.0.0.1"
            properties["grpc_inference_port"] = str(ports.grpc_inference)
            properties["grpc_management_port"] = str(ports.grpc_management)
        rest = {api: listen_address(properties, f"{api}_address") for api in ("inference", "management", "metrics")}
        listening = Ports(
            rest["inference"][1], rest["management"][1], rest["metrics"][1],
            int(properties.get("grpc_inference_port", "7070")),
            int(properties.get("grpc_management_port", "7071")),
        )
        client_host = rest["inference"][0]
        if client_host in ("0.0.0.0", "[::]"):
            client_host = "127.0.0.1"
        return cls(properties, listening, client_host, rest)

    @property
    def token_auth(self) -> bool:
        return self.properties.get("disable_token_authorization", "false").strip().lower() != "true"
