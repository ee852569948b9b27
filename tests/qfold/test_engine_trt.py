"""TensorRT backend: the parts that need no GPU run everywhere; engine builds run where TensorRT and CUDA exist."""
from __future__ import annotations

import ast
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from onnx_builders import qdq_conv

from qfold.engine import trt as T
from qfold.engine.base import EngineConfig, EngineInfo

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def _qdq_conv_model(path: Path | None = None, *, cin: int = 4, cout: int = 8, seed: int = 0, hw: int = 8) -> onnx.ModelProto:
    """x[N,cin,hw,hw] -> Q/DQ -> Conv 3x3 (per-channel Q/DQ weights) -> Relu -> y; dynamic batch, opset 17."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
    m = qdq_conv(w, 3.0, bias=rng.standard_normal(cout).astype(np.float32), relu=True, hw=hw, name="qdq_conv")
    onnx.checker.check_model(m)
    if path is not None:
        onnx.save(m, str(path))
    return m


def _ort(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


# ----------------------------------------------------------------------------- import discipline and errors


def test_tensorrt_is_imported_only_inside_functions():
    tree = ast.parse(Path(T.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top for a in n.names] + [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert not any(n.split(".")[0] == "tensorrt" for n in names)
    inner = [n for n in ast.walk(tree) if isinstance(n, ast.Import) and any(a.name == "tensorrt" for a in n.names)]
    assert len(inner) == 1  # import_tensorrt() is the one place


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here, so the missing-package error cannot be shown")
def test_missing_tensorrt_error_says_how_to_install_and_what_works_instead(tmp_path):
    onnx_path = tmp_path / "m.onnx"
    _qdq_conv_model(onnx_path)
    for call in (
        T.import_tensorrt,
        lambda: T.BACKEND.build(onnx_path, tmp_path / "m.plan", EngineConfig(backend="tensorrt")),
        lambda: T.BACKEND.load(tmp_path / "m.plan", EngineConfig(backend="tensorrt")),
    ):
        with pytest.raises(T.TensorRTUnavailableError) as exc:
            call()
        msg = str(exc.value)
        assert 'pip install -e ".[tensorrt]" --extra-index-url https://pypi.nvidia.com' in msg
        assert "--backend onnxruntime" in msg and "pip install qfold" not in msg
        assert isinstance(exc.value, ImportError)
    assert not (tmp_path / "m.plan").exists()


def test_registry_gives_this_backend_without_importing_tensorrt():
    from qfold.engine import get_backend

    backend = get_backend("tensorrt")  # works without tensorrt: the import happens at build/load
    assert isinstance(backend, T.TensorRTBackend) and backend.name == "tensorrt"
    assert isinstance(T.BACKEND, T.TensorRTBackend)


# ----------------------------------------------------------------------------- build planning


@pytest.mark.parametrize(
    "version, has_st, flags, fp16, legacy, expected",
    [
        ("11.1.0.8", True, {"TF32"}, False, False, T.BuildPlan(False, (), False, ("TF32",))),
        ("11.0.0", False, {"TF32"}, True, False, T.BuildPlan(False, (), True, ("TF32",))),
        ("10.13.2.6", True, {"INT8", "FP16", "TF32"}, False, False, T.BuildPlan(True, (), False, ("TF32",))),
        ("10.3.0", True, {"INT8", "FP16"}, True, False, T.BuildPlan(True, (), True)),
        ("10.3.0", True, {"INT8", "FP16"}, True, True, T.BuildPlan(False, ("INT8", "FP16"), False)),
        ("10.3.0", True, {"INT8", "FP16", "TF32"}, False, True, T.BuildPlan(False, ("INT8",), False, ("TF32",))),
    ],
)
def test_plan_build_follows_the_version_table(version, has_st, flags, fp16, legacy, expected):
    plan = T.plan_build(version, has_strongly_typed=has_st, builder_flags=flags, fp16_fallback=fp16, legacy_weak_typing=legacy)
    assert plan == expected


@pytest.mark.parametrize(
    "version, has_st, flags, legacy, match",
    [
        ("11.1.0", True, {"TF32"}, True, "removed in 11.0"),
        ("10.12.0", True, {"TF32"}, True, "BuilderFlag.INT8"),
        ("8.6.1", False, {"INT8", "FP16"}, False, "too old"),
        ("10.0.1", False, {"INT8"}, False, "no strongly typed"),
    ],
)
def test_plan_build_refuses_impossible_combinations(version, has_st, flags, legacy, match):
    with pytest.raises(ValueError, match=match):
        T.plan_build(version, has_strongly_typed=has_st, builder_flags=flags, fp16_fallback=False, legacy_weak_typing=legacy)


def test_version_tuple():
    assert T.version_tuple("10.3.0.26") == (10, 3, 0, 26)
    assert T.version_tuple("11.1.0.post1") == (11, 1, 0)
    with pytest.raises(ValueError):
        T.version_tuple("dev")


def test_profile_shapes_vary_batch_only():
    cfg = EngineConfig(batch_min=1, batch_opt=16, batch_max=64)
    assert T.profile_shapes("x", (-1, 3, 32, 32), cfg) == ((1, 3, 32, 32), (16, 3, 32, 32), (64, 3, 32, 32))
    assert T.profile_shapes("x", (8, 3, 32, 32), cfg) is None
    with pytest.raises(ValueError, match="input 'x'.*dynamic non-batch"):
        T.profile_shapes("x", (-1, 3, -1, 32), cfg)
    with pytest.raises(ValueError, match="batch_min <= batch_opt <= batch_max"):
        T.profile_shapes("x", (-1, 3), EngineConfig(batch_min=4, batch_opt=2, batch_max=8))


def test_batch_slices_cover_every_row_once():
    for n, m in [(0, 4), (1, 4), (4, 4), (10, 4), (257, 256)]:
        s = T.batch_slices(n, m)
        rows = np.concatenate([np.arange(n)[sl] for sl in s]) if s else np.array([], int)
        assert rows.tolist() == list(range(n)) and all(sl.stop - sl.start <= m for sl in s)
    with pytest.raises(ValueError):
        T.batch_slices(3, 0)


def test_parser_errors_are_surfaced_with_their_messages():
    msg = T.format_parser_errors(["In node 3 (importQuantizeLinear): zero point must be 0"], "m.onnx")
    assert "m.onnx" in msg and "zero point must be 0" in msg and "explicit `axis`" in msg


# ----------------------------------------------------------------------------- layer precisions

# Inspector JSON in the documented kDETAILED shape (TensorRT developer guide, "Engine Inspector").
INSPECTOR_JSON = {
    "Layers": [
        {"Name": "Reformatting CopyNode for Input Tensor 0 to conv", "LayerType": "Reformat",
         "Inputs": [{"Name": "x", "Format/Datatype": "Row major linear FP32"}],
         "Outputs": [{"Name": "r", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}]},
        {"Name": "conv + relu", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "r", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
         "Outputs": [{"Name": "c", "Format/Datatype": "Row major linear FP32"}]},
        {"Name": "softmax", "LayerType": "Softmax",
         "Inputs": [{"Name": "c", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
         "Outputs": [{"Name": "s", "Format/Datatype": "Row major linear FP16 format"}]},
        {"Name": "gap", "LayerType": "Reduce",
         "Inputs": [{"Name": "s", "Format/Datatype": "Float"}], "Outputs": [{"Name": "y", "Format/Datatype": "Float"}]},
        {"Name": "shape math", "LayerType": "ElementWise",
         "Inputs": [{"Name": "d", "Format/Datatype": "Int32"}], "Outputs": [{"Name": "e", "Format/Datatype": "Int32"}]},
    ],
    "Bindings": ["x", "y"],
}


def test_summarize_layers_counts_int8_and_names_float_layers():
    s = T.summarize_layers(json.dumps(INSPECTOR_JSON))
    assert (s.int8, s.fp16, s.fp32, s.other) == (1, 1, 1, 1)
    assert s.float_layers == ("softmax", "gap")
    assert s.to_dict()["float_layers"] == ["softmax", "gap"]


def test_summarize_layers_explains_missing_detail():
    with pytest.raises(ValueError, match="ProfilingVerbosity.DETAILED"):
        T.summarize_layers({"Layers": ["conv + relu", "softmax"]})
    dyn = {"Layers": [{"Name": "conv", "LayerType": "CaskConvolution", "Inputs": [{"Format/Datatype": "N/A due to dynamic shapes"}]}]}
    with pytest.raises(ValueError, match="input shapes are set"):
        T.summarize_layers(dyn)


INSPECTOR_SAMPLES = Path(__file__).parent / "data" / "trt_inspector"  # SOURCES.md there says where each came from


def test_summarize_layers_reads_a_recorded_engine_in_the_10x_schema():
    text = (INSPECTOR_SAMPLES / "trex_resnet_qat_residual_a100.graph.json").read_text()
    assert '"Format/Datatype"' in text and '"Datatype"' not in text.replace('"Format/Datatype"', "")
    s = T.summarize_layers(text)
    # 26 layers: 3 Reformat + 1 NoOp left out, 20 CaskConvolution + 1 ConvActPool on INT8, 1 FP32 pooling
    assert (s.int8, s.fp16, s.fp32, s.other) == (21, 0, 1, 0)
    assert s.float_layers == ("GlobalAveragePool_294",)


def test_summarize_layers_reads_the_11x_schema_with_split_fields():
    data = json.loads((INSPECTOR_SAMPLES / "schema11_from_migration_guide.json").read_text())
    assert "Bindings" not in data and all("Format/Datatype" not in t for ly in data["Layers"] for t in ly["Inputs"])
    s = T.summarize_layers(data)
    assert (s.int8, s.fp16, s.fp32, s.other) == (2, 2, 1, 0)
    assert s.float_layers == ("GlobalAveragePool_294", "fc.weight + QuantizeLinear_303 + Gemm_305", "softmax")


@pytest.mark.parametrize("tensor", [{"Name": "x"}, {"Name": "x", "Format": "Row major linear FP32 format (kLINEAR)"},
                                    {"Name": "x", "Datatype": ""}])
def test_summarize_layers_refuses_a_schema_without_type_fields(tensor):
    data = {"Layers": [{"Name": "conv", "LayerType": "CaskConvolution", "Inputs": [tensor], "Outputs": [tensor]}]}
    with pytest.raises(ValueError, match="layer 'conv' has tensors without a type field.*Datatype, DataType, Format/Datatype"):
        T.summarize_layers(data)


def test_summarize_layers_type_names_of_both_schemas():
    def one(text: str) -> tuple[int, int, int, int]:
        s = T.summarize_layers({"Layers": [{"Name": "l", "LayerType": "X", "Inputs": [{"Datatype": text}]}]})
        return s.int8, s.fp16, s.fp32, s.other

    assert one("Int8") == one("Row major Int8 format") == (1, 0, 0, 0)
    assert one("Half") == one("BFloat16") == one("Channel major FP16 format where channel % 8 == 0") == (0, 1, 0, 0)
    assert one("Float") == one("Row major linear FP32") == (0, 0, 1, 0)
    assert one("FP8") == one("UInt8") == one("Int32") == one("Int4") == (0, 0, 0, 1)


# ----------------------------------------------------------------------------- tensor addresses


def test_batch_chunks_are_copied_to_256_byte_aligned_addresses():
    import torch

    x = torch.arange(10 * 3 * 5 * 5, dtype=torch.float32).reshape(10, 3, 5, 5)  # 300 bytes per row
    chunk = x[1:4]  # a view 300 bytes into x: .contiguous() keeps it there
    assert chunk.is_contiguous() and chunk.contiguous().data_ptr() == chunk.data_ptr()
    assert not T.is_aligned(chunk.data_ptr())  # torch's CPU allocator aligns x to 64 bytes; 300 % 64 != 0
    out = T.aligned_tensor(chunk)
    assert T.is_aligned(out.data_ptr()) and out.data_ptr() != chunk.data_ptr()
    assert torch.equal(out, chunk) and out.is_contiguous() and out.dtype == chunk.dtype
    assert T.aligned_tensor(out).data_ptr() == out.data_ptr()  # aligned and contiguous: no copy
    strided = x[:, 0]  # not contiguous
    assert torch.equal(T.aligned_tensor(strided), strided) and T.is_aligned(T.aligned_tensor(strided).data_ptr())
    for dtype in (torch.float16, torch.int8, torch.float64):
        e = T.aligned_empty((7, 3), dtype, "cpu")
        assert T.is_aligned(e.data_ptr()) and e.shape == (7, 3) and e.dtype == dtype


def test_is_aligned():
    assert T.TENSOR_ALIGNMENT == 256
    assert T.is_aligned(0) and T.is_aligned(512) and not T.is_aligned(300) and not T.is_aligned(128)
    assert T.is_aligned(128, alignment=64)


# ----------------------------------------------------------------------------- installing TensorRT


def test_tensorrt_wheel_follows_torch_cuda_and_the_driver():
    from qfold.engine.trt_install import tensorrt_wheel

    assert tensorrt_wheel("12.8", "12.9") == tensorrt_wheel("12.1", None) == "tensorrt-cu12"
    assert tensorrt_wheel("13.0", "13.0") == "tensorrt-cu13"
    with pytest.raises(ValueError, match="driver supports CUDA 12.4 but torch needs CUDA 13"):
        tensorrt_wheel("13.0", "12.4")
    with pytest.raises(ValueError, match="CPU build"):
        tensorrt_wheel(None, "13.0")
    with pytest.raises(ValueError, match="CUDA 11.8"):
        tensorrt_wheel("11.8", "12.0")


def test_install_hint_names_the_checkout_install_and_nvidias_index():
    from qfold.engine.trt_install import (
        INSTALL_COMMAND,
        INSTALL_COMMAND_CU12,
        INSTALL_HINT,
    )

    assert INSTALL_COMMAND == 'pip install -e ".[tensorrt]" --extra-index-url https://pypi.nvidia.com'
    assert INSTALL_COMMAND_CU12 == "pip install -e . tensorrt-cu12 --extra-index-url https://pypi.nvidia.com"
    assert INSTALL_COMMAND in INSTALL_HINT and INSTALL_COMMAND_CU12 in INSTALL_HINT and "--backend onnxruntime" in INSTALL_HINT
    assert "qfold[tensorrt]" not in INSTALL_HINT.replace('".[tensorrt]"', "")
    import tomllib

    extra = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.replace(" ", "").startswith("tensorrt>=10") for r in extra["tensorrt"])


# ----------------------------------------------------------------------------- backend check before any work


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here, so the missing-package path cannot run")
def test_require_backend_refuses_tensorrt_without_it_and_accepts_onnxruntime():
    from qfold.engine import require_backend
    from qfold.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="--backend onnxruntime"):
        require_backend("tensorrt")
    require_backend("onnxruntime")
    with pytest.raises(ValueError, match="known backends"):
        require_backend("tvm")


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here, so the missing-package path cannot run")
def test_run_ptq_checks_the_backend_before_any_work(tmp_path):
    import torch

    from qfold.config import PTQConfig
    from qfold.errors import BackendUnavailableError
    from qfold.pipeline import run_ptq

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU()).eval()
    cfg = PTQConfig().replace(engine={"backend": "tensorrt"})
    with pytest.raises(BackendUnavailableError, match="--backend onnxruntime"):
        run_ptq(model, torch.randn(4, 1, 8, 8), config=cfg, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here, so the missing-package path cannot run")
def test_cli_ptq_with_tensorrt_missing_exits_2_before_any_work(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).parents[2]
    code = "import sys; from qfold.cli import main; sys.exit(main())"
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", code, "ptq", "--example", "--backend", "tensorrt", "--out", str(out)],
                       capture_output=True, text=True, cwd=root, env={**__import__("os").environ, "PYTHONPATH": str(root)},
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qfold ptq: error: TensorRT is not installed")
    assert "--backend onnxruntime" in lines[0] and "--extra-index-url https://pypi.nvidia.com" in lines[0]
    assert not out.exists()  # nothing folded, calibrated or written


# ----------------------------------------------------------------------------- files and metadata


def _info(plan: bytes, name: str = "m.plan") -> EngineInfo:
    return EngineInfo(
        backend="tensorrt", engine_path=name, onnx_sha256="ab" * 32, engine_sha256=T.sha256_bytes(plan), versions={"tensorrt": "11.1.0"},
        extra={"gpu": "NVIDIA H100", "compute_capability": "9.0", "layers": {"int8": 3}},
    )


def test_engine_and_metadata_round_trip_byte_identical(tmp_path):
    plan = bytes(range(256)) * 8
    a, b = tmp_path / "a" / "m.plan", tmp_path / "b" / "m.plan"
    T.write_engine(a, plan, _info(plan))
    T.write_engine(b, plan, _info(plan))
    assert T.metadata_path(a).name == "m.plan.json" and T.timing_cache_path(a).name == "m.plan.timing.cache"
    assert T.metadata_path(a).read_bytes() == T.metadata_path(b).read_bytes()
    got_plan, got_info = T.read_engine(a)
    assert got_plan == plan and got_info == _info(plan)
    assert sorted(p.name for p in a.parent.iterdir()) == ["m.plan", "m.plan.json"]  # no temporary files left


def test_write_engine_refuses_metadata_of_another_plan_and_keeps_old_files(tmp_path):
    old = b"old plan"
    path = tmp_path / "m.plan"
    T.write_engine(path, old, _info(old))
    with pytest.raises(ValueError, match="engine_sha256"):
        T.write_engine(path, b"new plan", _info(old))
    assert T.read_engine(path)[0] == old
    path.write_bytes(b"tampered")
    with pytest.raises(ValueError, match="sha256 differs"):
        T.read_engine(path)
    with pytest.raises(FileNotFoundError, match="build the engine first"):
        T.read_engine(tmp_path / "absent.plan")


def test_check_compatible_names_both_sides():
    info = _info(b"p")
    T.check_compatible(info, "11.1.0", "9.0")
    with pytest.raises(ValueError, match=r"TensorRT 11\.1\.0 for compute capability 9\.0.*TensorRT 10\.3\.0 and compute capability 8\.6"):
        T.check_compatible(info, "10.3.0", "8.6")


def test_sha256_file_matches_bytes(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"x" * (3 << 20))
    assert T.sha256_file(p) == T.sha256_bytes(b"x" * (3 << 20))


# ----------------------------------------------------------------------------- ONNX preparation


def test_prepare_onnx_passes_the_file_through_or_converts_it_to_fp16(tmp_path):
    path = tmp_path / "m.onnx"
    _qdq_conv_model(path)
    assert T.prepare_onnx(path, fp16=False) == path.read_bytes()
    m16 = onnx.load_from_string(T.prepare_onnx(path, fp16=True))
    assert m16.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert {i.name: i.data_type for i in m16.graph.initializer}["W"] == TensorProto.FLOAT16
    assert T.prepare_onnx(path, fp16=True) == T.prepare_onnx(path, fp16=True)  # deterministic
    x = np.random.default_rng(1).uniform(-3, 3, (4, 4, 8, 8)).astype(np.float32)
    y32, y16 = _ort(path.read_bytes(), x), _ort(m16.SerializeToString(), x)
    assert np.abs(y16 - y32).max() <= 0.02 * np.abs(y32).max()
    with pytest.raises(FileNotFoundError, match="export the Q/DQ ONNX first"):
        T.prepare_onnx(tmp_path / "nope.onnx", fp16=False)


# ----------------------------------------------------------------------------- TensorRT + CUDA


@pytest.mark.tensorrt
@pytest.mark.parametrize("fp16_fallback", [False, True])
def test_engine_matches_onnxruntime(tmp_path, fp16_fallback):
    onnx_path, plan = tmp_path / "m.onnx", tmp_path / "m.plan"
    _qdq_conv_model(onnx_path)
    cfg = EngineConfig(backend="tensorrt", batch_min=1, batch_opt=4, batch_max=8, workspace_mib=256, fp16_fallback=fp16_fallback)
    info = T.BACKEND.build(onnx_path, plan, cfg)
    assert plan.is_file() and T.metadata_path(plan).is_file() and T.timing_cache_path(plan).is_file()
    assert info.onnx_sha256 == T.sha256_file(onnx_path) and info.extra["profiles"]["x"][2] == [8, 4, 8, 8]
    assert info.extra["layers"]["int8"] >= 1
    assert info.extra["cleared_builder_flags"] == ["TF32"] and info.extra["tf32"] is False
    engine = T.BACKEND.load(plan, cfg)
    x = np.random.default_rng(2).uniform(-3, 3, (11, 4, 8, 8)).astype(np.float32)  # 11 > batch_max: chunked
    y = engine.run(x)
    ref = _ort(onnx_path.read_bytes(), x)
    assert y.shape == ref.shape and y.dtype == np.float32
    # a GPU int8 conv may round an output differently than ORT's reference; bound by one output step
    assert np.abs(y - ref).max() <= 0.02 * np.abs(ref).max()
    T.BACKEND.build(onnx_path, plan, cfg)  # second build reuses the timing cache written by the first
    assert T.read_engine(plan)[1].extra["timing_cache"] == "m.plan.timing.cache"


@pytest.mark.tensorrt
def test_parse_failure_carries_tensorrt_messages(tmp_path):
    m = _qdq_conv_model()
    for init in m.graph.initializer:
        if init.name == "sx":
            init.CopyFrom(numpy_helper.from_array(np.array(-0.1, np.float32), "sx"))  # negative scale
    path = tmp_path / "bad.onnx"
    onnx.save(m, str(path))
    with pytest.raises(T.EngineBuildError, match="bad.onnx"):
        T.BACKEND.build(path, tmp_path / "bad.plan", EngineConfig(backend="tensorrt", batch_opt=1, batch_max=2))
    assert not (tmp_path / "bad.plan").exists()


@pytest.mark.tensorrt
def test_misaligned_batch_chunks_are_copied_and_match_onnxruntime(tmp_path):
    import torch

    onnx_path, plan = tmp_path / "m.onnx", tmp_path / "m.plan"
    _qdq_conv_model(onnx_path, hw=7)  # 4*7*7 float32 = 784 bytes a row: chunks start off 256-byte boundaries
    cfg = EngineConfig(backend="tensorrt", batch_min=1, batch_opt=4, batch_max=8, workspace_mib=256)
    T.BACKEND.build(onnx_path, plan, cfg)
    engine = T.BACKEND.load(plan, cfg)
    x = np.random.default_rng(3).uniform(-3, 3, (12, 4, 7, 7)).astype(np.float32)
    xg = torch.from_numpy(x).cuda()
    assert not T.is_aligned(xg[8:].data_ptr()) and not T.is_aligned(xg[1:].data_ptr())
    y = engine.run_torch(xg[1:]).float().cpu().numpy()  # chunks at rows 1 and 9 of xg: both misaligned
    ref = _ort(onnx_path.read_bytes(), x[1:])
    assert np.abs(y - ref).max() <= 0.02 * np.abs(ref).max()


# ----------------------------------------------------------------------------- the GPU check script


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None,
                    reason="an NVIDIA driver is present: the script would install packages and run the full GPU check")
def test_gpu_check_without_a_gpu_fails_with_one_line_before_installing_anything(tmp_path):
    import subprocess

    root = Path(__file__).parents[2]
    for args, phrase in ((["--require-tensorrt"], "TensorRT not verified"), ([], "TensorRT not verified"),
                         (["--no-require-tensorrt"], "nothing to check")):
        out = tmp_path / "-".join(args or ["default"])
        r = subprocess.run(["bash", str(root / "tools" / "gpu_check.sh"), *args, str(out)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.strip().splitlines() == [f"no NVIDIA GPU (nvidia-smi missing or failing): {phrase}"]
        assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log"]  # no pip log: nothing was installed


def test_trtexec_gpu_compute_line_is_parsed():
    import importlib.util

    spec = importlib.util.spec_from_file_location("trt_check", Path(__file__).parents[2] / "tools" / "trt_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # the line as samples/common/sampleReporting.cpp (printEpilog) prints it, behind trtexec's log prefix
    log = ("[12/01/2026-15:00:00] [I] Enqueue Time: min = 0.01 ms, max = 0.2 ms, mean = 0.02 ms, median = 0.02 ms\n"
           "[12/01/2026-15:00:00] [I] GPU Compute Time: min = 0.412 ms, max = 0.61 ms, mean = 0.4305 ms, "
           "median = 0.4281 ms, percentile(90%) = 0.44 ms, percentile(95%) = 0.45 ms, percentile(99%) = 0.5 ms\n")
    assert mod.parse_trtexec_gpu_compute(log) == {"min_ms": 0.412, "max_ms": 0.61, "mean_ms": 0.4305, "median_ms": 0.4281}
    assert mod.parse_trtexec_gpu_compute("[I] Latency: min = 1 ms, max = 2 ms, mean = 1 ms, median = 1 ms") is None
