"""Property test: folded == unfolded (eval mode) over 360 seeded random layer configurations.

Each configuration draws the layer (Conv/ConvTranspose 1-3d, Linear 2-D, Linear 3-D through a
transpose, BN before an unpadded Conv or a Linear), groups (depthwise included), bias, stride,
dilation, padding and padding mode, the BatchNorm flavour (module, SyncBatchNorm, frozen,
``F.batch_norm``), affine or not, running statistics or not, dtype and memory format; BatchNorm
statistics are realistic (:func:`models.randomize_bn`). fp32/fp64: max relative error <= 1e-5.
fp16/bf16: the folded model may be no further from the float64 truth than the unfolded one allows.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from models import (
    FrozenBatchNorm2d,
    FunctionalBN,
    bn_modules,
    max_rel_err,
    randomize_bn,
)

from qfold.fold.passes import fold_batchnorm

N_CONFIGS = 360
LAYERS = ("conv", "convT", "linear", "linear3d", "before_conv", "before_linear")
DTYPES = (torch.float32,) * 6 + (torch.float64, torch.float16, torch.bfloat16, torch.float16, torch.bfloat16)
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@dataclass(frozen=True)
class Cfg:
    layer: str
    dims: int
    groups: int
    cin_g: int
    cout_g: int
    kernel: int
    stride: int
    dilation: int
    padding: int | str
    padding_mode: str
    output_padding: int
    bias: bool
    bn: str  # module | sync | frozen | functional
    affine: bool
    stats: bool  # track_running_stats
    dtype: torch.dtype
    channels_last: bool
    swap: str  # linear3d: transpose | permute
    give_inputs: bool
    seed: int


def _draw(r: random.Random, seed: int) -> Cfg:
    layer = r.choice(LAYERS)
    dims = r.choice((1, 2, 3)) if layer in ("conv", "convT", "before_conv") else 1
    groups = r.choice((1, 1, 2, 3))
    cin_g = 1 if r.random() < 0.3 else r.choice((1, 2, 3))  # cin_g == 1 and groups > 1: depthwise
    kernel = r.choice((1, 2, 3))
    stride = r.choice((1, 2))
    dilation = r.choice((1, 2)) if kernel > 1 else 1
    padding: int | str = 0 if layer == "before_conv" else r.choice((0, 1, 2))
    if layer == "conv" and stride == 1 and r.random() < 0.2:
        padding = "same"
    padding_mode = r.choice(("zeros", "zeros", "reflect", "replicate", "circular")) if layer == "conv" else "zeros"
    output_padding = r.choice((0, stride - 1)) if layer == "convT" else 0
    bn = r.choice(("module", "module", "sync", "functional") + (("frozen",) if dims == 2 and layer != "linear3d" else ()))
    if layer in ("linear", "linear3d", "before_linear"):
        bn = r.choice(("module", "module", "sync", "functional"))
    dtype = r.choice(DTYPES)
    return Cfg(
        layer, dims, groups if layer in ("conv", "convT", "before_conv") else 1, cin_g, r.choice((1, 2, 3)),
        kernel, stride, dilation, padding, padding_mode, output_padding, r.random() < 0.5, bn,
        bn != "frozen" and r.random() < 0.8, bn in ("frozen", "functional") or r.random() < 0.93, dtype,
        dims >= 2 and layer in ("conv", "convT", "before_conv") and r.random() < 0.4,
        r.choice(("transpose", "permute")), r.random() < 0.5, seed,
    )  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


CONFIGS = [_draw(random.Random(1000 + i), 1000 + i) for i in range(N_CONFIGS)]


class _Lin3d(nn.Module):
    def __init__(self, fc: nn.Linear, bn: nn.Module, swap: str) -> None:
        super().__init__()
        self.fc, self.bn, self.swap = fc, bn, swap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return self.bn(y.transpose(1, 2) if self.swap == "transpose" else y.permute(0, 2, 1))


def _bn(cfg: Cfg, n: int) -> nn.Module:
    eps = (1e-5, 1e-3, 0.1)[cfg.seed % 3]
    if cfg.bn == "frozen":
        return FrozenBatchNorm2d(n, eps)
    if cfg.bn == "functional":
        return FunctionalBN(n, eps, affine=cfg.affine)
    if cfg.bn == "sync":
        return nn.SyncBatchNorm(n, eps, affine=cfg.affine, track_running_stats=cfg.stats)
    cls = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[cfg.dims - 1]
    return cls(n, eps, affine=cfg.affine, track_running_stats=cfg.stats)


def _build(cfg: Cfg) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(cfg.seed)
    c_in, c_out = cfg.groups * cfg.cin_g, cfg.groups * cfg.cout_g
    spatial = [7 if cfg.dims < 3 else 5] * cfg.dims
    if cfg.layer in ("conv", "before_conv"):
        conv_cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[cfg.dims - 1]
        conv = conv_cls(c_in, c_out, cfg.kernel, cfg.stride, cfg.padding, cfg.dilation, cfg.groups, cfg.bias, cfg.padding_mode)
        model = nn.Sequential(conv, _bn(cfg, c_out)) if cfg.layer == "conv" else nn.Sequential(_bn(cfg, c_in), conv)
    elif cfg.layer == "convT":
        cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[cfg.dims - 1]
        out_pad = cfg.output_padding if cfg.output_padding < max(cfg.stride, cfg.dilation) else 0
        conv = cls(c_in, c_out, cfg.kernel, cfg.stride, min(cfg.padding, cfg.kernel - 1), out_pad, cfg.groups, cfg.bias, cfg.dilation)
        model = nn.Sequential(conv, _bn(cfg, c_out))
    elif cfg.layer == "linear":
        model = nn.Sequential(nn.Linear(c_in + 2, c_out + 1, cfg.bias), _bn(cfg, c_out + 1))
        spatial = []
    elif cfg.layer == "before_linear":
        model = nn.Sequential(_bn(cfg, c_in + 2), nn.Linear(c_in + 2, c_out + 1, cfg.bias))
        spatial = []
    else:  # linear3d: x is (N, L, F)
        model = _Lin3d(nn.Linear(c_in + 2, c_out + 1, cfg.bias), _bn(cfg, c_out + 1), cfg.swap)
    randomize_bn(model, cfg.seed)
    model = model.to(cfg.dtype).eval()
    if cfg.layer == "linear3d":
        x = torch.randn(2, 4, c_in + 2)
    elif cfg.layer in ("linear", "before_linear"):
        x = torch.randn(3, c_in + 2)
    else:
        x = torch.randn(2, c_in, *spatial)
    x = x.to(cfg.dtype)
    if cfg.channels_last:
        fmt = torch.channels_last if cfg.dims == 2 else torch.channels_last_3d
        model, x = model.to(memory_format=fmt), x.contiguous(memory_format=fmt)
    return model, x


def _expect_folded(cfg: Cfg) -> bool:
    if not cfg.stats:
        return False
    if cfg.layer == "linear3d" and cfg.swap == "transpose":  # transpose(1, 2) pins the rank only for BatchNorm1d
        return cfg.bn == "module" or cfg.give_inputs
    return True


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.seed}-{c.layer}{c.dims}d-g{c.groups}-{c.bn}-{str(c.dtype)[6:]}")
def test_fold_preserves_function(cfg: Cfg) -> None:
    model, x = _build(cfg)
    before = copy.deepcopy(model.state_dict())
    folded, report = fold_batchnorm(model, example_inputs=x if cfg.give_inputs else None)

    assert len(report.entries) == 1
    entry = report.entries[0]
    assert entry.status == ("folded" if _expect_folded(cfg) else "left"), entry
    if entry.status == "folded":
        assert bn_modules(folded) == [] and entry.into is not None
        assert entry.direction == ("before" if cfg.layer.startswith("before") else "after")
    for k, v in model.state_dict().items():  # the input model is untouched
        assert torch.equal(v, before[k]), k

    with torch.no_grad():
        y_ref, y = model(x), folded(x)
        assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
        if cfg.dtype in (torch.float32, torch.float64):
            assert max_rel_err(y, y_ref) <= 1e-5
        else:  # low precision: measure both against the float64 truth
            truth = copy.deepcopy(model).double()(x.double())
            err_unfolded, err_folded = max_rel_err(y_ref, truth), max_rel_err(y, truth)
            assert err_folded <= 4 * max(err_unfolded, EPS[cfg.dtype]), (err_folded, err_unfolded)


def test_configuration_space_is_covered() -> None:
    """The seeded draw reaches every layer, BN flavour, dtype, depthwise and channels_last."""
    assert len(CONFIGS) >= 300
    assert {c.layer for c in CONFIGS} == set(LAYERS)
    assert {c.bn for c in CONFIGS} == {"module", "sync", "frozen", "functional"}
    assert {c.dtype for c in CONFIGS} == set(DTYPES)
    assert any(c.groups > 1 and c.cin_g == 1 for c in CONFIGS if c.layer in ("conv", "convT"))
    assert any(c.channels_last and c.layer == "convT" for c in CONFIGS)
    assert any(not c.affine for c in CONFIGS) and any(not c.stats for c in CONFIGS)
    assert {c.dims for c in CONFIGS if c.layer == "convT"} == {1, 2, 3}
