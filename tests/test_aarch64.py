"""Our aarch64 path, executed: the handlers on an arm64 Python under qemu-user, as Graviton3
(SVE 256 + bf16) and Graviton2 (Neoverse N1, no bf16), compared with this x86 machine.

This proves the code path and the numbers on the aarch64 ISA with Graviton's CPU features
(oneDNN + ACL, fast math, the hardware capability bits); emulated timings mean nothing.
The root is built once (tests.tooling.aarch64_root; scripts/test does it first). Each
emulated CPU runs one process for all its models, as a worker would run one model each.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from PIL import Image, ImageOps
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertForSequenceClassification

from graviton_serve.families import family, for_task
from graviton_serve.demo_text import LABELS, minilm_dir
from graviton_serve.paths import HANDLERS_DIR, ROOT
from graviton_serve.sample_data import photo
from tests.conftest import TESTS
from tests.aarch64_driver import serve
from tests.inprocess import load_model_dir
from tests.tooling import aarch64_root

pytestmark = pytest.mark.aarch64

DRIVER = TESTS / "aarch64_driver.py"
TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
FP32_TOLERANCE = 2e-6  # scores are rounded to 6 decimals: the same fp32 model on two ISAs
BF16_MOVES_AT_LEAST = 5e-6  # bf16 must move some score by more than two ISAs' fp32 ever did
BF16_TOLERANCE = 0.05
EMULATION_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def arm_python() -> aarch64_root.Aarch64Python:
    ready = aarch64_root.ready_python()
    if ready is not None:
        return ready
    try:
        return aarch64_root.ensure_root()
    except aarch64_root.NeedsRoot as error:  # any other failure to build fails the tests
        pytest.skip(f"no aarch64 root: {error}")


# -- tiny models, one per handler family, built here --------------------------------------------

def text_requests(texts_and_bad: list) -> list[dict]:
    return [{"value": {"text": text}, "content_type": "text/plain"} if isinstance(text, str)
            else {"value": {"b64": base64.b64encode(text).decode()}, "content_type": "application/octet-stream"}
            for text in texts_and_bad]


def image_requests(images: list[bytes]) -> list[dict]:
    return [{"value": {"b64": base64.b64encode(image).decode()}, "content_type": "application/octet-stream"} for image in images]


def text_model(folder: Path, name: str, task: str, model, tokenizer, texts: list) -> dict:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    family = for_task(task)
    return {"dir": load_model_dir(folder, HANDLERS_DIR / f"{family.name}.py", name, family.model_config(), "model.safetensors"),
            "handler": f"{family.name}.py",
            "requests": text_requests(texts)}


@pytest.fixture(scope="module")
def models(tmp_path_factory, mnist_dir) -> dict[str, dict]:
    """name -> {dir, handler, requests}. Fixed seeds; a bias margin keeps each top-1 clear of ties."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    built = {}

    torch.manual_seed(0)
    sentiment = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), num_labels=3, id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)}, **TINY)).eval()
    with torch.no_grad():
        sentiment.classifier.bias.copy_(torch.tensor([1.5, 0.0, -1.5]))
    built["bert_sentiment"] = text_model(tmp_path_factory.mktemp("sentiment"), "bert_sentiment", "sentiment", sentiment, tokenizer,
                                         ["I love riding in self-driving cars!", b"\xff\xfe not UTF-8", "Terrible service, never again."])

    torch.manual_seed(1)
    fill = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), **TINY)).eval()
    with torch.no_grad():
        bias = fill.get_output_embeddings().bias
        for margin, word in zip((12.0, 10.0, 8.0, 6.0, 4.0), ("paris", "london", "rome", "berlin", "madrid")):
            bias[tokenizer.convert_tokens_to_ids(word)] = margin
    built["bert_fill_mask"] = text_model(tmp_path_factory.mktemp("fill_mask"), "bert_fill_mask", "fill-mask", fill, tokenizer,
                                         ["The capital of France is [MASK].", "no mask here", "[MASK] is older than <mask>."])

    folder = tmp_path_factory.mktemp("mnist")
    shutil.copytree(mnist_dir, folder, dirs_exist_ok=True)
    digit = Image.open(TESTS / "data" / "digit.png").convert("L")
    ambiguous = io.BytesIO()  # a 7 blended with its mirror image: about 0.65 "7", 0.29 "9", so bf16 shows
    Image.blend(digit, ImageOps.mirror(digit), 0.5).save(ambiguous, format="PNG")
    built["mnist"] = {  # the demo's trained network: real digits
        "dir": folder, "handler": "mnist.py",
        "requests": image_requests([(TESTS / "data" / "digit.png").read_bytes(), b"\x00garbage" * 50, ambiguous.getvalue()]),
    }

    torch.manual_seed(2)
    network = torchvision.models.resnet18(weights=None, num_classes=1000)
    with torch.no_grad():
        network.fc.bias.zero_()
        network.fc.bias[207] = 4.0  # golden retriever
        network.fc.bias[1] = 3.0  # goldfish
    folder = tmp_path_factory.mktemp("resnet18")
    torch.save(network.state_dict(), folder / "model.pt")
    built["resnet18"] = {
        "dir": load_model_dir(folder, HANDLERS_DIR / "vision.py", "resnet18", family("vision").model_config(architecture="resnet18", weights="IMAGENET1K_V1"),
                              "model.pt"),
        "handler": "vision.py",
        "requests": image_requests([photo("flower").read_bytes(), b"\x00garbage" * 50]),
    }
    return built


