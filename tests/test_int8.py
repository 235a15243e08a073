"""int8: dynamic quantization of nn.Linear as a precision, its two guards, and auto's timing."""

from __future__ import annotations

import json
import re

import pytest
import torch

from handlers import auto_precision, precision_modes
from handlers.cpu_features import AS_CPU, CpuFeatures
from handlers.precision import decide_precision, int8_held_out
from tests.conftest import TESTS
from tests.inprocess import load_model_dir, load_service, predict, request
from tests.test_tuning import CPU, EPYC, GRAVITON2, GRAVITON3, as_cpu

pytestmark = pytest.mark.cpu_sensitive

HELD_OUT_KEPT = {"int8": {"metric": "accuracy", "fp32": 0.712, "int8": 0.708, "examples": 1500, "engine": "x86"}}
HELD_OUT_LOST = {"int8": {"metric": "accuracy", "fp32": 0.712, "int8": 0.690, "examples": 1500, "engine": "x86"}}


@pytest.mark.parametrize("requested, features, engine, expected", [
    ("auto", EPYC, "x86", ("int8",)),  # no native bf16: int8 alone to be timed beside fp32
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


def test_the_engine_is_torchs_for_x86():
    assert precision_modes.int8_engine(is_arm=False) in ("x86", "fbgemm")  # torch's x86 builds ship both
    assert precision_modes.int8_engine(is_arm=False) in torch.backends.quantized.supported_engines


# Exactly 1.00 point lost: 100 * (0.7547 - 0.7447) is 1.0000000000000009 in floats, and must pass.
HELD_OUT_AT_THE_LIMIT = {"int8": {"metric": "accuracy", "fp32": 0.7547, "int8": 0.7447, "examples": 1500, "engine": "x86"}}
HELD_OUT_JUST_OVER = {"int8": {"metric": "accuracy", "fp32": 0.7547, "int8": 0.7446, "examples": 1500, "engine": "x86"}}


@pytest.mark.parametrize("metadata, verdict", [(HELD_OUT_KEPT, True), (HELD_OUT_LOST, False), ({}, None),
                                               (HELD_OUT_AT_THE_LIMIT, True), (HELD_OUT_JUST_OVER, False)])
def test_held_out_guard_reads_the_build_measurement(metadata, verdict):
    ok, words = int8_held_out(metadata)
    assert ok is verdict
    if verdict is not None:
        assert "held-out accuracy: int8 0.6" in words or "held-out accuracy: int8 0.7" in words
        assert "on 1500 examples" in words
    if metadata is HELD_OUT_LOST:
        assert "(-2.20 points), more than 1 lost" in words
    if metadata is HELD_OUT_JUST_OVER:
        assert "(-1.01 points), more than 1 lost" in words


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
    quantized = precision_modes.int8_model(service._entry_point.worker.model, precision_modes.int8_engine(False))
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


# auto's candidates depend on the CPU: each test below runs as each x86 CPU we name (the features
# injected, so the same assertions hold on any host; the kernels are the host's).
CPUS = pytest.mark.parametrize("cpu", sorted(AS_CPU))


@CPUS
def test_auto_needs_the_held_out_measurement_for_int8(tmp_path, caplog, monkeypatch, cpu):
    features = as_cpu(monkeypatch, cpu)
    caplog.set_level("INFO")
    worker = int8_probe(tmp_path, "int8_stable", "auto")._entry_point.worker
    chosen = tuning_lines(caplog)[-1]
    assert "int8 refused: no held-out int8 accuracy in the archive's metadata" in chosen
    assert worker.precision != "int8"
    if not features.bf16:  # nothing else to try: fp32 without timing
        assert worker.precision == "fp32" and chosen.endswith("int8 refused: no held-out int8 accuracy in the "
                                                              "archive's metadata; using fp32)")
    else:  # bf16 passed its guard (the probe is bf16-stable) and was timed against fp32
        assert "timed on 2 check inputs as served (one batch, int8 one by one): fp32 " in chosen and "bf16 " in chosen


@CPUS
def test_auto_times_what_passed_and_keeps_the_fastest(tmp_path, caplog, monkeypatch, cpu):
    features = as_cpu(monkeypatch, cpu)
    caplog.set_level("INFO")
    worker = int8_probe(tmp_path, "int8_stable", "auto", HELD_OUT_KEPT)._entry_point.worker
    first, chosen = tuning_lines(caplog)[-2:]
    offered = ("bf16", "int8") if features.bf16 else ("int8",)
    assert f"precision=auto of fp32, {', '.join(offered)} (auto: " in first
    timings = {p: float(ms) for p, ms in re.findall(r"(fp32|bf16|int8) ([\d.]+) ms", chosen.split("int8 one by one): ")[1])}
    assert set(timings) == {"fp32", *offered}
    best = min(timings, key=timings.get)
    expected = best if timings[best] < (1 - auto_precision.AUTO_MIN_GAIN) * timings["fp32"] else "fp32"
    # Medians are logged to 0.1 ms: a choice within that of the boundary may read either way.
    near = abs(timings[best] - (1 - auto_precision.AUTO_MIN_GAIN) * timings["fp32"]) <= 0.1
    assert worker.precision == expected or near
    assert chosen.startswith(f"probe: tuning: precision={worker.precision} (auto: fastest that passed its guards")
    assert "(timed at this start, cached in " in chosen


@pytest.mark.parametrize("costs, chosen", [
    ({"fp32": 1.0, "int8": 0.6}, "int8"),
    ({"fp32": 1.0, "int8": 0.97}, "fp32"),  # under AUTO_MIN_GAIN: timing noise, keep exact fp32
    ({"fp32": 1.0, "int8": 1.4, "bf16": 0.8}, "bf16"),
])
def test_fastest_keeps_the_quickest_by_a_clear_margin(monkeypatch, costs, chosen):
    now = [0.0]
    monkeypatch.setattr(auto_precision.time, "perf_counter", lambda: now[0])

    def run(precision):
        now[0] += costs[precision]

    best, medians = auto_precision.fastest(run, list(costs))
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


def test_an_int8_answer_does_not_depend_on_its_batchmates(tmp_path):
    service = int8_probe(tmp_path, "int8_scores", "int8", HELD_OUT_KEPT)
    assert service._entry_point.worker.precision == "int8"
    (alone,) = predict(service, [request(b"1")])
    beside_a_large_one = predict(service, [request(b"1"), request(b"1000")])
    assert alone.status == 200 and alone.json()["scores"][1] > 90  # 1 x 102, give or take int8's rounding
    assert beside_a_large_one[0].json() == alone.json()


def test_fast_forwards_are_timed_for_a_second_each_not_five_times(monkeypatch):
    now, runs = [0.0], []
    monkeypatch.setattr(auto_precision.time, "perf_counter", lambda: now[0])

    def run(precision):
        runs.append(precision)
        now[0] += {"fp32": 0.002, "bf16": 0.0016}[precision]

    best, medians = auto_precision.fastest(run, ["fp32", "bf16"])
    # interleaved rounds until the faster one too has run 1 s in all: 1 / 0.0016 = 625 rounds each
    assert runs.count("fp32") == runs.count("bf16") and 625 <= runs.count("bf16") <= 626
    assert best == "bf16" and medians == pytest.approx({"fp32": 0.002, "bf16": 0.0016})
