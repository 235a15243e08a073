"""scripts/bench: ours against the stock path and against the limit, in one run, on one machine.

For each workload, three measurements, taken one after another so none competes for the CPU:
- ours: our archive in a real TorchServe with our config, loaded over REST (and gRPC) at
  several concurrencies;
- stock: the path a user would have without us (TorchServe's own ``image_classifier`` handler
  for vision; for text a handler in the manner of TorchServe's Hugging Face example, padded to
  max_length, fp32), in a real TorchServe under TorchServe's default worker count and batch 1;
- limit: our model's raw in-process forward (collate + forward) at our batch size, with the
  threads and precision our worker decides, and no server.

Columns follow TorchServe's benchmark-ab (throughput, p50/p90/p99/mean latency, errors), plus
the worker processes' CPU seconds per request and their RSS.

    results.py    what is measured: Workload, LoadRun (one load run), RawForward (the raw forward)
    load.py       load generation: real TorchServes, REST and gRPC request loops, worker CPU and RSS
    limit.py      the raw forward, in this process, through the handler's public hook
    report.py     the tables (Markdown), results.json and the chart (PNG)
    workloads.py  what each workload loads: bodies, our archive, the stock reference archive
    run.py        the whole run: ours, stock, the limit, the report
"""
