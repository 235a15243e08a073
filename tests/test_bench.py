"""scripts/bench's logic: the per-round ratios, and one small real run through TorchServe and wrk."""

from __future__ import annotations

import json

import pytest

from graviton_serve.bench.load import parse_stage_counters, stages_between
from graviton_serve.bench.report import compare, ratios, read_results, summary
from graviton_serve.bench.results import Limit, LoadRun, Workload
from graviton_serve.bench.run import benchmark
from tests.conftest import TESTS


def cell(path: str, throughput: float, round_number: int, concurrency: int = 8, p50: float = 100.0,
         errors: int = 0) -> LoadRun:
    return LoadRun("resnet50", path, "REST", concurrency, round_number, 100, 100 / throughput, p50, p50, p50, p50, errors,
                   0.2, 900, 0.1)


# timed after each round's cells: a round's cell is divided by its own round's limit
LIMITS = [Limit("resnet50", kind, 8, 2, "fp32", items_per_s, 1000.0, round_number)
          for round_number, forward, serving in ((1, 10.0, 8.0), (2, 10.0, 10.0), (3, 10.0, 9.0))
          for kind, items_per_s in (("forward (fp32)", forward), ("serving", serving))]


def test_ratios_are_per_round_then_median_with_min_max():
    cells = [cell("ours", 8.0, 1), cell("stock", 2.0, 1), cell("stock", 4.0, 2), cell("ours", 8.0, 2),
             cell("ours", 9.0, 3), cell("stock", 3.0, 3),
             cell("ours", 5.0, 1, concurrency=1, p50=90), cell("stock", 5.0, 1, concurrency=1, p50=100)]
    found = ratios(cells, LIMITS)["resnet50"]
    assert found["ours/stock"] == [4.0, 2.0, 3.0]  # round by round, not median over median
    assert found["ours/serving"] == [1.0, 0.8, 1.0]
    assert found["c1 p50 ours/stock"] == [0.9]
    row = summary(cells, LIMITS).splitlines()[-1]
    assert row.startswith("| resnet50 (c8) | 8.00 (8.00–9.00) | 3.00 (2.00–4.00) | 3.00× (2.00–4.00) | 0.80× (0.80–0.90) | "
                          "1.00× (0.80–1.00) | 90 | 100 | 0.90× |")


def test_a_cell_with_errors_takes_no_part_in_a_ratio():
    found = ratios([cell("ours", 8.0, 1), cell("stock", 50.0, 1, errors=3)], [])["resnet50"]
    assert found["ours/stock"] == [] and found["stock"] == []


def test_two_runs_compare_by_each_runs_median_and_flag_what_moved_beyond_15_percent():
    first = {"ratios": {"bert_sentiment": {"ours": [200.0, 240.0, 220.0], "stock": [6.0, 8.0, 7.0], "ray/ours": []}}}
    second = {"ratios": {"bert_sentiment": {"ours": [230.0, 231.0, 250.0], "stock": [9.0, 10.0, 6.0]}}}
    rows = [line.split(" | ") for line in compare(first, second).splitlines()[2:]]
    assert [row[1:] for row in rows] == [["ours", "220.00", "231.00", "+5.0%", "yes |"],
                                         ["stock", "7.00", "9.00", "+28.6%", "NO |"]]  # ray/ours: in one run only
    second["ratios"]["mnist"] = {"ours": [900.0]}  # a workload of one run only is named, not compared
    assert compare(first, second).endswith("\nOnly in the second run, not compared: mnist.")


def test_compare_says_when_the_runs_were_made_differently_and_names_a_file_that_is_no_results(tmp_path):
    cell = {"protocol": "REST", "round": 1, "seconds": 15.03}
    full = {"ratios": {}, "cells": [cell, {**cell, "round": 3}]}
    quick = {"ratios": {}, "cells": [{**cell, "seconds": 4.01}]}
    assert compare(full, quick).startswith("Note: the runs were made differently (first: 3 rounds of 15 s cells; "
                                           "second: 1 round of 4 s cells)")
    assert not compare(full, full).startswith("Note")
    limit = {"workload": "mnist", "kind": "serving", "batch": 8, "items_per_s": 1200.0, "batch_ms": 6.7}
    fastest_limits = {**full, "limits": [limit]}  # written before the limit became the median batch
    median_limits = {**full, "limits": [{**limit, "fastest_batch_ms": 4.6}]}
    assert compare(fastest_limits, median_limits).startswith(
        "Note: the runs were made differently (first: 3 rounds of 15 s cells, limits the fastest batch; "
        "second: 3 rounds of 15 s cells, limits the median batch)")
    (tmp_path / "notes.md").write_text("# not json")
    with pytest.raises(ValueError, match=f"{tmp_path / 'notes.md'}: not a bench results.json"):
        read_results(tmp_path / "notes.md")
    with pytest.raises(ValueError, match=f"{tmp_path / 'missing.json'}: cannot be read \\(No such file or directory\\)"):
        read_results(tmp_path / "missing.json")


