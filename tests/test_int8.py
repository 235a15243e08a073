"""int8: dynamic quantization of nn.Linear as a precision, its two guards, and auto's timing."""

from __future__ import annotations

import json
import re

import pytest
import torch

from handlers import acceleration
from handlers.tuning import decide_precision
from tests.conftest import TESTS
from tests.inprocess import load_model_dir, load_service, predict, request
from tests.test_tuning import CPU, EPYC, GRAVITON2, GRAVITON3

HELD_OUT_KEPT = {"int8": {"metric": "accuracy", "fp32": 0.712, "int8": 0.708, "examples": 1500, "engine": "x86"}}
HELD_OUT_LOST = {"int8": {"metric": "accuracy", "fp32": 0.712, "int8": 0.690, "examples": 1500, "engine": "x86"}}


@pytest.mark.parametrize("requested, features, engine, expected", [
    ("auto", EPYC, "x86", ("int8",)),  # this machine: no native bf16, int8 to be timed
    ("auto", EPYC, None, ()),  # a family without int8 (the CNNs)
    ("auto", GRAVITON3, "onednn", ("bf16", "int8")),
    ("auto", GRAVITON2, "onednn", ("int8",)),
    ("int8", EPYC, "x86", ("int8",)),
    ("fp32", EPYC, "x86", ()),
])
def test_int8_is_a_cpu_candidate_where_the_family_offers_it(requested, features, engine, expected):
    candidates, reason = decide_precision(requested, CPU, features, int8_engine=engine)
    assert candidates == expected
    assert ("int8" in expected) == (f"int8 (dynamic, {engine} engine)" in reason)


def test_int8_on_cuda_runs_fp32_and_says_why():
    assert decide_precision("int8", torch.device("cuda", 0), GRAVITON2, (7, 5), int8_engine=None) == (
        (), "int8 is dynamic quantization for the CPU; CUDA runs fp32")


def test_the_engine_is_torchs_for_this_cpu():
    assert acceleration.int8_engine(is_arm=False) in ("x86", "fbgemm")  # this machine
    assert acceleration.int8_engine(is_arm=False) in torch.backends.quantized.supported_engines


@pytest.mark.parametrize("metadata, verdict", [(HELD_OUT_KEPT, True), (HELD_OUT_LOST, False), ({}, None)])
def test_held_out_guard_reads_the_build_measurement(metadata, verdict):
    ok, words = acceleration.int8_held_out(metadata)
    assert ok is verdict
    if verdict is not None:
        assert "held-out accuracy: int8 0.6" in words or "held-out accuracy: int8 0.7" in words
        assert "fp32 0.7120 on 1500 examples" in words
    if verdict is False:
        assert "(-2.20 points), more than 1 lost" in words


def int8_probe(tmp_path, entry: str, precision: str, metadata: dict | None = None):
    load_model_dir(tmp_path, TESTS / "probe_handler.py", "probe", {"handler": {"precision": precision}})
    if metadata is not None:
        (tmp_path / "metadata.json").write_text(json.dumps(metadata))
    return load_service(tmp_path, f"probe_handler.py:{entry}", name="probe")


def tuning_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if "tuning:" in record.getMessage()]


def test_guard_refuses_int8_whose_answers_drift(tmp_path, caplog):
    caplog.set_level("INFO")
    service = int8_probe(tmp_path, "int8_drifts", "int8", HELD_OUT_KEPT)
    assert service._entry_point.worker.precision == "fp32"
    assert "accuracy guard failed: int8 top-1 agrees with fp32 on only 0.0% of 4" in tuning_lines(caplog)[-1]  # 2 as a batch, 2 alone
    (reply,) = predict(service, [request(b"1")])
    assert reply.json() == {"top": 1, "type": "Linear"}  # fp32's answer, from the fp32 layer
    # The same model through int8 would have answered row 0: the probe really drifts.
    quantized = acceleration.int8_model(service._entry_point.worker.model, acceleration.int8_engine(False))
    assert int(quantized(torch.ones(1, 4)).argmax()) == 0


