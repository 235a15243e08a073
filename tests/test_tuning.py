"""Worker-init tuning decisions from faked CPU descriptions, and the bf16 accuracy guard."""

from __future__ import annotations

import pytest
import torch

from handlers.settings import CORE_SETTINGS, read_settings
from handlers.cpu_features import HWCAP2_BF16, CpuFeatures
from handlers.launch import launch_environment
from handlers.tuning import (CoreClaim, cgroup_cpu_limit, decide_precision, decide_threads, fast_math_on,
                             launch_env_report, usable_cpus)
from tests.conftest import TESTS
from tests.inprocess import load_model_dir, load_service, predict, request

CPU = torch.device("cpu")
ZEN4 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"
ZEN3 = "processor\t: 0\nflags\t\t: fpu sse avx2 fma\n"
GRAVITON3 = CpuFeatures("aarch64", True, "HWCAP2_BF16 set")
GRAVITON2 = CpuFeatures("aarch64", False, "HWCAP2_BF16 clear")
EPYC = CpuFeatures("x86_64", False, "no avx512_bf16/amx_bf16")
ZEN4_FEATURES = CpuFeatures("x86_64", True, "avx512_bf16")


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
    precision, reason = decide_precision(requested, device, features)
    assert precision == expected and reason


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
    precision, reason = decide_precision(requested, torch.device("cuda", 0), GRAVITON2, capability)
    assert precision == expected
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
    assert "not set: LRU_CACHE_CAPACITY, THP_MEM_ALLOC_ENABLE, DNNL_DEFAULT_FPMATH_MODE" in launch_env_report({}, features=GRAVITON3)


def test_launch_path_sets_huge_pages_on_aarch64_fast_math_where_bf16_and_the_operator_wins():
    graviton3 = launch_environment({}, "/locks", features=GRAVITON3)
    assert graviton3["THP_MEM_ALLOC_ENABLE"] == "1" and graviton3["LRU_CACHE_CAPACITY"] == "1024"
    assert graviton3["DNNL_DEFAULT_FPMATH_MODE"] == "BF16"
    graviton2 = launch_environment({}, "/locks", features=GRAVITON2)
    assert graviton2["THP_MEM_ALLOC_ENABLE"] == "1" and "DNNL_DEFAULT_FPMATH_MODE" not in graviton2
    x86 = launch_environment({}, "/locks", features=ZEN4_FEATURES)
    assert "THP_MEM_ALLOC_ENABLE" not in x86 and "DNNL_DEFAULT_FPMATH_MODE" not in x86
    assert launch_environment({"LRU_CACHE_CAPACITY": "64"}, "/locks")["LRU_CACHE_CAPACITY"] == "64"
    assert launch_environment({"DNNL_DEFAULT_FPMATH_MODE": "STRICT"}, "/locks", features=GRAVITON3)["DNNL_DEFAULT_FPMATH_MODE"] == "STRICT"


def test_fast_math_counts_only_on_arm_with_bf16_and_the_variable_set():
    on = {"DNNL_DEFAULT_FPMATH_MODE": "BF16"}
    assert fast_math_on(CPU, GRAVITON3, on)
    assert not fast_math_on(CPU, GRAVITON3, {})
    assert not fast_math_on(CPU, GRAVITON3, {"DNNL_DEFAULT_FPMATH_MODE": "STRICT"})
    assert not fast_math_on(CPU, GRAVITON2, on)
    assert not fast_math_on(CPU, ZEN4_FEATURES, on)  # x86 Linear is MKL's: autocast there
    assert not fast_math_on(torch.device("cuda"), GRAVITON3, on)
    precision, why = decide_precision("auto", CPU, GRAVITON3, fast_math=True)
    assert precision == "bf16" and "oneDNN fast math" in why
    assert "autocast" in decide_precision("auto", CPU, GRAVITON3)[1]
    assert "oneDNN kept out" in decide_precision("fp32", CPU, GRAVITON3, fast_math=True)[1]


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
