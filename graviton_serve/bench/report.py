"""Reporting: the Markdown tables, results.json and the throughput chart (PNG)."""

from __future__ import annotations

import json
import platform
import statistics
from dataclasses import asdict
from pathlib import Path

import psutil

from graviton_serve.bench.results import LoadRun, RawForward

CELL_HEADER = ("| workload | path | protocol | concurrency | requests | throughput (req/s) | p50 (ms) | p90 (ms) | "
               "p99 (ms) | mean (ms) | errors (%) | worker CPU (s/req) | worker RSS (MiB) |\n"
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def load_run_row(cell: LoadRun) -> str:
    return (f"| {cell.workload} | {cell.path} | {cell.protocol} | {cell.concurrency} | {cell.requests} | "
            f"{cell.throughput:.2f} | {cell.percentile(50):.0f} | {cell.percentile(90):.0f} | {cell.percentile(99):.0f} | "
            f"{statistics.mean(cell.latencies_ms):.0f} | {100 * cell.errors / cell.requests:.1f} | "
            f"{cell.cpu_s_per_request:.3f} | {cell.rss_mib} |")


def machine_line() -> str:
    import torch
    import ts

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or platform.machine())
    return (f"{model}, {len(psutil.Process().cpu_affinity())} CPUs, {psutil.virtual_memory().total >> 30} GiB, "
            f"{platform.machine()}; torch {torch.__version__}, TorchServe {ts.__version__}")


def summary(cells: list[LoadRun], limits: dict[str, RawForward]) -> str:
    """Per workload, at the highest REST concurrency: ours against stock and against the limit."""
    lines = ["| workload | ours (req/s) | stock (req/s) | limit (items/s) | ours/stock | ours/limit | ours p99 (ms) | stock p99 (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for workload in dict.fromkeys(cell.workload for cell in cells):
        rest = [cell for cell in cells if cell.workload == workload and cell.protocol == "REST"]
        top = max(cell.concurrency for cell in rest)
        ours = _clean(next((c for c in rest if c.path == "ours" and c.concurrency == top), None))
        stock = _clean(next((c for c in rest if c.path == "stock" and c.concurrency == top), None))
        limit = limits.get(workload)
        lines.append(
            f"| {workload} (c{top}) | {_f(ours and ours.throughput)} | {_f(stock and stock.throughput)} | "
            f"{_f(limit and limit.items_per_s)} | {_ratio(ours, stock and stock.throughput)} | "
            f"{_ratio(ours, limit and limit.items_per_s)} | {_f(ours and ours.percentile(99), 0)} | "
            f"{_f(stock and stock.percentile(99), 0)} |")
    return "\n".join(lines)


def _clean(cell: LoadRun | None) -> LoadRun | None:
    """A run with errors is no figure to compare (its table row still shows it)."""
    return cell if cell is not None and cell.errors == 0 else None


def _f(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _ratio(ours: LoadRun | None, reference: float | None) -> str:
    return "—" if not ours or not reference else f"{ours.throughput / reference:.2f}×"


def limits_table(limits: dict[str, RawForward]) -> str:
    lines = ["| workload | batch | threads | precision | forward (ms) | items/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {l.workload} | {l.batch} | {l.threads} | {l.precision} | {l.forward_ms:.0f} | {l.items_per_s:.2f} |"
              for l in limits.values()]
    return "\n".join(lines)


def chart(cells: list[LoadRun], limits: dict[str, RawForward], path: Path) -> None:
    """Ours and stock as a share of the raw-forward limit (so MNIST and DenseNet share one
    scale), each bar labelled with its req/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = [w for w in dict.fromkeys(cell.workload for cell in cells) if w in limits]
    figure, axis = plt.subplots(figsize=(10, 4.5))
    width = 0.38
    for offset, (name, label) in enumerate((("ours", "graviton-serve"), ("stock", "stock TorchServe"))):
        shares, texts = [], []
        for workload in workloads:
            rest = [c for c in cells if c.workload == workload and c.protocol == "REST"]
            top = max(c.concurrency for c in rest)
            cell = _clean(next((c for c in rest if c.path == name and c.concurrency == top), None))
            shares.append(100 * cell.throughput / limits[workload].items_per_s if cell else 0)
            texts.append(f"{cell.throughput:.1f}/s" if cell else "n/a")
        bars = axis.bar([i + (offset - 0.5) * width for i in range(len(workloads))], shares, width, label=label)
        axis.bar_label(bars, labels=texts, fontsize=7)
    axis.axhline(100, color="grey", linestyle="--", linewidth=1)
    axis.set_xticks(range(len(workloads)), [f"{w}\n(limit {limits[w].items_per_s:.1f}/s)" for w in workloads], fontsize=8)
    axis.set_ylabel("% of the raw-forward limit")
    axis.set_ylim(0, 110)
    top_concurrency = max(c.concurrency for c in cells if c.protocol == "REST")
    axis.set_title(f"Throughput over REST at concurrency {top_concurrency}, as a share of the model's raw forward\n"
                   f"{machine_line()}", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report(cells: list[LoadRun], limits: dict[str, RawForward], out: Path) -> str:
    text = "\n\n".join([
        f"Machine: {machine_line()}",
        "Ours against stock and the limit:\n\n" + summary(cells, limits),
        "Every load run:\n\n" + CELL_HEADER + "\n" + "\n".join(load_run_row(cell) for cell in cells),
        "The limit (raw collate + forward in one process, no server):\n\n" + limits_table(limits),
    ]) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({
        "machine": machine_line(),
        "cells": [{**asdict(cell), "throughput": cell.throughput, "p50": cell.percentile(50), "p90": cell.percentile(90),
                   "p99": cell.percentile(99)} for cell in cells],
        "limits": [asdict(limit) for limit in limits.values()],
    }, indent=1))
    chart(cells, limits, out / "throughput.png")
    return text
