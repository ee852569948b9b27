"""CPU int8 targets: detection from recorded /proc/cpuinfo excerpts, the exact u8 x u8 weight rendering,
the static int16 pair-sum check, the engine self-check, and load-time protection (issue 12).

Every test holds on any CPU: what this machine's kernels compute is asked of ONNX Runtime (the
probe), and the engine is compared with the fake-quant semantics on whatever CPU runs the tests.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from fq_models import ResNetish, calibrate
from onnx_builders import optimized_op_counts, run_ort

ROOT = Path(__file__).resolve().parents[2]

from qfold.config import PTQConfig
from qfold.engine.base import EngineConfig, metadata_path
from qfold.engine.cpu import detect, exact_on, parse_cpuinfo, resolve_target
from qfold.engine.ort import (
    OrtBackend,
    engine_target,
    for_this_cpu,
    ort_max_amax,
)
from qfold.engine.ort_check import TOLERANCE_STEPS, compare
from qfold.engine.ort_cpu import detect_cpu, u8s8_saturates
from qfold.errors import EngineCheckError
from qfold.onnx.export import export_onnx
from qfold.onnx.ort_target import (
    int16_pair_sum_risks,
    max_pair_sum,
    weight_types,
    weights_to_uint8,
)
from qfold.onnx.qdq import render_for_ort, tensors_needing_amax_for_ort

torch.set_num_threads(1)

# ----------------------------------------------------------------------------------------------
# recorded /proc/cpuinfo excerpts (first processor; flags lines shortened to the relevant part)
AVX2_ZEN2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext ssbd ibrs ibpb stibp vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 clzero xsaveerptr arat npt nrip_save umip rdpid
"""
SKYLAKE_AVX512 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8175M CPU @ 2.50GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sse sse2 ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt avx f16c avx2 bmi2 avx512f avx512dq rdseed adx smap clflushopt clwb avx512cd avx512bw avx512vl xsaveopt
"""
CASCADE_LAKE = SKYLAKE_AVX512.replace("8175M", "8259CL").replace("xsaveopt", "xsaveopt avx512_vnni")
ALDER_LAKE = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: 12th Gen Intel(R) Core(TM) i7-12700H
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 avx_vnni umip waitpkg gfni vaes vpclmulqdq
"""
SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni
"""
GRAVITON2 = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer\t: 0x41
"""
GRAVITON3 = GRAVITON2.replace("ssbs", "ssbs i8mm bf16 sve")


@pytest.mark.parametrize("text, machine, cls, words", [
    (AVX2_ZEN2, "x86_64", "portable", ["AVX2", "no VNNI", "AMD EPYC 7B12"]),
    (SKYLAKE_AVX512, "x86_64", "portable", ["AVX512", "no VNNI"]),
    (CASCADE_LAKE, "x86_64", "vnni", ["AVX512", "avx512_vnni"]),
    (ALDER_LAKE, "x86_64", "vnni", ["AVX2", "avx_vnni"]),
    (SAPPHIRE_RAPIDS, "x86_64", "vnni", ["amx_int8"]),
    (GRAVITON2, "aarch64", "arm64", ["ARM64", "dot product"]),
    (GRAVITON3, "aarch64", "arm64", ["i8mm"]),
    ("", "x86_64", "portable", ["unknown"]),           # no flags: the conservative class
    (AVX2_ZEN2, "riscv64", "portable", ["riscv64"]),  # not x86, not ARM64
])
def test_int8_class_from_recorded_cpuinfo(text, machine, cls, words) -> None:
    info = parse_cpuinfo(text, machine)
    assert info.int8_class == cls
    assert resolve_target("auto", info) == cls
    for w in words:
        assert w in info.describe()


def test_detection_fallbacks_and_the_probe_beats_the_flags(tmp_path: Path) -> None:
    missing = detect(tmp_path / "no_cpuinfo", machine="AMD64")
    assert missing.flags == frozenset() and "unreadable" in missing.source and missing.int8_class == "portable"
    (tmp_path / "cpuinfo").write_text(CASCADE_LAKE)
    assert detect(tmp_path / "cpuinfo", machine="x86_64").int8_class == "vnni"
    # an emulator passes the host's VNNI flags through while its kernels saturate: the probe wins
    emulated = detect(tmp_path / "cpuinfo", machine="x86_64", saturation_probe=lambda: True)
    assert emulated.int8_class == "portable" and "SATURATE" in emulated.describe()
    assert detect(tmp_path / "no_cpuinfo", machine="x86_64", saturation_probe=lambda: False).int8_class == "vnni"
    with pytest.raises(ValueError, match="auto, vnni, portable, arm64"):
        resolve_target("avx512")