def test_stage_counters_are_summed_per_stage_whatever_the_label_order():
    text = "\n".join([
        "# TYPE graviton_serve_stage_seconds_total counter",
        'graviton_serve_stage_seconds_total{Level="Model",Stage="decode",ModelName="m",Hostname="h",} 1.5',
        'graviton_serve_stage_seconds_total{Stage="decode",Level="Model",ModelName="m",Hostname="h2",} 0.5',
        'graviton_serve_stage_seconds_total{Level="Model",ModelName="m",Stage="forward",} 4.0',
        'graviton_serve_batches_total{Level="Model",ModelName="m",} 10.0',
        'graviton_serve_batch_items_total{Level="Model",ModelName="m",} 35.0',
        'ts_inference_requests_total{model_name="m",} 35.0'])
    before = parse_stage_counters(text)
    assert before == {"graviton_serve_stage_seconds_total:decode": 2.0, "graviton_serve_stage_seconds_total:forward": 4.0,
                      "graviton_serve_batches_total": 10.0, "graviton_serve_batch_items_total": 35.0}
    after = {**before, "graviton_serve_batches_total": 14.0, "graviton_serve_batch_items_total": 51.0,
             "graviton_serve_stage_seconds_total:forward": 4.4}
    stages = stages_between(before, after, workers=2, seconds=1.0)
    assert (stages.batches, stages.items_per_batch, stages.decode_ms, stages.encode_ms) == (4, 4.0, 0.0, 0.0)
    assert round(stages.forward_ms, 6) == 100.0 and round(stages.in_handler, 6) == 0.2  # 0.4 s of 2 workers' 2 s


@pytest.mark.integration
def test_a_small_run_through_a_real_torchserve_with_wrk(mnist_mar, tmp_path):
    digit = (TESTS / "data" / "digit.png").read_bytes()
    text = benchmark([Workload("mnist", mnist_mar, [digit, b"not an image"])], concurrencies=[2], grpc_concurrencies=[2],
                     grpc_requests=6, seconds=2, rounds=1, out=tmp_path, with_stock=False)
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| mnist | ours")]
    assert [row[2] for row in rows] == ["REST", "gRPC"]
    rest, grpc = rows
    # Every second body is not an image: wrk counts those 400s as errors, the gRPC client its error bodies.
    assert int(rest[5]) > 10 and abs(int(rest[12]) - int(rest[5]) / 2) <= 2
    assert grpc[12] == "3"
    assert 0 < float(rest[15].rstrip(" |")) < 1.5  # wrk's own CPU share, measured
    # the limits, timed after the round in the precision our server chose, on a batch of what it holds at once
    (serving,) = [line.split(" | ") for line in text.splitlines() if line.startswith("| mnist | serving | 1 | 8 | ")]
    assert "| mnist | forward (fp32) | 1 | 8 | " in text and serving[5] in ("fp32", "bf16", "fp16", "int8")
    # the limit is the median batch (as the cell is an average); the fastest is shown beside it
    assert float(serving[6]) >= float(serving[8]) > 0 and float(serving[7]) <= float(serving[9].rstrip(" |"))
    # where the time went: our per-stage counters over the REST cell, and the frontend's CPU
    (stages,) = [line.split(" | ") for line in text.splitlines() if line.startswith("| mnist | 2 | 1 | ")]
    assert 1 <= float(stages[5]) <= 4 and float(stages[7]) > 0 and float(stages[11].rstrip(" |")) > 0
    assert (tmp_path / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "results.md").read_text() == text
    assert json.loads((tmp_path / "results.json").read_text())["ratios"]["mnist"]["ours"] == []  # errors: no ratio
    # the same archive on Ray Serve (path ray), with the same errors counted, in a phase of its own
    # after ours (stock and the limits gone): an idle Ray node beside them moved the limits
    paths = [cell["path"] for cell in json.loads((tmp_path / "results.json").read_text())["cells"]]
    assert paths == ["ours", "ours", "ray"]
    (ray_rest,) = [line.split(" | ") for line in text.splitlines() if line.startswith("| mnist | ray | REST")]
    assert int(ray_rest[5]) > 10 and abs(int(ray_rest[12]) - int(ray_rest[5]) / 2) <= 2