def with_precision(model: dict, precision: str, folder: Path) -> dict:
    """A copy of the model whose model-config.yaml asks for ``precision``."""
    folder = folder / model["dir"].name
    shutil.copytree(model["dir"], folder)
    config_file = folder / "model-config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config.setdefault("handler", {})["precision"] = precision
    config_file.write_text(yaml.safe_dump(config))
    return {**model, "dir": folder}


@pytest.fixture(scope="module")
def x86_fp32(models, tmp_path_factory) -> dict[str, list[dict]]:
    """The reference: each model on this machine, fp32, through the driver's own serve()."""
    folder = tmp_path_factory.mktemp("x86")
    job = [{"name": name, **with_precision(model, "fp32", folder)} for name, model in models.items()]
    return {name: answer["replies"] for name, answer in serve(job)["answers"].items()}


# -- emulated runs ------------------------------------------------------------------------------

def emulate(arm: aarch64_root.Aarch64Python, cpu: str, job: dict, folder: Path, env: dict[str, str],
            cpus: set[int] | None = None) -> tuple[dict, str]:
    """Run the driver on the arm64 Python as ``cpu``; returns its result and its stdout (oneDNN's log)."""
    job_file, result_file = folder / "job.json", folder / "result.json"
    job_file.write_text(json.dumps(job, default=str))
    completed = subprocess.run(
        arm.command(str(DRIVER), str(job_file), str(result_file)),
        env=arm.environment(cpu, {"PYTHONPATH": str(ROOT), **env}), capture_output=True, text=True,
        timeout=EMULATION_TIMEOUT_S, preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(result_file.read_text()), completed.stdout


def emulated_launch_env(arm: aarch64_root.Aarch64Python, cpu: str, folder: Path) -> dict[str, str]:
    """What our launch path sets for a worker, decided by the launch code itself on the emulated CPU."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from handlers.launch import launch_environment; "
            "print(json.dumps(launch_environment({}, sys.argv[2])))")
    completed = subprocess.run(arm.command("-c", code, str(ROOT), str(folder / "cores")), env=arm.environment(cpu),
                               capture_output=True, text=True, timeout=EMULATION_TIMEOUT_S)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return json.loads(completed.stdout)


@pytest.fixture(scope="module")
def graviton3(arm_python, models, tmp_path_factory):
    """Graviton3: text classification, fill-mask and MNIST. (A ResNet18 batch of three 224x224
    images had not finished after 3.5 minutes under SVE emulation here: vision runs as Graviton2.)"""
    folder = tmp_path_factory.mktemp("graviton3")
    launch_env = emulated_launch_env(arm_python, aarch64_root.GRAVITON3, folder)
    job = {"serve": [{"name": name, **models[name]} for name in ("bert_sentiment", "bert_fill_mask", "mnist")]}
    # The same MNIST asking for fp32 in a fast-math process: oneDNN kept out.
    job["serve"].append({"name": "mnist_fp32", **with_precision(models["mnist"], "fp32", folder)})
    result, verbose = emulate(arm_python, aarch64_root.GRAVITON3, job, folder, {**launch_env, "ONEDNN_VERBOSE": "1"})
    return {"launch_env": launch_env, "result": result, "verbose": verbose}


@pytest.fixture(scope="module")
def graviton2(arm_python, models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("graviton2")
    launch_env = emulated_launch_env(arm_python, aarch64_root.GRAVITON2, folder)
    job = {"serve": [{"name": name, **model} for name, model in models.items()]}
    result, _ = emulate(arm_python, aarch64_root.GRAVITON2, job, folder, launch_env)
    return {"launch_env": launch_env, "result": result}


@pytest.fixture(scope="module")
def late_fast_math(arm_python, tmp_path_factory):
    """Graviton3, fast math asked for only after `import torch`; the process may use one CPU only."""
    folder = tmp_path_factory.mktemp("late")
    result, verbose = emulate(arm_python, aarch64_root.GRAVITON3, {"probe": "late_fast_math"}, folder,
                              {"ONEDNN_VERBOSE": "1"}, cpus={min(os.sched_getaffinity(0))})
    return {"result": result, "verbose": verbose}


def tuning_line(result: dict, model: str) -> str:
    lines = [line for line in result["tuning"] if line.startswith(f"{model}: tuning: device=")]
    assert len(lines) == 1, result["tuning"]
    return lines[0]


def scores(body) -> list[tuple[str, float]]:
    """Every (label or token, score) of a reply body, in order."""
    if isinstance(body, list):
        return [pair for part in body for pair in scores(part)]
    if "token_str" in body:
        return [(body["token_str"], body["score"])]
    if "scores" in body:
        return list(body["scores"].items())
    return list(body.items())


def compare(emulated: list[dict], reference: list[dict], tolerance: float) -> float:
    """Same statuses, labels and order, errors equal; returns the largest score difference."""
    assert [r["status"] for r in emulated] == [r["status"] for r in reference]
    largest = 0.0
    for got, want in zip(emulated, reference):
        if want["status"] != 200:
            assert got["body"] == want["body"]
            continue
        got_scores, want_scores = scores(got["body"]), scores(want["body"])
        assert [label for label, _ in got_scores] == [label for label, _ in want_scores]
        for (_, a), (_, b) in zip(got_scores, want_scores):
            largest = max(largest, abs(a - b))
    assert largest <= tolerance
    return largest


# -- the cases ----------------------------------------------------------------------------------

def test_graviton3_decides_bf16_from_the_capability_bits_and_runs_acl_fast_math(graviton3, x86_fp32):
    assert graviton3["result"]["machine"] == "aarch64"
    assert graviton3["launch_env"]["DNNL_DEFAULT_FPMATH_MODE"] == "BF16"
    for name in ("bert_sentiment", "bert_fill_mask", "mnist"):
        line = tuning_line(graviton3["result"], name)
        assert "precision=bf16 (native bf16 (HWCAP2_BF16 set), by oneDNN fast math" in line
        assert f"{name}: tuning: precision=bf16 (accuracy guard passed" in " ".join(graviton3["result"]["tuning"])
    fast = [line for line in graviton3["verbose"].splitlines() if "attr-fpmath:bf16" in line and ",exec," in line]
    assert any(",matmul,gemm:acl," in line and "wei:bf16" in line for line in fast), "no ACL bf16 GEMM in oneDNN's log"
    assert any(",convolution," in line and ":acl," in line and "wei:bf16" in line for line in fast), "no ACL bf16 convolution"


@pytest.mark.parametrize("name", ["bert_sentiment", "bert_fill_mask", "mnist"])
def test_graviton3_outputs_move_from_fp32_but_keep_their_answers(graviton3, x86_fp32, name):
    replies = graviton3["result"]["answers"][name]["replies"]
    moved = compare(replies, x86_fp32[name], BF16_TOLERANCE)
    print(f"{name}: Graviton3 bf16 fast math vs x86 fp32: largest score change {moved:.6f}")
    assert moved > BF16_MOVES_AT_LEAST  # bf16 really moved the scores


def test_fp32_asked_for_under_fast_math_is_exact_fp32(graviton3, x86_fp32):
    assert "precision=fp32 (model-config asks for fp32 (oneDNN kept out: fast math is on in this process))" in \
        tuning_line(graviton3["result"], "mnist_fp32")
    compare(graviton3["result"]["answers"]["mnist_fp32"]["replies"], x86_fp32["mnist"], FP32_TOLERANCE)


def test_graviton2_decides_fp32_without_fast_math(graviton2):
    assert graviton2["result"]["machine"] == "aarch64"
    assert "DNNL_DEFAULT_FPMATH_MODE" not in graviton2["launch_env"]
    assert graviton2["launch_env"]["THP_MEM_ALLOC_ENABLE"] == "1"
    for name in ("bert_sentiment", "bert_fill_mask", "mnist", "resnet18"):
        assert "precision=fp32 (no native bf16 (HWCAP2_BF16 clear))" in tuning_line(graviton2["result"], name)


@pytest.mark.parametrize("name", ["bert_sentiment", "bert_fill_mask", "mnist", "resnet18"])
def test_every_handler_family_answers_a_batch_with_a_bad_item_as_on_x86(graviton2, x86_fp32, name):
    replies = graviton2["result"]["answers"][name]["replies"]
    assert 400 in [reply["status"] for reply in replies] and 200 in [reply["status"] for reply in replies]
    print(f"{name}: Graviton2 fp32 vs x86 fp32: largest score change {compare(replies, x86_fp32[name], FP32_TOLERANCE):.6f}")


def test_threads_follow_the_emulated_process_affinity(late_fast_math, graviton2):
    probe = late_fast_math["result"]
    assert probe["affinity"] == [min(os.sched_getaffinity(0))]
    assert probe["threads"] == probe["torch_threads"] == 1
    assert "threads=1 inter-op 1 (1 usable CPUs" in tuning_line(probe, "probe")
    everywhere = len(os.sched_getaffinity(0))
    first_model = tuning_line(graviton2["result"], "bert_sentiment")  # later models share its started pools
    assert f"threads={everywhere} inter-op 1 ({everywhere} usable CPUs" in first_model


def test_fast_math_must_be_set_before_torch_starts(graviton3, late_fast_math):
    """Set in the worker's environment at start (as our launch path does), oneDNN runs bf16;
    set after `import torch`, even before any operation, it is ignored: so the launch path sets it."""
    def acl_gemms(verbose: str) -> list[str]:
        return [line for line in verbose.splitlines() if ",exec," in line and ",matmul,gemm:acl," in line]

    at_start, too_late = acl_gemms(graviton3["verbose"]), acl_gemms(late_fast_math["verbose"])
    assert at_start and all("attr-fpmath:bf16" in line for line in at_start)
    assert too_late and not any("fpmath:bf16" in line or "wei:bf16" in line for line in too_late)


def test_the_root_build_left_nothing_mounted_in_the_root(arm_python):
    root = str(arm_python.root.resolve()) + "/"
    mounted = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    assert not [point for point in mounted if point.startswith(root)]
