"""Reporting: the Markdown tables, results.json and the throughput chart (PNG).

Ratios are per round (ours and stock measured back to back), then summarised as the median of the
rounds with their min–max; a cell with errors takes no part in a ratio (its row still shows it), nor does one that completed no request within its time.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path

import psutil

from graviton_serve.bench.limit import FORWARD, SERVING
from graviton_serve.bench.results import Limit, LoadRun

CELL_HEADER = ("| workload | path | protocol | concurrency | round | requests | seconds | throughput (req/s) | p50 (ms) | "
               "p90 (ms) | p99 (ms) | mean (ms) | errors | worker CPU (s/req) | worker RSS (MiB) | client CPU (cores) |\n"
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def load_run_row(cell: LoadRun) -> str:
    return (f"| {cell.workload} | {cell.path} | {cell.protocol} | {cell.concurrency} | {cell.round} | {cell.requests} | "
            f"{cell.seconds:.1f} | {cell.throughput:.2f} | {cell.p50_ms:.0f} | {cell.p90_ms:.0f} | {cell.p99_ms:.0f} | "
            f"{cell.mean_ms:.0f} | {cell.errors} | {cell.cpu_s_per_request:.3f} | {cell.rss_mib} | {cell.client_cpu_share:.2f} |")


def machine_line() -> str:
    """The CPU with the features that change kernels (the same CPU model name has come with and
    without AVX-512/bf16 here), cores, memory, torch and TorchServe."""
    import torch
    import ts

    from handlers.cpu_features import CpuFeatures

    return (f"{CpuFeatures.detect().identity}, {len(psutil.Process().cpu_affinity())} CPUs, "
            f"{psutil.virtual_memory().total >> 30} GiB; torch {torch.__version__}, TorchServe {ts.__version__}")


def _rest(cells: list[LoadRun], workload: str, path: str, concurrency: int) -> dict[int, LoadRun]:
    """round -> the clean REST cell of that path and concurrency (no errors, some answers)."""
    return {c.round: c for c in cells if c.workload == workload and c.path == path and c.protocol == "REST"
            and c.concurrency == concurrency and c.errors == 0 and c.requests > 0}


def _spread(values: list[float], unit: str = "×", digits: int = 2) -> str:
    """median (min–max) of the rounds."""
    if not values:
        return "—"
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:.{digits}f}{unit}"
    return f"{median:.{digits}f}{unit} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def ratios(cells: list[LoadRun], limits: list[Limit]) -> dict[str, dict[str, list[float]]]:
    """Per workload, the per-round figures the summary reports (also in results.json)."""
    found = {}
    for workload in dict.fromkeys(c.workload for c in cells):
        top = max(c.concurrency for c in cells if c.workload == workload and c.protocol == "REST")
        ours, stock = _rest(cells, workload, "ours", top), _rest(cells, workload, "stock", top)
        ours_c1, stock_c1 = _rest(cells, workload, "ours", 1), _rest(cells, workload, "stock", 1)
        ray, ray_c1 = _rest(cells, workload, "ray", top), _rest(cells, workload, "ray", 1)
        # each round's cell against the limit timed at the end of that round
        limit = {(l.kind, l.round): l.items_per_s for l in limits if l.workload == workload}
        found[workload] = {
            "concurrency": [top],
            "ours": [c.throughput for c in ours.values()],
            "stock": [c.throughput for c in stock.values()],
            "ours/stock": [ours[r].throughput / stock[r].throughput for r in ours if r in stock],
            "ours/forward": [c.throughput / limit[FORWARD, r] for r, c in ours.items() if (FORWARD, r) in limit],
            "ours/serving": [c.throughput / limit[SERVING, r] for r, c in ours.items() if (SERVING, r) in limit],
            "serving limit": [v for (kind, _), v in limit.items() if kind == SERVING],
            "ours c1 p50": [c.p50_ms for c in ours_c1.values()],
            "stock c1 p50": [c.p50_ms for c in stock_c1.values()],
            "c1 p50 ours/stock": [ours_c1[r].p50_ms / stock_c1[r].p50_ms for r in ours_c1 if r in stock_c1],
            # ours on Ray Serve: the same archive and Worker, Ray's HTTP proxy and @serve.batch
            "ray": [c.throughput for c in ray.values()],
            "ray/ours": [ray[r].throughput / ours[r].throughput for r in ray if r in ours],
            "ray/stock": [ray[r].throughput / stock[r].throughput for r in ray if r in stock],
            "ray c1 p50": [c.p50_ms for c in ray_c1.values()],
        }
    return found


def ray_summary(cells: list[LoadRun], limits: list[Limit]) -> str:
    """Ours on Ray Serve beside ours on TorchServe and stock (only when the run had the ray path)."""
    lines = ["| workload | ray (req/s) | ours on TorchServe (req/s) | stock (req/s) | ray/ours | ray/stock | "
             "ray c1 p50 (ms) | ours c1 p50 (ms) |", "|---|---|---|---|---|---|---|---|"]
    for workload, r in ratios(cells, limits).items():
        if r["ray"]:
            lines.append(f"| {workload} (c{r['concurrency'][0]}) | {_spread(r['ray'], '')} | {_spread(r['ours'], '')} | "
                         f"{_spread(r['stock'], '')} | {_spread(r['ray/ours'])} | {_spread(r['ray/stock'])} | "
                         f"{_spread(r['ray c1 p50'], '', 0)} | {_spread(r['ours c1 p50'], '', 0)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def summary(cells: list[LoadRun], limits: list[Limit]) -> str:
    lines = ["| workload | ours (req/s) | stock (req/s) | ours/stock | ours/forward limit (fp32) | ours/serving limit | "
             "ours c1 p50 (ms) | stock c1 p50 (ms) | c1 p50 ours/stock |",
             "|---|---|---|---|---|---|---|---|---|"]
    for workload, r in ratios(cells, limits).items():
        lines.append(f"| {workload} (c{r['concurrency'][0]}) | {_spread(r['ours'], '')} | {_spread(r['stock'], '')} | "
                     f"{_spread(r['ours/stock'])} | {_spread(r['ours/forward'])} | {_spread(r['ours/serving'])} | "
                     f"{_spread(r['ours c1 p50'], '', 0)} | {_spread(r['stock c1 p50'], '', 0)} | {_spread(r['c1 p50 ours/stock'])} |")
    return "\n".join(lines)


def breakdown(cells: list[LoadRun]) -> str:
    """Ours on TorchServe, per cell: how full the batches were, our stages' milliseconds per batch,
    the share of the workers' wall time inside them, and the CPU the workers and the Java frontend
    spent per request (the rest of the workers' time: TorchServe's worker protocol and waiting
    for the frontend's next batch)."""
    lines = ["| workload | concurrency | round | req/s | batches | items/batch | decode (ms/batch) | forward (ms/batch) | "
             "encode (ms/batch) | workers' time in our stages | worker CPU (ms/req) | frontend CPU (ms/req) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        if c.stages is None or c.path != "ours" or c.protocol != "REST":
            continue
        st = c.stages
        lines.append(f"| {c.workload} | {c.concurrency} | {c.round} | {c.throughput:.1f} | {st.batches} | "
                     f"{st.items_per_batch:.2f} | {st.decode_ms:.2f} | {st.forward_ms:.2f} | {st.encode_ms:.2f} | "
                     f"{100 * st.in_handler:.0f}% | {1000 * c.cpu_s_per_request:.2f} | {1000 * c.frontend_cpu_s_per_request:.2f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def limits_table(limits: list[Limit]) -> str:
    lines = ["| workload | limit | round | batch | threads | precision | median batch (ms) | items/s (median batch) | "
             "fastest batch (ms) | items/s (fastest batch) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for l in limits:
        fastest = f"{l.fastest_batch_ms:.1f} | {1000 * l.batch / l.fastest_batch_ms:.2f}" if l.fastest_batch_ms else "— | —"
        lines.append(f"| {l.workload} | {l.kind} | {l.round} | {l.batch} | {l.threads} | {l.precision} | {l.batch_ms:.1f} | "
                     f"{l.items_per_s:.2f} | {fastest} |")
    return "\n".join(lines)


def chart(cells: list[LoadRun], limits: list[Limit], path: Path) -> None:
    """Ours and stock (median of the rounds) as a share of the serving limit, so MNIST and
    DenseNet share one scale; each bar labelled with its req/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = {w: r for w, r in ratios(cells, limits).items() if r["serving limit"]}
    serving = {w: statistics.median(r["serving limit"]) for w, r in found.items()}
    workloads = list(found)
    figure, axis = plt.subplots(figsize=(10, 4.5))
    series = [("ours", "graviton-serve"), ("stock", "stock TorchServe")]
    if any(found[w]["ray"] for w in workloads):
        series.append(("ray", "graviton-serve on Ray Serve"))
    width = 0.8 / len(series)
    for offset, (name, label) in enumerate(series):
        medians = [statistics.median(found[w][name]) if found[w][name] else 0.0 for w in workloads]
        shares = [100 * m / serving[w] for m, w in zip(medians, workloads)]
        bars = axis.bar([i + (offset - (len(series) - 1) / 2) * width for i in range(len(workloads))], shares, width,
                        label=label)
        axis.bar_label(bars, labels=[f"{m:.1f}/s" if m else "n/a" for m in medians], fontsize=7)
    axis.axhline(100, color="grey", linestyle="--", linewidth=1)
    axis.set_xticks(range(len(workloads)), [f"{w}\n(serving limit {serving[w]:.1f}/s)" for w in workloads], fontsize=8)
    axis.set_ylabel("% of the serving limit (median of rounds)")
    top = max((c.concurrency for c in cells if c.protocol == "REST"), default=0)
    axis.set_title(f"Throughput over REST at concurrency {top}, as a share of decode + forward in one process\n"
                   f"{machine_line()}", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report(cells: list[LoadRun], limits: list[Limit], out: Path) -> str:
    rounds = max((c.round for c in cells), default=0)
    stages_table = breakdown(cells)
    of_rounds = f"median of {rounds} rounds (min–max)" if rounds > 1 else "one round"
    text = "\n\n".join([
        f"Machine: {machine_line()}",
        f"Ours against stock and the limits (each the median batch of 3 s, below), REST from wrk; {of_rounds}:\n\n" + summary(cells, limits),
        *([f"Ours on Ray Serve (path ray) against ours on TorchServe and stock, {of_rounds}:\n\n"
           + ray_summary(cells, limits)] if ray_summary(cells, limits) else []),
        "Every load run:\n\n" + CELL_HEADER + "\n" + "\n".join(load_run_row(cell) for cell in cells),
        *([f"Where ours spent its time (our handlers' per-stage counters and the processes' CPU, per cell):\n\n"
           + stages_table] if stages_table else []),
        "The limits (our handler in the bench's process, no server, one batch of what the server holds at once, "
        "every CPU as threads; the median batch of 3 s, timed after each round's cells; the fastest batch for reference):\n\n" + limits_table(limits),
    ]) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({
        "machine": machine_line(),
        "ratios": ratios(cells, limits),
        "cells": [{**asdict(cell), "throughput": cell.throughput} for cell in cells],
        "limits": [asdict(limit) for limit in limits],
    }, indent=1))
    chart(cells, limits, out / "throughput.png")
    return text


AGREEMENT = 0.15  # issue 28: two full runs on one commit agree within this on every ratio
COMPARED = ("ours", "stock", "ray", "serving limit", "ours/stock", "ours/forward", "ours/serving", "ray/ours",
            "ray/stock", "ours c1 p50", "stock c1 p50", "ray c1 p50", "c1 p50 ours/stock")


def read_results(path: Path) -> dict:
    """A run's results.json; ValueError naming the file when it is missing or not one."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"{path}: cannot be read ({error.strerror})") from None
    try:
        results = json.loads(text)
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path}: not a bench results.json ({error})") from None
    if not isinstance(results, dict) or not isinstance(results.get("ratios"), dict):
        raise ValueError(f"{path}: not a bench results.json (no \"ratios\"; scripts/bench writes one beside results.md)")
    return results


def _made(results: dict) -> str:
    """How a run was made: its rounds, REST cell length and which batch its limits are."""
    cells = [cell for cell in results.get("cells", []) if cell.get("protocol") == "REST"]
    if not cells:
        return "no cells"
    rounds = max(cell["round"] for cell in cells)
    made = f"{rounds} round{'s' if rounds != 1 else ''} of {statistics.median(c['seconds'] for c in cells):.0f} s cells"
    limits = results.get("limits") or []
    if limits:  # runs before fastest_batch_ms was recorded took the fastest batch as the limit
        made += ", limits the " + ("median" if "fastest_batch_ms" in limits[0] else "fastest") + " batch"
    return made


def compare(first: dict, second: dict) -> str:
    """Two runs' results.json side by side: per workload and figure (req/s, items/s, ms, and the ratios,
    each a median of per-round ratios as in the summary), each run's median of its rounds and how far
    the second moved from the first (``second / first - 1``), flagged beyond AGREEMENT."""
    lines = [f"| workload | figure | first run | second run | second/first − 1 | within ±{AGREEMENT:.0%} |",
             "|---|---|---|---|---|---|"]
    made = _made(first), _made(second)
    if made[0] != made[1]:  # a --quick run against a full one differs by design
        lines.insert(0, f"Note: the runs were made differently (first: {made[0]}; second: {made[1]}); compare runs made alike.\n")
    for workload, figures in first["ratios"].items():
        other = second["ratios"].get(workload, {})
        for name in COMPARED:
            if figures.get(name) and other.get(name):
                a, b = statistics.median(figures[name]), statistics.median(other[name])
                moved = b / a - 1
                lines.append(f"| {workload} | {name} | {a:.2f} | {b:.2f} | {moved:+.1%} | "
                             f"{'yes' if abs(moved) <= AGREEMENT else 'NO'} |")
    for run, mine, other in (("first", first, second), ("second", second, first)):
        alone = [workload for workload in mine["ratios"] if workload not in other["ratios"]]
        if alone:  # a run of some workloads against a run of all
            lines.append(f"\nOnly in the {run} run, not compared: {', '.join(alone)}.")
    return "\n".join(lines)