def test_int8_that_keeps_its_answers_serves_from_quantized_layers(tmp_path, caplog):
    caplog.set_level("INFO")
    service = int8_probe(tmp_path, "int8_stable", "int8", HELD_OUT_KEPT)
    worker = service._entry_point.worker
    assert worker.precision == "int8"
    assert type(worker.model[0]).__module__ == "torch.ao.nn.quantized.dynamic.modules.linear"
    assert tuning_lines(caplog)[-1].startswith("probe: tuning: precision=int8 (accuracy guard passed: int8 top-1")
    (reply,) = predict(service, [request(b"1")])
    assert reply.status == 200 and reply.json()["top"] == 1


def test_held_out_loss_refuses_int8_even_when_asked_for(tmp_path, caplog):
    caplog.set_level("INFO")
    worker = int8_probe(tmp_path, "int8_stable", "int8", HELD_OUT_LOST)._entry_point.worker
    assert worker.precision == "fp32"
    assert "int8 refused: held-out accuracy" in tuning_lines(caplog)[-1]


def test_auto_needs_the_held_out_measurement_for_int8(tmp_path, caplog):
    caplog.set_level("INFO")
    worker = int8_probe(tmp_path, "int8_stable", "auto")._entry_point.worker
    assert worker.precision == "fp32"
    assert "int8 refused: no held-out int8 accuracy in the archive's metadata; using fp32" in tuning_lines(caplog)[-1]


def test_auto_times_what_passed_and_keeps_the_fastest(tmp_path, caplog, monkeypatch):
    caplog.set_level("INFO")
    worker = int8_probe(tmp_path, "int8_stable", "auto", HELD_OUT_KEPT)._entry_point.worker
    first, chosen = tuning_lines(caplog)[-2:]
    assert "precision=auto of fp32, int8 (auto: no native bf16" in first  # this machine
    timings = dict(re.findall(r"(fp32|int8) ([\d.]+) ms", chosen.split("as one batch: ")[1].split(";")[0]))
    assert set(timings) == {"fp32", "int8"}
    fp32, int8 = float(timings["fp32"]), float(timings["int8"])
    assert worker.precision == ("int8" if int8 < (1 - acceleration.AUTO_MIN_GAIN) * fp32 else "fp32")
    assert chosen.startswith(f"probe: tuning: precision={worker.precision} (auto: fastest that passed its guards, timed on 2")


@pytest.mark.parametrize("costs, chosen", [
    ({"fp32": 1.0, "int8": 0.6}, "int8"),
    ({"fp32": 1.0, "int8": 0.97}, "fp32"),  # under AUTO_MIN_GAIN: timing noise, keep exact fp32
    ({"fp32": 1.0, "int8": 1.4, "bf16": 0.8}, "bf16"),
])
def test_fastest_keeps_the_quickest_by_a_clear_margin(monkeypatch, costs, chosen):
    now = [0.0]
    monkeypatch.setattr(acceleration.time, "perf_counter", lambda: now[0])

    def run(precision):
        now[0] += costs[precision]

    best, medians = acceleration.fastest(run, list(costs))
    assert best == chosen and medians == pytest.approx(costs)


def test_int8_is_refused_at_load_by_a_family_that_does_not_offer_it(tmp_path):
    load_model_dir(tmp_path, TESTS / "probe_handler.py", "probe", {"handler": {"precision": "int8"}})
    with pytest.raises(ValueError, match=r"'handler\.precision' is invalid: int8 .* not by ProbeHandler"):
        load_service(tmp_path, "probe_handler.py:handle", name="probe")


def test_guard_runs_the_check_inputs_one_by_one_too(tmp_path, caplog):
    caplog.set_level("INFO")
    worker = int8_probe(tmp_path, "int8_first_shape_only", "int8", HELD_OUT_KEPT)._entry_point.worker
    assert worker.precision == "fp32"
    assert "accuracy guard failed: int8 top-1 agrees with fp32 on only 50.0% of 4" in tuning_lines(caplog)[-1]
