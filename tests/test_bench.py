"""scripts/bench's logic: the comparison table, and one small real run through TorchServe."""

from __future__ import annotations

import pytest

from graviton_serve.bench.report import summary
from graviton_serve.bench.results import LoadRun, RawForward, Workload
from graviton_serve.bench.run import benchmark
from tests.conftest import TESTS


def cell(path: str, throughput: float, errors: int = 0, concurrency: int = 8) -> LoadRun:
    return LoadRun("resnet50", path, "REST", concurrency, 10, 10 / throughput, [100.0] * 10, errors, 0.2, 900)


def test_summary_gives_ratios_at_the_highest_concurrency():
    cells = [cell("ours", 2.0, concurrency=1), cell("ours", 8.0), cell("stock", 1.0), cell("stock", 6.0, concurrency=1)]
    limits = {"resnet50": RawForward("resnet50", 8, 2, "fp32", 10.0, 800.0)}
    row = summary(cells, limits).splitlines()[-1]
    assert row.startswith("| resnet50 (c8) | 8.00 | 1.00 | 10.00 | 8.00× | 0.80× |")


def test_a_run_with_errors_is_not_compared():
    row = summary([cell("ours", 8.0), cell("stock", 50.0, errors=10)], {}).splitlines()[-1]
    assert "| 8.00 | — | — | — | — |" in row


@pytest.mark.integration
def test_a_small_run_through_a_real_torchserve(mnist_mar, tmp_path, capsys):
    digit = (TESTS / "data" / "digit.png").read_bytes()
    text = benchmark([Workload("mnist", mnist_mar, [digit, b"not an image"])], rest_concurrencies=[2],
                     grpc_concurrencies=[2], count=6, out=tmp_path, with_stock=False)
    rows = [line for line in text.splitlines() if line.startswith("| mnist | ours")]
    assert [row.split(" | ")[2] for row in rows] == ["REST", "gRPC"]
    # Every second body is not an image: those requests count as errors, over REST and gRPC alike.
    assert all(row.split(" | ")[10] == "50.0" for row in rows)
    assert "| mnist | 8 | " in text  # the limit, at the archive's batch size
    assert (tmp_path / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "results.md").read_text() == text
