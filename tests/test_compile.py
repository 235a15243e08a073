"""torch.compile at worker init: used when it works, eager with one warning line whenever it
does not (each failure forced here), and a worker that always comes up and answers."""

from __future__ import annotations

import logging
import time

import pytest
import torch
import torch._dynamo

from tests.conftest import TESTS
from tests.inprocess import load_model_dir, load_service, predict, request

def compile_service(tmp_path, backend: str, **settings):
    load_model_dir(tmp_path, TESTS / "compile_probe.py", "probe", {"handler": {"compile": backend, **settings}})
    return load_service(tmp_path, "compile_probe.py:handle", name="probe")


def answers(service) -> list:
    replies = predict(service, [request(b"3"), request(b"oops"), request(b"-1")])
    assert [reply.status for reply in replies] == [200, 400, 200]
    return [replies[0].json(), replies[2].json()]


@pytest.fixture(scope="module")
def eager_answers(tmp_path_factory):
    return answers(compile_service(tmp_path_factory.mktemp("eager"), "off"))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "tuning" in r.getMessage()]


def test_a_working_backend_is_used(tmp_path, eager_answers, caplog):
    caplog.set_level(logging.INFO)
    service = compile_service(tmp_path, "aot_eager")
    worker = service._entry_point.worker
    assert worker.runner is not worker.model  # the compiled module
    assert answers(service) == eager_answers  # rounded to 5 places
    assert any("compile=aot_eager (warm-up" in r.getMessage() for r in caplog.records)
    assert warnings_of(caplog) == []


def test_a_backend_that_fails_to_compile_falls_back_to_eager(tmp_path, eager_answers, caplog):
    service = compile_service(tmp_path, "relu_compile_error_TESTING_ONLY")  # torch's own failing backend
    worker = service._entry_point.worker
    assert worker.runner is worker.model
    assert answers(service) == eager_answers
    (warning,) = warnings_of(caplog)
    assert "compile=relu_compile_error_TESTING_ONLY failed at init" in warning and "running eager" in warning


def test_no_cxx_compiler_falls_back_to_eager(tmp_path, eager_answers, caplog, monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    service = compile_service(tmp_path, "inductor")
    assert service._entry_point.worker.runner is service._entry_point.worker.model
    assert answers(service) == eager_answers
    (warning,) = warnings_of(caplog)
    assert "compile=inductor failed at init" in warning


def test_missing_triton_falls_back_to_eager(tmp_path, eager_answers, caplog):
    # A stand-in backend that fails as inductor does on aarch64 without triton (the seed's error).
    @torch._dynamo.register_backend(name="needs_triton_TESTING_ONLY")
    def needs_triton(graph_module, example_inputs):
        raise RuntimeError("Cannot find a working triton installation. Either the package is not installed or it is too old.")

    service = compile_service(tmp_path, "needs_triton_TESTING_ONLY")
    assert answers(service) == eager_answers
    (warning,) = warnings_of(caplog)
    assert "Cannot find a working triton installation" in warning


def test_compiling_past_its_time_limit_falls_back_to_eager(tmp_path, eager_answers, caplog):
    @torch._dynamo.register_backend(name="slow_TESTING_ONLY")
    def slow(graph_module, example_inputs):
        time.sleep(30)
        return graph_module.forward

    service = compile_service(tmp_path, "slow_TESTING_ONLY", compile_timeout_s=1)
    assert answers(service) == eager_answers
    (warning,) = warnings_of(caplog)
    assert "took longer than 1s" in warning


def test_a_failed_recompile_while_serving_falls_back_and_answers_the_batch(tmp_path, eager_answers, caplog):
    calls = []

    @torch._dynamo.register_backend(name="once_TESTING_ONLY")
    def once(graph_module, example_inputs):
        calls.append(len(example_inputs))
        if len(calls) > 1:
            raise RuntimeError("second compile fails")
        return graph_module.forward

    service = compile_service(tmp_path, "once_TESTING_ONLY")
    worker = service._entry_point.worker
    assert worker.runner is not worker.model
    # Batch size 2 then 3 on top of the warm-up's batch of 2 makes dynamo compile again.
    assert answers(service) == eager_answers
    replies = predict(service, [request(b"1"), request(b"2"), request(b"3"), request(b"4")])
    assert [reply.status for reply in replies] == [200] * 4
    assert worker.runner is worker.model
    assert any("recompiling failed" in message for message in warnings_of(caplog))


def test_unknown_backend_is_named_when_the_config_is_read():
    from handlers.settings import CORE_SETTINGS, read_settings

    with pytest.raises(ValueError, match=r"handler\.compile"):
        read_settings({"handler": {"compile": "turbo"}}, CORE_SETTINGS)
