"""Worker-init tuning decisions from injected CPU descriptions, and the bf16 accuracy guard."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from handlers.settings import CORE_SETTINGS, read_settings
from handlers.cpu_features import (AS_CPU, CPU_AS_VAR, HWCAP2_BF16, CpuFeatures, aten_capability_missing,
                                   cpuinfo_flags, kernel_limits)
from handlers.launch import launch_environment
from handlers import precision_modes
from handlers.launch import launch_env_report
from handlers.precision import decide_precision, fast_math_mode, fpmath_env_on
from handlers.tuning import CoreClaim, cgroup_cpu_limit, decide_threads, usable_cpus
from tests.conftest import TESTS
from tests.inprocess import load_model_dir, load_service, predict, request

CPU = torch.device("cpu")
ZEN4 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"
ZEN3 = "processor\t: 0\nflags\t\t: fpu sse avx2 fma\n"
GRAVITON3 = CpuFeatures("aarch64", True, "HWCAP2_BF16 set")
GRAVITON2 = CpuFeatures("aarch64", False, "HWCAP2_BF16 clear")
EPYC = CpuFeatures("x86_64", False, "no avx512_bf16/amx_bf16")
ZEN4_FEATURES = CpuFeatures("x86_64", True, "avx512_bf16")
SAPPHIRE_RAPIDS = ("model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx2 fma avx512f avx512_vnni avx512_bf16 "
                   "avx512_fp16 amx_bf16 amx_int8 amx_tile\n")

pytestmark = pytest.mark.cpu_sensitive


def as_cpu(monkeypatch, name: str) -> CpuFeatures:
    """Make this process's workers decide as ``AS_CPU[name]`` (GS_CPU_AS), whatever the host."""
    monkeypatch.setenv(CPU_AS_VAR, name)
    return CpuFeatures.detect()


def test_acting_as_another_cpu_replaces_the_features_the_decisions_read():
    host = CpuFeatures.from_cpuinfo("x86_64", SAPPHIRE_RAPIDS)
    assert host.bf16 and host.identity == ("x86_64 Intel(R) Xeon(R) Processor (avx2 fma avx512f avx512_vnni avx512_bf16 "
                                           "avx512_fp16 amx_bf16 amx_int8)")
    avx2, zen4, amx = (host.acting_as(name) for name in ("avx2", "avx512_bf16", "amx"))
    assert not avx2.bf16 and "GS_CPU_AS=avx2" in avx2.evidence and "no avx512_bf16/amx_bf16" in avx2.evidence
    assert zen4.bf16 and zen4.evidence.endswith(": avx512_bf16")
    assert amx.bf16 and amx.evidence.endswith(": avx512_bf16, amx_bf16")
    assert len({avx2.identity, zen4.identity, amx.identity, host.identity}) == 4  # each its own cache key
    assert all(features.identity.endswith(f"on {host.identity}") for features in (avx2, zen4, amx))
    with pytest.raises(ValueError, match="GS_CPU_AS='zen9' is not a CPU to act as; expected one of avx2, "):
        host.acting_as("zen9")
    assert CpuFeatures.detect({CPU_AS_VAR: "avx2"}).evidence.startswith("GS_CPU_AS=avx2")
    assert kernel_limits("avx2", ZEN4_FLAGS) == {"GS_CPU_AS": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                                 "MKL_ENABLE_INSTRUCTIONS": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}


ZEN4_FLAGS = {"avx2", "fma", "avx512f", "avx512vl", "avx512bw", "avx512dq", "avx512_vnni", "avx512_bf16"}
ZEN3_FLAGS = {"sse4_2", "avx", "avx2", "fma"}