def test_which_target_is_exact_where() -> None:
    avx2, vnni, arm = (parse_cpuinfo(t, m) for t, m in ((AVX2_ZEN2, "x86_64"), (CASCADE_LAKE, "x86_64"), (GRAVITON2, "aarch64")))
    assert [exact_on("portable", c) for c in (avx2, vnni, arm)] == [True, True, True]
    assert [exact_on("vnni", c) for c in (avx2, vnni, arm)] == [False, True, True]
    assert [exact_on("arm64", c) for c in (avx2, vnni, arm)] == [False, True, True]
    assert max_pair_sum(127) == 64770 > 32767 >= max_pair_sum(64)


# ----------------------------------------------------------------------------------------------
# rendering
@pytest.fixture(scope="module")
def qdq(tmp_path_factory):
    torch.manual_seed(0)
    x = torch.randn(32, 3, 16, 16)
    net = calibrate(ResNetish(width=8, blocks=1), x)
    path = export_onnx(net, x[:1], tmp_path_factory.mktemp("m") / "m.onnx")
    m = onnx.load(path)
    return path, m, x.numpy(), ort_max_amax(m, tensors_needing_amax_for_ort(m), [x.numpy()])


def test_portable_rendering_is_bit_identical_and_statically_safe(qdq) -> None:
    _, m, x, amax = qdq
    s8 = render_for_ort(m, amax, target="vnni")
    u8 = render_for_ort(m, amax, target="portable")
    onnx.checker.check_model(u8, full_check=True)
    assert weight_types(s8) == {"int8"} and weight_types(u8) == {"uint8"}
    assert np.array_equal(run_ort(s8, x, False), run_ort(u8, x, False))  # same numbers as float Q/DQ semantics
    assert weights_to_uint8(s8).SerializeToString(deterministic=True) == u8.SerializeToString(deterministic=True)
    assert int16_pair_sum_risks(u8, "portable") == []
    assert int16_pair_sum_risks(s8, "vnni") == []  # int32 accumulation: no pair sums
    risks = int16_pair_sum_risks(s8, "portable")   # the check can fail: full-range s8 weights on AVX2
    assert risks and "> 32767" in risks[0]
    # ORT still fuses every quantized conv into an integer kernel with uint8 weights
    ops = optimized_op_counts(u8)
    assert ops["QLinearConv"] == sum(n.op_type == "Conv" for n in m.graph.node) and ops["Conv"] == 0


def test_engine_matches_fake_quant_on_this_cpu_with_optimizations_on(qdq) -> None:
    """The acceptance test on whatever CPU runs it: auto and portable stay within a couple of steps."""
    _, m, x, amax = qdq
    fq = lambda a: run_ort(m, a, False)  # noqa: E731 - the Q/DQ graph as float ops = the fake-quant model
    for target in ("auto", "portable"):
        r = render_for_ort(m, amax, target=target)
        c = compare(lambda a, r=r: run_ort(r, a, True), fq, [x[:16], x[16:]])
        assert c.passed and c.max_err_steps <= 2, (target, c.summary())


def test_probe_predicts_what_int8_weights_compute_here() -> None:
    """u8s8_saturates() is ONNX Runtime's own answer: an int8-weight engine of the example ResNet
    deviates from fake-quant by many steps exactly where the probe says the kernels saturate."""
    from qfold.examples import load_data, load_model
    from qfold.pipeline import bound_stage, calibrate_stage, export_stage, fold_stage

    cfg = PTQConfig(progress=False)
    cx = load_data("calib")[0][:128]
    folded, _ = fold_stage(load_model("resnet"), cfg, cx[:2])
    bounded, _ = bound_stage(folded, cx, cfg)
    fq, _, _ = calibrate_stage(bounded, cx, cfg)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        m = onnx.load(export_stage(fq, cx[:1], Path(d), cfg)[0])
    x = cx.numpy()
    amax = ort_max_amax(m, tensors_needing_amax_for_ort(m), [x])
    s8 = render_for_ort(m, amax, target="vnni")
    raw = compare(lambda a: run_ort(s8, a, True), lambda a: run_ort(m, a, False), [x[:64]])
    assert raw.passed != u8s8_saturates(), raw.summary()
    safe = render_for_ort(m, amax, target=detect_cpu().int8_class)
    assert compare(lambda a: run_ort(safe, a, True), lambda a: run_ort(m, a, False), [x[:64]]).passed


