"""Int8 output SQNR per architecture pattern: qfold vs ONNX Runtime quantize_static vs torch.ao.

    python tools/bench_arch_patterns.py            # 4 patterns x 3 tools, ~2 min on 2 cores
    python tools/bench_arch_patterns.py --seeds 3  # mean over 3 weight seeds

Patterns (models built here from the look-alike layers of ``tests/qfold/arch_models.py``):
hard-swish/hard-sigmoid squeeze-excitation (MobileNetV3), mixed-kernel grouped convs (MixNet),
deep aggregation trees (DLA), attention with BatchNorm1d (LeViT). Weights are random (seeded); the
BatchNorm statistics are set from data (cumulative average over the calibration images in train
mode), as a trained network's would be. Data: sklearn's ``load_digits`` (8x8 grey digits,
upsampled to 3x32x32, standardised): 512 calibration images, 512 held-out test images.

Every tool sees the same FP32 model, calibration images and test images:

* qfold: ``run_ptq`` defaults (fold, bound "preserve", max calibration, TensorRT-profile Q/DQ ONNX,
  rendered and run in ONNX Runtime);
* ORT: ``quantize_static`` on the FP32 ONNX (after ``quant_pre_process``), QDQ, MinMax, per-channel,
  symmetric int8 weights and activations;
* torch.ao: FX graph mode ``prepare_fx`` / ``convert_fx`` with the "x86" qconfig mapping.

SQNR = ``10*log10(sum ref^2 / sum (ref - out)^2)`` over the test outputs, ref = the FP32 PyTorch model.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "qfold"))
from arch_models import BatchNormAct2d, LeViTLike, MixedConv2d, SqueezeExcite  # noqa: E402


# ---------------------------------------------------------------- pattern models
class SEHardSwish(nn.Module):
    """MobileNetV3-small-like: hard-swish inverted residuals with hard-sigmoid SE gates."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        blocks = []
        for c_in, c_mid, c_out, s in [(16, 48, 24, 2), (24, 72, 24, 1), (24, 96, 40, 2)]:
            blocks.append(nn.ModuleDict({
                "pw": nn.Sequential(nn.Conv2d(c_in, c_mid, 1, bias=False), nn.BatchNorm2d(c_mid), nn.Hardswish()),
                "dw": nn.Sequential(nn.Conv2d(c_mid, c_mid, 3, s, 1, groups=c_mid, bias=False), nn.BatchNorm2d(c_mid), nn.Hardswish()),
                "se": SqueezeExcite(c_mid, c_mid // 4),
                "pwl": nn.Sequential(nn.Conv2d(c_mid, c_out, 1, bias=False), nn.BatchNorm2d(c_out)),
            }))
        self.blocks = nn.ModuleList(blocks)
        self.res = [c_in == c_out and s == 1 for c_in, _, c_out, s in [(16, 48, 24, 2), (24, 72, 24, 1), (24, 96, 40, 2)]]
        self.head = nn.Sequential(nn.Conv2d(40, 64, 1), nn.Hardswish())
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for b, res in zip(self.blocks, self.res):
            y = b["pwl"](b["se"](b["dw"](b["pw"](x))))
            x = x + y if res else y
        return self.fc(self.head(x).mean((2, 3)))


class MixNetLike(nn.Module):
    """MixNet-like: mixed-kernel depthwise convs (3/5/7) between 1x1 convs, BatchNormAct layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, 2, 1, bias=False)
        self.bn0 = BatchNormAct2d(24)
        layers = []
        for c_in, c_out in [(24, 32), (32, 32), (32, 48)]:
            layers += [nn.Conv2d(c_in, c_out * 2, 1, bias=False), BatchNormAct2d(c_out * 2),
                       MixedConv2d(c_out * 2), BatchNormAct2d(c_out * 2),
                       nn.Conv2d(c_out * 2, c_out, 1, bias=False), BatchNormAct2d(c_out, None)]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self.bn0(self.stem(x))).mean((2, 3)))


def _cbr(c_in: int, c_out: int, k: int = 3, s: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Root(nn.Module):
    """DLA aggregation node: concat of children, 1x1 conv, BN, (residual), ReLU."""

    def __init__(self, c_in: int, c_out: int, residual: bool) -> None:
        super().__init__()
        self.conv, self.bn, self.residual = nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), residual

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(torch.cat(xs, 1)))
        return F.relu(y + xs[0] if self.residual else y)


class Tree(nn.Module):
    """A two-level DLA tree: two basic blocks, aggregated, then again with a deeper branch."""

    def __init__(self, c_in: int, c: int) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.MaxPool2d(2), _cbr(c_in, c, 1))
        self.b1, self.b2 = nn.Sequential(_cbr(c_in, c, 3, 2), _cbr(c, c)), nn.Sequential(_cbr(c, c), _cbr(c, c))
        self.root1 = Root(2 * c, c, True)
        self.b3 = nn.Sequential(_cbr(c, c), _cbr(c, c))
        self.root2 = Root(3 * c, c, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.b1(x) + self.down(x)
        b = self.b2(a)
        r1 = self.root1(b, a)
        return self.root2(self.b3(r1), r1, a)


class DLALike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = _cbr(3, 16)
        self.level1 = Tree(16, 32)
        self.level2 = Tree(32, 64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.level2(self.level1(self.base(x))).mean((2, 3)))


PATTERNS = {
    "se-hardswish (MobileNetV3)": SEHardSwish,
    "mixed-kernel (MixNet)": MixNetLike,
    "deep aggregation (DLA)": DLALike,
    "attention + BatchNorm1d (LeViT)": lambda: LeViTLike(32),
}


# ---------------------------------------------------------------- data and tools
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images).float()[:, None]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(x), generator=gen)
    return x[idx[:512]].contiguous(), x[idx[512:1024]].contiguous()


@torch.no_grad()
def build(make, seed: int, calib: torch.Tensor) -> nn.Module:
    torch.manual_seed(seed)
    model = make()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)
    model.train()
    for i in range(0, len(calib), 64):
        model(calib[i : i + 64])
    return model.eval()


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    return float(10 * np.log10((ref**2).sum() / max(((ref - out) ** 2).sum(), 1e-30)))


def qfold_sqnr(model: nn.Module, calib: torch.Tensor, test: torch.Tensor, ref: np.ndarray, work: Path) -> float:
    from qfold.config import PTQConfig
    from qfold.pipeline import run_ptq

    res = run_ptq(model, calib, test, config=PTQConfig(progress=False).replace(eval={"plots": False}), out_dir=work / "qfold")
    return float(res.accuracy.stages["engine"].sqnr_db)


def ort_sqnr(model: nn.Module, calib: torch.Tensor, test: torch.Tensor, ref: np.ndarray, work: Path) -> float:
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32, pre, out = work / "fp32.onnx", work / "pre.onnx", work / "ort.onnx"
    torch.onnx.export(model, (calib[:1],), str(fp32), input_names=["input"], output_names=["out"],
                      dynamic_axes={"input": {0: "n"}, "out": {0: "n"}}, opset_version=17, dynamo=False)
    quant_pre_process(str(fp32), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": calib[i : i + 64].numpy()} for i in range(0, len(calib), 64)])

        def get_next(self) -> dict | None:
            return next(self.it, None)

    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return sqnr_db(ref, sess.run(None, {"input": test.numpy()})[0])


def torchao_sqnr(model: nn.Module, calib: torch.Tensor, test: torch.Tensor, ref: np.ndarray, work: Path) -> float:
    import copy

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    with torch.no_grad():
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), example_inputs=(calib[:1],))
        for i in range(0, len(calib), 64):
            prepared(calib[i : i + 64])
        q = convert_fx(prepared)
        return sqnr_db(ref, q(test).numpy())


TOOLS = {"qfold": qfold_sqnr, "ORT quantize_static": ort_sqnr, "torch.ao": torchao_sqnr}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--patterns", nargs="*", default=list(PATTERNS))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    calib, test = digits()
    rows = []
    for name in args.patterns:
        scores: dict[str, list[float]] = {t: [] for t in TOOLS}
        for seed in range(args.seeds):
            model = build(PATTERNS[name], seed, calib)
            with torch.no_grad():
                ref = model(test).numpy()
            for tool, fn in TOOLS.items():
                with tempfile.TemporaryDirectory() as d:
                    try:
                        scores[tool].append(fn(model, calib, test, ref, Path(d)))
                    except Exception as exc:  # noqa: BLE001 - a tool failing on a pattern is a result
                        print(f"{name} / {tool}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
                        scores[tool].append(float("nan"))
        rows.append((name, {t: float(np.mean(v)) for t, v in scores.items()}))
        print(name, {t: round(float(np.mean(v)), 2) for t, v in scores.items()}, flush=True)
    print()
    print("| pattern | " + " | ".join(f"{t} SQNR (dB)" for t in TOOLS) + " |")
    print("|---|" + "---|" * len(TOOLS))
    for name, s in rows:
        print(f"| {name} | " + " | ".join(f"{s[t]:.1f}" for t in TOOLS) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
