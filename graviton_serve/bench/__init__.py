"""scripts/bench: ours against the stock path and against the limits, in one run, on one machine.

For each workload:
- ours: our archive in a real TorchServe with our config;
- stock: the path a user would have without us (TorchServe's own ``image_classifier`` handler
  for vision; for text a handler in the manner of TorchServe's Hugging Face example, padded to
  max_length, fp32), in a real TorchServe under TorchServe's default worker count and batch 1.
  Both servers are up together; wrk (C, one thread) loads one at a time for a fixed time per
  cell, ours and stock alternating in rounds (ours then stock, then stock then ours, ...), so a
  drift of the machine hits both and each round gives one ratio. Its own CPU is reported;
- limits, in this process with no server, on one full batch: the fp32 forward alone, and
  serving's work per item (decode + forward + encode) in the precision our worker chose.

The summary gives each ratio as the median of the rounds with their min–max. Columns follow
TorchServe's benchmark-ab (throughput, p50/p90/p99/mean latency, errors), plus the worker
processes' CPU seconds per request and RSS, and the load client's CPU.

    results.py       what is measured: Workload, LoadRun (one cell), Limit
    load.py          real TorchServes, wrk over REST, a Python gRPC loop, worker CPU and RSS
    post_bodies.lua  wrk's script: POST the bodies in turn, print one JSON summary line
    limit.py         the limits, in this process, through the handler core
    report.py        per-round ratios, the tables (Markdown), results.json and the chart (PNG)
    workloads.py     what each workload loads: bodies, our archive, the stock reference archive
    run.py           the whole run, workload by workload
"""