def test_acting_as_a_wider_cpu_never_sets_atens_capability_above_the_host():
    """ATen runs ATEN_CPU_CAPABILITY's kernels without asking the hardware: acting as a Zen 4 on an
    AVX2 EPYC crashed every worker with SIGILL. There the decisions act as the Zen 4, ATen picks
    the host's own kernels, and oneDNN's and MKL's caps (maxima by their design) stay."""
    on_zen4 = kernel_limits("avx512_bf16", ZEN4_FLAGS)
    on_zen3 = kernel_limits("avx512_bf16", ZEN3_FLAGS)
    assert on_zen4["ATEN_CPU_CAPABILITY"] == "avx512"
    assert "ATEN_CPU_CAPABILITY" not in on_zen3
    assert on_zen3 == {key: value for key, value in on_zen4.items() if key != "ATEN_CPU_CAPABILITY"}
    assert on_zen3["GS_CPU_AS"] == "avx512_bf16" and on_zen3["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE_BF16"
    assert "ATEN_CPU_CAPABILITY" not in kernel_limits("avx2", {"sse4_2", "avx"})  # a CPU older than AVX2
    assert kernel_limits("avx2", ZEN3_FLAGS)["ATEN_CPU_CAPABILITY"] == "avx2"
    assert aten_capability_missing("avx512", ZEN3_FLAGS) == ["avx512f", "avx512vl", "avx512bw", "avx512dq"]
    assert cpuinfo_flags(ZEN4) == {"fpu", "sse", "avx2", "avx512f", "avx512_bf16", "avx512_vnni"}


KERNELS_PROBE = """
import json, torch
torch.randn(8, 8).to_mkldnn().to_dense()  # oneDNN reorders: its log names the ISA it runs
print(json.dumps({"aten": torch.backends.cpu.get_cpu_capability()}))
"""
WIDER_THAN_AVX2 = ("AVX-512", "AVX512", "AMX", "AVX10")


@pytest.mark.skipif(not CpuFeatures.detect({}).identity.startswith("x86_64"), reason="the kernel caps are x86's")
def test_acting_as_avx2_really_caps_atens_and_onednns_kernels():
    """A process started with the caps runs AVX2 code at most, on any x86-64 host (the caps never
    raise what the hardware has, so an AVX2 host gives the same answer)."""
    completed = subprocess.run([sys.executable, "-c", KERNELS_PROBE], capture_output=True, text=True, timeout=120,
                               env={**__import__("os").environ, **kernel_limits("avx2"), "ONEDNN_VERBOSE": "1"})
    assert completed.returncode == 0, completed.stderr[-2000:]
    isa = [line for line in completed.stdout.splitlines() if line.startswith("onednn_verbose") and ",isa:" in line]
    assert isa and not any(word in isa[0] for word in WIDER_THAN_AVX2), isa
    assert json.loads(completed.stdout.splitlines()[-1])["aten"] in ("AVX2", "DEFAULT")


def test_x86_bf16_comes_from_cpuinfo_flags():
    assert CpuFeatures.from_cpuinfo("x86_64", ZEN4).bf16
    assert not CpuFeatures.from_cpuinfo("x86_64", ZEN3).bf16
    assert "no avx512_bf16" in CpuFeatures.from_cpuinfo("x86_64", ZEN3).evidence


def test_aarch64_bf16_comes_from_hwcap2():
    graviton3 = CpuFeatures.from_hwcap2("aarch64", HWCAP2_BF16 | 0b11)
    graviton2 = CpuFeatures.from_hwcap2("aarch64", 0b11)
    assert graviton3.bf16 and "HWCAP2_BF16 set" in graviton3.evidence
    assert not graviton2.bf16
    assert not CpuFeatures.from_hwcap2("aarch64", None).bf16


@pytest.mark.parametrize("requested, features, device, expected", [
    ("auto", GRAVITON3, CPU, "bf16"),
    ("auto", GRAVITON2, CPU, "fp32"),
    ("auto", ZEN4_FEATURES, CPU, "bf16"),
    ("auto", EPYC, CPU, "fp32"),
    ("fp32", ZEN4_FEATURES, CPU, "fp32"),
    ("bf16", EPYC, CPU, "bf16"),
    ("fp16", ZEN4_FEATURES, CPU, "fp32"),
])
def test_cpu_precision_decision(requested, features, device, expected):
    candidates, reason = decide_precision(requested, device, features)  # a family without int8
    assert candidates == (() if expected == "fp32" else (expected,)) and reason


@pytest.mark.parametrize("requested, capability, expected", [
    ("auto", (7, 5), "fp16"),  # T4G on G5g: fp16 tensor cores, no bf16
    ("auto", (8, 0), "bf16"),  # A100 and later
    ("auto", (9, 0), "bf16"),
    ("bf16", (7, 5), "fp16"),
    ("fp16", (9, 0), "fp16"),
    ("fp32", (7, 5), "fp32"),
])
def test_cuda_precision_follows_the_device(requested, capability, expected):
    # G5g: a Graviton2 host
    candidates, reason = decide_precision(requested, torch.device("cuda", 0), GRAVITON2, capability)
    assert candidates == (() if expected == "fp32" else (expected,))
    assert f"{capability[0]}.{capability[1]}" in reason or requested != "auto"


def test_threads_follow_affinity_and_cgroup_quota():
    assert usable_cpus(affinity=64, quota=2.0) == 2  # a 2-CPU container on a 64-core host
    assert usable_cpus(affinity=64, quota=1.5) == 2
    assert usable_cpus(affinity=2, quota=8.0) == 2
    assert usable_cpus(affinity=64, quota=None) == 64
    assert decide_threads({"OMP_NUM_THREADS": "3"}, cpus=64) == (3, "OMP_NUM_THREADS")
    assert decide_threads({}, cpus=2)[0] == 2
    assert decide_threads({}, cpus=8, workers=2)[0] == 4  # workers x threads never exceed the CPUs
    assert decide_threads({}, cpus=2, workers=4)[0] == 1


def test_core_claims_are_disjoint_and_freed_with_their_holder(tmp_path):
    first = CoreClaim.take(1, [0, 1, 2], tmp_path)
    second = CoreClaim.take(2, [0, 1, 2], tmp_path)
    assert first.cores == [0] and second.cores == [1, 2]
    assert CoreClaim.take(1, [0, 1, 2], tmp_path).cores == []  # nothing left to claim
    first.release()  # as the kernel does when a worker dies
    assert CoreClaim.take(1, [0, 1, 2], tmp_path).cores == [0]


@pytest.mark.parametrize("value, expected", [("shared", 0), (0, 0), (2, 2), ("4", 4)])
def test_cores_setting(value, expected):
    assert read_settings({"handler": {"cores": value}}, CORE_SETTINGS)["cores"] == expected


@pytest.mark.parametrize("value", ["all", -1, 1.5, True])
def test_bad_cores_setting_is_named(value):
    with pytest.raises(ValueError, match=r"handler\.cores"):
        read_settings({"handler": {"cores": value}}, CORE_SETTINGS)


def test_launch_env_is_reported_not_guessed():
    assert "not set: THP_MEM_ALLOC_ENABLE" in launch_env_report({"LRU_CACHE_CAPACITY": "1024"}, features=GRAVITON2)
    assert launch_env_report({"LRU_CACHE_CAPACITY": "1024"}, features=EPYC) == "launch env LRU_CACHE_CAPACITY=1024"
    assert "not set: LRU_CACHE_CAPACITY" in launch_env_report({}, features=EPYC)
    assert launch_env_report({}, features=GRAVITON3).endswith("(not set: LRU_CACHE_CAPACITY, THP_MEM_ALLOC_ENABLE)")
    assert "DNNL_DEFAULT_FPMATH_MODE=BF16" in launch_env_report({"DNNL_DEFAULT_FPMATH_MODE": "BF16"}, features=GRAVITON3)


def test_launch_path_sets_huge_pages_on_aarch64_leaves_onednn_default_math_alone_and_the_operator_wins():
    graviton3 = launch_environment({}, "/locks", features=GRAVITON3)
    assert graviton3["THP_MEM_ALLOC_ENABLE"] == "1" and graviton3["LRU_CACHE_CAPACITY"] == "1024"
    assert "DNNL_DEFAULT_FPMATH_MODE" not in graviton3  # fast math is the worker's, per model
    graviton2 = launch_environment({}, "/locks", features=GRAVITON2)
    assert graviton2["THP_MEM_ALLOC_ENABLE"] == "1" and "DNNL_DEFAULT_FPMATH_MODE" not in graviton2
    x86 = launch_environment({}, "/locks", features=ZEN4_FEATURES)
    assert "THP_MEM_ALLOC_ENABLE" not in x86 and "DNNL_DEFAULT_FPMATH_MODE" not in x86
    assert launch_environment({"LRU_CACHE_CAPACITY": "64"}, "/locks")["LRU_CACHE_CAPACITY"] == "64"
    assert launch_environment({"DNNL_DEFAULT_FPMATH_MODE": "STRICT"}, "/locks", features=GRAVITON3)["DNNL_DEFAULT_FPMATH_MODE"] == "STRICT"


def test_fast_math_is_torchs_switches_on_arm_with_bf16_read_back_else_the_operators_variable_else_autocast():
    on = {"DNNL_DEFAULT_FPMATH_MODE": "BF16"}
    mode, how = fast_math_mode(CPU, GRAVITON3, {}, switches=True)
    assert mode == precision_modes.FAST_MATH_SWITCHES
    assert how == "oneDNN fast math (torch.backends.mkldnn matmul=bf16 conv=bf16 in each forward, read back)"
    assert fast_math_mode(CPU, GRAVITON3, on, switches=False) == (precision_modes.FAST_MATH_ENVIRONMENT,
                                                                  "oneDNN fast math (DNNL_DEFAULT_FPMATH_MODE set at launch)")
    assert fast_math_mode(CPU, GRAVITON3, {}, switches=False) == ("", "autocast")
    for features in (GRAVITON2, ZEN4_FEATURES, EPYC):  # x86 bf16 is autocast's
        assert fast_math_mode(CPU, features, on, switches=True) == ("", "autocast")
    assert fast_math_mode(torch.device("cuda"), GRAVITON3, on, switches=True) == ("", "autocast")
    assert fpmath_env_on(on) and fpmath_env_on({"DNNL_DEFAULT_FPMATH_MODE": "any"})
    assert not fpmath_env_on({}) and not fpmath_env_on({"DNNL_DEFAULT_FPMATH_MODE": "STRICT"})
    candidates, why = decide_precision("auto", CPU, GRAVITON3, how=how)
    assert candidates == ("bf16",) and why == f"auto: bf16: native (HWCAP2_BF16 set), by {how}"
    assert decide_precision("fp32", CPU, GRAVITON3, how=how) == ((), "model-config asks for fp32")
    assert "oneDNN kept out" in decide_precision("fp32", CPU, GRAVITON3, fpmath_env=True)[1]


def test_fast_math_switches_are_on_only_inside_a_bf16_forward_and_fp32_stays_exact():
    def switches() -> tuple[str, str]:
        return torch.backends.mkldnn.matmul.fp32_precision, torch.backends.mkldnn.conv.fp32_precision

    before = switches()
    assert "bf16" not in before
    with precision_modes.precision_mode("bf16", CPU, precision_modes.FAST_MATH_SWITCHES):
        assert switches() == ("bf16", "bf16") and not torch.is_autocast_enabled("cpu")
    assert switches() == before
    with precision_modes.precision_mode("fp32", CPU, precision_modes.FAST_MATH_SWITCHES):
        assert switches() == before and torch.backends.mkldnn.enabled
    with precision_modes.precision_mode("fp32", CPU, precision_modes.FAST_MATH_SWITCHES, fpmath_env=True):
        assert not torch.backends.mkldnn.enabled  # the process-wide bf16 default would reach oneDNN
    with precision_modes.precision_mode("bf16", CPU, ""):
        assert torch.is_autocast_enabled("cpu") and switches() == before
    with pytest.raises(RuntimeError):
        with precision_modes.precision_mode("bf16", CPU, precision_modes.FAST_MATH_SWITCHES):
            raise RuntimeError("a failed forward")
    assert switches() == before


def test_cgroup_quota_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("200000 100000\n")
    assert cgroup_cpu_limit(str(tmp_path)) == 2.0
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(str(tmp_path)) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(str(v1)) == 1.5
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(str(v1)) is None


def test_unknown_precision_is_named():
    with pytest.raises(ValueError, match=r"handler\.precision"):
        read_settings({"handler": {"precision": "fp8"}}, CORE_SETTINGS)


def probe_service(tmp_path, entry: str, precision: str):
    load_model_dir(tmp_path, TESTS / "probe_handler.py", "probe", {"handler": {"precision": precision}})
    return load_service(tmp_path, f"probe_handler.py:{entry}", name="probe")


def test_guard_refuses_bf16_that_changes_answers(tmp_path):
    service = probe_service(tmp_path, "sensitive", "bf16")
    assert getattr(service._entry_point, "worker").precision == "fp32"
    (reply,) = predict(service, [request(b"5")])
    assert reply.json() == {"top": 0}  # the fp32 answer


def test_guard_lets_stable_bf16_through_and_it_is_used(tmp_path):
    service = probe_service(tmp_path, "stable", "bf16")
    assert service._entry_point.worker.precision == "bf16"
    (reply,) = predict(service, [request(b"5")])
    assert reply.status == 200 and reply.json() == {"top": 0}


@pytest.mark.parametrize("features, kept_out", [(GRAVITON3, True), (GRAVITON2, False)])
def test_operators_fpmath_variable_keeps_onednn_out_of_fp32_only_where_bf16_is_native_and_says_so(
        tmp_path, monkeypatch, caplog, features, kept_out):
    monkeypatch.setattr(CpuFeatures, "detect", classmethod(lambda cls: features))
    monkeypatch.setenv("DNNL_DEFAULT_FPMATH_MODE", "BF16")
    caplog.set_level("INFO")
    worker = probe_service(tmp_path, "sensitive", "auto")._entry_point.worker  # bf16 changes its answers
    assert worker.precision == "fp32" and worker.plan.fpmath_env is kept_out
    lines = [record.getMessage() for record in caplog.records if "tuning:" in record.getMessage()]
    if kept_out:
        assert "each timed on the check inputs if its guards pass, or auto's cached outcome (next line)" in lines[0]
        assert "accuracy guard failed" in lines[1] and lines[1].endswith(
            "oneDNN kept out: DNNL_DEFAULT_FPMATH_MODE makes bf16 its default in this process)")
    else:
        assert len(lines) == 1 and "precision=fp32 (auto: no native bf16 (HWCAP2_BF16 clear));" in lines[0]
    with precision_modes.precision_mode("fp32", CPU, worker.plan.fast_math, worker.plan.fpmath_env):
        assert torch.backends.mkldnn.enabled is not kept_out
