"""graviton_serve.image's stand-ins for what this machine lacks, without an engine: the pip
settings it mirrors into the build, the folders it mounts, and the reason it gives when podman
cannot be had."""

from __future__ import annotations

import os
import sys

from graviton_serve import image, pip_mirror


def test_the_machines_pip_index_settings_are_read_as_pip_reports_them(monkeypatch, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "https://mirror.example/simple")
    settings = pip_mirror.pip_settings(sys.executable)
    assert settings["find-links"] == str(wheels)
    assert settings["extra-index-url"] == "https://mirror.example/simple"
    assert set(settings) <= set(pip_mirror.MIRRORED_PIP_KEYS)


def test_local_indexes_are_mounted_and_remote_ones_are_not(tmp_path):
    index = tmp_path / "pypi" / "simple"  # a PEP 503 index whose files lie beside it
    index.mkdir(parents=True)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    settings = {"extra-index-url": f"file://{index} https://mirror.example/simple",
                "find-links": f"{wheels} {tmp_path / 'missing'} relative/dir"}
    assert pip_mirror.local_folders(settings) == sorted([tmp_path / "pypi", wheels])
    text = pip_mirror.pip_config_text(settings)
    assert text.startswith("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
    assert f"extra-index-url = file://{index} https://mirror.example/simple" in text


def test_why_podman_cannot_be_had_is_one_line_or_none(monkeypatch):
    monkeypatch.setattr(image.shutil, "which", lambda name: None)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "needs root" in image.unavailable_reason()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert "no apt-get" in image.unavailable_reason()
    monkeypatch.setattr(image.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert image.unavailable_reason() is None


def test_the_engine_always_gets_the_projects_containers_conf(tmp_path, monkeypatch):
    monkeypatch.setattr(image.shutil, "which", lambda name: f"/usr/bin/{name}")  # podman "installed"
    engine = image.Podman(tmp_path)
    engine.ensure()
    conf = (tmp_path / "containers.conf").read_text()
    assert 'default_ulimits = ["nofile=20000:20000"' in conf and 'runtime = "runc"' in conf
    assert engine.environment()["CONTAINERS_CONF"] == str(tmp_path / "containers.conf")
