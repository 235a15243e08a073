"""CUDA dispatch. The device choice runs everywhere; the tests marked ``gpu`` need a CUDA device
and are skipped without one (this project's CI machine has none; see the README for where they ran)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TESTS
from tests.inprocess import load_model_dir, load_service, predict, request

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def probe(tmp_path, gpu_id, precision="auto"):
    load_model_dir(tmp_path, TESTS / "probe_handler.py", "probe", {"handler": {"precision": precision}})
    return load_service(tmp_path, "probe_handler.py:handle", name="probe", gpu_id=gpu_id)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU fallback, which a CUDA machine does not take")
def test_a_gpu_id_without_cuda_runs_on_the_cpu(tmp_path):
    service = probe(tmp_path, gpu_id=0)
    assert service._entry_point.worker.device == torch.device("cpu")
    replies = predict(service, [request(b"2"), request(b"999"), request(b"3")])
    assert [r.status for r in replies] == [200, 507, 200]


@pytest.mark.gpu
@gpu
def test_the_model_runs_on_the_gpu_torchserve_assigns(tmp_path):
    service = probe(tmp_path, gpu_id=torch.cuda.device_count() - 1)
    worker = service._entry_point.worker
    assert worker.device == torch.device("cuda", torch.cuda.device_count() - 1)
    assert next(iter(worker.model.parameters()), torch.empty(0, device=worker.device)).device == worker.device
    (reply,) = predict(service, [request(b"4")])
    assert reply.json() == {"value": 8.0}  # the probe's default scale is 2


@pytest.mark.gpu
@gpu
def test_cuda_out_of_memory_is_507_for_that_item_and_the_worker_goes_on(tmp_path):
    service = probe(tmp_path, gpu_id=0)
    replies = predict(service, [request(b"1"), request(b"999"), request(b"2")])
    assert [r.status for r in replies] == [200, 507, 200]
    assert replies[1].json()["type"] == "OutOfMemory"
    (again,) = predict(service, [request(b"5")])
    assert again.status == 200


@pytest.mark.gpu
@gpu
def test_reduced_precision_follows_the_device(tmp_path):
    """auto offers the device's reduced precision and keeps it only if timing says it pays (on an
    H200 the probe's tiny batch did not: autocast's casts cost more than they save); asked for,
    it runs behind the guard."""
    expected = "bf16" if torch.cuda.get_device_capability(0) >= (8, 0) else "fp16"
    load_model_dir(tmp_path / "auto", TESTS / "probe_handler.py", "probe", {"handler": {"precision": "auto"}})
    auto = load_service(tmp_path / "auto", "probe_handler.py:stable", name="probe", gpu_id=0)._entry_point.worker
    assert auto.plan.candidates == (expected,)
    assert auto.precision in ("fp32", expected)
    assert auto.precision_why.startswith("auto: fastest that passed its guards") and f"{expected} " in auto.precision_why
    load_model_dir(tmp_path / "asked", TESTS / "probe_handler.py", "probe", {"handler": {"precision": expected}})
    asked = load_service(tmp_path / "asked", "probe_handler.py:stable", name="probe", gpu_id=0)._entry_point.worker
    assert asked.precision == expected  # the guard let it through