# ----------------------------------------------------------------------------------------------
# build and load
def test_build_records_target_and_self_check(qdq, tmp_path: Path) -> None:
    path, _, x, amax = qdq
    info = OrtBackend().build(path, tmp_path / "e.onnx", EngineConfig(intra_op_threads=1), extra_amax=amax,
                              check_data=[x[:16], x[16:]])
    meta = json.loads(metadata_path(tmp_path / "e.onnx").read_text())["extra"]
    assert meta["cpu_target"] == detect_cpu().int8_class == info.extra["cpu_target"]
    assert meta["built_on_cpu"]["describe"] == detect_cpu().describe()
    assert meta["self_check"]["passed"] and meta["self_check"]["samples"] == 32
    assert meta["self_check"]["tolerance_steps"] == TOLERANCE_STEPS
    assert int16_pair_sum_risks(onnx.load(tmp_path / "e.onnx"), meta["cpu_target"]) == []


def test_failed_self_check_writes_nothing(qdq, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels that do not compute what their exact portable twin computes (what a saturating CPU
    does) fail the build. No CPU saturates after the auto rendering, so the limit is set below zero."""
    from qfold.engine import ort_check

    path, _, x, amax = qdq
    monkeypatch.setattr(ort_check, "TOLERANCE_STEPS", -1.0)
    monkeypatch.setattr(ort_check, "MIN_SQNR_DB", float("inf"))
    with pytest.raises(EngineCheckError, match="self-check failed.*Nothing was written.*--cpu-target portable"):
        OrtBackend().build(path, tmp_path / "e.onnx", extra_amax=amax, check_data=[x])
    assert os.listdir(tmp_path) == []


def test_rendering_deviation_from_fake_quant_is_recorded_and_warned(qdq, tmp_path: Path) -> None:
    path, _, x, amax = qdq
    clipped = {k: v / 50 for k, v in amax.items()}  # a wrong extra calibration: the engine clips hard
    with pytest.warns(RuntimeWarning, match="rendering deviates from the fake-quant model"):
        OrtBackend().build(path, tmp_path / "e.onnx", extra_amax=clipped, check_data=[x])
    meta = json.loads(metadata_path(tmp_path / "e.onnx").read_text())["extra"]
    assert meta["self_check"]["passed"] and not meta["rendering_check"]["passed"]
    assert meta["rendering_check"]["max_err_steps"] > TOLERANCE_STEPS


def test_a_vnni_engine_never_runs_saturating_on_a_cpu_without_vnni(qdq) -> None:
    _, m, _, amax = qdq
    s8 = render_for_ort(m, amax, target="vnni")
    avx2, vnni = parse_cpuinfo(AVX2_ZEN2, "x86_64"), parse_cpuinfo(CASCADE_LAKE, "x86_64")
    same, note = for_this_cpu(s8, "vnni", "auto", vnni)
    assert same is s8 and note is None
    fixed, note = for_this_cpu(s8, "vnni", "auto", avx2)
    assert weight_types(fixed) == {"uint8"} and int16_pair_sum_risks(fixed, "portable") == []
    assert "'vnni'" in note and "AVX2, no VNNI" in note and "--cpu-target portable" in note
    with pytest.raises(RuntimeError, match=r"(?s)'vnni'.*AVX2, no VNNI.*--cpu-target portable"):
        for_this_cpu(s8, "vnni", "vnni", avx2)
    forced, note = for_this_cpu(s8, "vnni", "portable", vnni)
    assert weight_types(forced) == {"uint8"} and note is None
    assert engine_target(s8) == "vnni" and engine_target(fixed) == "portable"


def test_load_runs_the_engine_exactly_here_whatever_it_was_built_for(qdq, tmp_path: Path) -> None:
    path, m, x, amax = qdq
    b = OrtBackend()
    for target in ("vnni", "portable"):
        b.build(path, tmp_path / f"{target}.onnx", EngineConfig(cpu_target=target, intra_op_threads=1), extra_amax=amax)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            eng = b.load(tmp_path / f"{target}.onnx", EngineConfig(intra_op_threads=1))
        assert eng.target == target
        assert eng.running_as == (target if exact_on(target, detect_cpu()) else "portable")
        assert bool([w for w in caught if issubclass(w.category, RuntimeWarning)]) == (eng.running_as != target)
        c = eng.check([x])
        assert c.passed and c.reference == "portable-twin", c.summary()
        assert compare(eng.run, lambda a: run_ort(m, a, False), [x]).passed


def test_cpu_target_configuration_is_validated() -> None:
    from qfold.config import EngineConfig

    assert EngineConfig().cpu_target == "auto"
    with pytest.raises(ValueError, match="cpu_target must be one of"):
        EngineConfig(cpu_target="avx512")
    with pytest.raises(ValueError, match="cpu_target must be one of"):
        OrtBackend().build(Path(__file__), Path("/nonexistent/e.onnx"), EngineConfig(cpu_target="sse"))


def test_cli_build_and_eval_report_target_and_self_check(tmp_path: Path) -> None:
    import subprocess

    from qfold.examples import load_data

    cx, _ = load_data("calib")
    tx, ty = load_data("test")
    np.savez(tmp_path / "calib.npz", x=cx[:64].numpy())
    np.savez(tmp_path / "test.npz", x=tx[:64].numpy(), y=ty[:64].numpy())
    common = ["--model", "qfold.examples:load_model", "--calib-data", "calib.npz", "--no-progress"]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "qfold.cli", *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)

    r = cli("export", *common, "--out", "e")
    assert r.returncode == 0, r.stderr
    r = cli("build", "e/model_qdq.onnx", "--out", "b", "--calib-data", "calib.npz", "--cpu-target", "portable")
    assert r.returncode == 0, r.stderr
    assert "cpu target: portable" in r.stdout and "self-check passed" in r.stdout
    assert weight_types(onnx.load(tmp_path / "b" / "engine.ort.onnx")) == {"uint8"}
    r = cli("build", "e/model_qdq.onnx", "--out", "c", "--cpu-target", "avx512")
    assert r.returncode == 2 and "invalid choice: 'avx512'" in r.stderr
    r = cli("eval", *common, "--eval-data", "test.npz", "--engine", "b/engine.ort.onnx", "--out", "v")
    assert r.returncode == 0, r.stderr
    assert "engine self-check on this CPU" in r.stdout and "passed" in r.stdout
    check = json.loads((tmp_path / "v" / "engine_check.json").read_text())
    assert check["passed"] and check["reference"] == "portable-twin" and check["samples"] == 64


# ----------------------------------------------------------------------------------------------
# the self-check on architectures beyond the reference models
def test_check_passes_rounding_order_noise_and_fails_saturation() -> None:
    from qfold.engine.ort_check import MIN_SQNR_DB, CheckResult

    def result(steps: float, sqnr: float) -> CheckResult:
        return CheckResult(256, steps * 0.1, 0.1, steps, sqnr, 1.0, TOLERANCE_STEPS, "portable-twin")

    assert result(1.0, 20.0).passed  # within the step limit
    assert result(5.5, 48.2).passed  # a few outputs a handful of steps off, the rest exact (SE/hard-swish net)
    assert not result(40.0, 13.6).passed  # saturating kernels: every output moves
    assert not result(5.5, MIN_SQNR_DB).passed


@pytest.mark.parametrize("pattern", ["se-hardswish (MobileNetV3)", "deep aggregation (DLA)"])
def test_run_ptq_builds_gated_and_aggregation_nets_on_this_cpu(pattern: str, tmp_path: Path) -> None:
    """The build's self-check holds the integer kernels to their exact portable twin, so an ORT
    rendering that is not bit-identical to fake-quant (extra Q/DQ) builds, and the deviation is
    recorded, not fatal."""
    import importlib.util
    import warnings

    from qfold.config import PTQConfig
    from qfold.pipeline import run_ptq

    pytest.importorskip("sklearn", reason="the pattern models are calibrated on sklearn's digits")
    spec = importlib.util.spec_from_file_location("bench_arch_patterns", ROOT / "tools" / "bench_arch_patterns.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calib, test = bench.digits()
    model = bench.build(bench.PATTERNS[pattern], 0, calib[:256])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = run_ptq(model, calib[:256], test[:128], config=PTQConfig(progress=False), out_dir=tmp_path)
    meta = json.loads(metadata_path(res.artifacts["engine"]).read_text())["extra"]
    assert meta["self_check"]["passed"] and meta["self_check"]["reference"] == "portable-twin", meta["self_check"]
    assert meta["rendering_check"]["reference"] == "qdq-onnx"
    engine, fq = res.accuracy.stages["engine"], res.accuracy.stages["fake_quant"]
    assert engine.sqnr_db > fq.sqnr_db - 3, (engine, fq)
