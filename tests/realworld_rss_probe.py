"""How much memory and time ONE tiny, extreme-aspect-ratio PNG costs a running TorchServe worker.

Sends one width x height black PNG (60000x1 by default: ~140 bytes) to a model, and samples the
model's worker RSS (psutil) every --interval seconds while the request is in flight. Prints one
JSON line: worker pid (and whether it is the same after), baseline/peak RSS, wall time, status.

    # against a server started by scripts/serve (ports and keys from its run folder)
    .venv/bin/python tests/realworld_rss_probe.py --run-dir .run
    # or explicit addresses and the key file
    .venv/bin/python tests/realworld_rss_probe.py --inference-url http://127.0.0.1:8080 \
        --management-url http://127.0.0.1:8081 --token-file .run/key_file.json --model resnet50

--cap-gib N first sets the worker's soft address-space limit (RLIMIT_AS) to its current size + N GiB, so
that a handler that tries to allocate a huge resized image gets a MemoryError instead of the
machine's OOM killer (the limit stays on that worker until it exits). Without it, a 60000x1 PNG
sent to a handler that resizes it for ResNet (short side 232 -> 13,920,000 x 232 RGB, ~13 GB in
PIL) can take the whole machine down. Must run as the worker's user (or root), on its host.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import threading
import time
from pathlib import Path

import psutil
import requests
from PIL import Image


def strip_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 0).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def addresses_from_run_dir(run_dir: Path) -> tuple[str, str, Path]:
    properties = {}
    for line in (run_dir / "config.properties").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            properties[key.strip()] = value.strip()

    def url(key: str) -> str:
        return re.sub(r"//(0\.0\.0\.0|\[::\])", "//127.0.0.1", properties[key])

    return url("inference_address"), url("management_address"), run_dir / "key_file.json"


def tokens(token_file: Path | None) -> tuple[dict, dict]:
    if token_file is None or not token_file.exists():
        return {}, {}
    keys = json.loads(token_file.read_text())
    return ({"Authorization": f"Bearer {keys['inference']['key']}"},
            {"Authorization": f"Bearer {keys['management']['key']}"})


def worker_pids(management_url: str, model: str, headers: dict) -> list[int]:
    reply = requests.get(f"{management_url.rstrip('/')}/models/{model}", headers=headers, timeout=10)
    reply.raise_for_status()
    return sorted(worker["pid"] for worker in reply.json()[0]["workers"])


class RssSampler(threading.Thread):
    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self.stopped = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
                self.samples += 1
            except psutil.Error as error:  # the worker died
                self.error = f"{type(error).__name__}: {error}"
                return
            time.sleep(self.interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, help="a TorchServe run folder (config.properties + key_file.json)")
    parser.add_argument("--inference-url", help="e.g. http://127.0.0.1:8080")
    parser.add_argument("--management-url", help="e.g. http://127.0.0.1:8081")
    parser.add_argument("--token-file", type=Path, help="TorchServe's key_file.json (none: token auth off)")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--width", type=int, default=60000)
    parser.add_argument("--height", type=int, default=1)
    parser.add_argument("--interval", type=float, default=0.02, help="RSS sampling period in seconds (default 0.02)")
    parser.add_argument("--cap-gib", type=float, help="limit the worker's address space to its size + this many GiB first")
    parser.add_argument("--oom-first", action="store_true",
                        help="set the worker's oom_score_adj to 1000: if the machine runs out, the kernel kills it first")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args(argv)
    if args.run_dir:
        inference_url, management_url, token_file = addresses_from_run_dir(args.run_dir)
        inference_url = args.inference_url or inference_url
        management_url = args.management_url or management_url
        token_file = args.token_file or token_file
    elif args.inference_url and args.management_url:
        inference_url, management_url, token_file = args.inference_url, args.management_url, args.token_file
    else:
        parser.error("give --run-dir, or --inference-url and --management-url (and --token-file)")
    inference_auth, management_auth = tokens(token_file)

    pids = worker_pids(management_url, args.model, management_auth)
    if len(pids) != 1:
        print(f"note: {args.model} has {len(pids)} workers; sampling {pids[0]} (TorchServe may pick another)", file=sys.stderr)
    pid = pids[0]
    worker = psutil.Process(pid)
    cap = None
    if args.cap_gib is not None:
        cap = worker.memory_info().vms + int(args.cap_gib * 1024**3)
        # The soft limit only: lowering the hard one could not be undone without CAP_SYS_RESOURCE.
        worker.rlimit(psutil.RLIMIT_AS, (cap, worker.rlimit(psutil.RLIMIT_AS)[1]))
    if args.oom_first:
        Path(f"/proc/{pid}/oom_score_adj").write_text("1000")
    body = strip_png(args.width, args.height)
    time.sleep(0.2)
    baseline = worker.memory_info().rss
    sampler = RssSampler(pid, args.interval)
    sampler.start()
    started = time.monotonic()
    try:
        reply = requests.post(f"{inference_url.rstrip('/')}/predictions/{args.model}", data=body, timeout=args.timeout,
                              headers={**inference_auth, "Content-Type": "image/png"})
        status, text = reply.status_code, reply.text
    except requests.RequestException as error:
        status, text = None, f"{type(error).__name__}: {error}"
    elapsed = time.monotonic() - started
    time.sleep(max(0.1, 3 * args.interval))  # one more sample after the reply
    sampler.stopped.set()
    sampler.join(5)
    try:
        pids_after = worker_pids(management_url, args.model, management_auth)
    except requests.RequestException as error:
        pids_after = f"{type(error).__name__}: {error}"
    mib = 1024**2
    print(json.dumps({
        "model": args.model,
        "image": f"{args.width}x{args.height}",
        "png_bytes": len(body),
        "status": status,
        "reply": text[:300],
        "wall_s": round(elapsed, 3),
        "worker_pid": pid,
        "worker_pids_after": pids_after,
        "same_worker": pids_after == pids,
        "baseline_rss_mib": round(baseline / mib, 1),
        "peak_rss_mib": round(max(sampler.peak, baseline) / mib, 1),
        "peak_minus_baseline_mib": round((max(sampler.peak, baseline) - baseline) / mib, 1),
        "samples": sampler.samples,
        "sampling_error": sampler.error,
        "address_space_cap_mib": round(cap / mib, 1) if cap else None,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
