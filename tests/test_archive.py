"""Archives are self-contained: they serve with only torch & co. installed, not this project."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import zipfile

import yaml

from graviton_serve.archive import handler_sources
from tests.conftest import TESTS

CHECK = r"""
import json, sys
from pathlib import Path
model_dir = sys.argv[1]
try:
    import graviton_serve
    sys.exit("graviton_serve is importable: the check is not isolated")
except ImportError:
    pass
import ts
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.model_loader import ModelLoaderFactory
metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
metrics.initialize_cache()
manifest = json.loads((Path(model_dir) / "MAR-INF" / "MANIFEST.json").read_text())
service = ModelLoaderFactory.get_model_loader().load(
    "mnist", model_dir, handler=manifest["model"]["handler"], gpu_id=None, batch_size=1,
    envelope=None, limit_max_image_pixels=True, metrics_cache=metrics)
service.set_cl_socket(None)
import handlers
assert Path(handlers.__file__).resolve().is_relative_to(Path(model_dir).resolve()), handlers.__file__
digit = (Path(sys.argv[2])).read_bytes()
reply = service.predict([{"requestId": b"1", "parameters": [{"name": "body", "value": digit, "contentType": ""}]}])
print("REPLY", reply[-200:])
"""


def test_archive_contents(mnist_mar):
    with zipfile.ZipFile(mnist_mar) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        config = yaml.safe_load(archive.read("model-config.yaml"))
        metadata = json.loads(archive.read("metadata.json"))
    assert {f"handlers/{p.name}" for p in handler_sources()} <= names
    assert {"mnist.py", "mnist.pt", "metadata.json", "model-config.yaml"} <= names
    assert manifest["model"]["handler"] == "mnist.py"
    # MNIST is a light model: two workers of half the batch (graviton_serve.families.TWO_WORKERS)
    assert (config["minWorkers"], config["maxWorkers"], config["batchSize"]) == (2, 2, 4)
    assert metadata["trained"] is True and metadata["held_out_accuracy"] >= 0.97


def test_archive_serves_without_this_project_installed(mnist_dir, tmp_path):
    # -S skips site-packages' .pth files, so neither the editable install of graviton_serve nor the
    # checkout is importable; the plain site-packages folder still provides torch and ts.
    site_packages = sysconfig.get_paths()["purelib"]
    result = subprocess.run(
        [sys.executable, "-S", "-c", CHECK, str(mnist_dir), str(TESTS / "data" / "digit.png")],
        env={"PYTHONPATH": f"{mnist_dir}:{site_packages}", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert '"7"' in result.stdout
