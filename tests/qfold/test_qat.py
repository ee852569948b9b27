"""QAT: simulated BN fold, STE/LSQ quantizers, schedule, state_dict resume, DDP, autocast, export."""
from __future__ import annotations

import copy
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from calib.spec import INT8_WEIGHT_AXIS0, fake_quant_ref
from qfold.capture import trace
from qfold.fold import formulas as fold_math
from qfold.qat import formulas as qat_math
from qfold.qat import (
    passes as qat,  # the package re-exports the public API; tests also read private state
)
from qfold.qat.deploy import export as qat_export
from qfold.qat.modules import ConvBn, QATActQuant, QuantConvBn
from qfold.quant import plan_quantization, prepare_fake_quant
from qfold.quant.prepare import act_quantizers, quant_layers, quantization_disabled

torch.set_num_threads(1)


class TinyNet(nn.Module):
    """Digits (1x8x8): conv-BN-ReLU stem, depthwise, linear bottleneck + residual add, concat, 1x1, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0, self.r0 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        self.dw, self.bn1, self.r1 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        self.pw, self.bn2 = nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16)
        self.mix, self.bn3, self.r3 = nn.Conv2d(32, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.r0(self.bn0(self.stem(x)))
        h2 = h + self.bn2(self.pw(self.r1(self.bn1(self.dw(h)))))
        out = self.r3(self.bn3(self.mix(torch.cat([h, h2], 1))))
        return self.fc(torch.flatten(self.pool(out), 1))


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]  # train, test (397)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int = 0, step_fn=None) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 50):
            idx = perm[i : i + 50]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step_fn is not None:
                step_fn(model)


@pytest.fixture(scope="module")
def trained(digits) -> nn.Module:
    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = TinyNet()
    _train(model, xtr, ytr, epochs=4, lr=1e-2)
    return model.train()


@torch.no_grad()
def _acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    out = float((model(x).argmax(1) == y).float().mean())
    model.train(was)
    return out


# ----------------------------------------------------------------------------------- pure math
@settings(max_examples=30, deadline=None)
@given(c=st.integers(1, 6), bias=st.booleans(), affine=st.booleans(), dims=st.sampled_from([1, 2, 3]), seed=st.integers(0, 999))
def test_fold_formulas_match_fold_math(c, bias, affine, dims, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, 3, *([2] * dims), generator=g)
    b = torch.randn(c, generator=g) if bias else None
    mean, var = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.1
    gamma = torch.randn(c, generator=g) if affine else None
    beta = torch.randn(c, generator=g) if affine else None
    sf = qat_math.fold_scale(gamma, var, 1e-5)
    a, cc = fold_math.bn_affine(mean, var, 1e-5, gamma, beta)
    w_ref, b_ref = fold_math.fold_affine_after(w, b, a, cc)
    torch.testing.assert_close(qat_math.fold_weight(w, sf), w_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(qat_math.fold_bias(b, mean, sf, beta), b_ref, rtol=1e-5, atol=1e-5)


def test_lsq_matches_torch_learnable_fake_quant():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 8, 5, 5, generator=g) * 3).requires_grad_()
    amax = torch.tensor(4.0, requires_grad=True)
    y = qat_math.lsq_fake_quant(x, amax, -128, 127)
    upstream = torch.randn(y.shape, generator=g)
    (y * upstream).sum().backward()
    # reference: torch's LSQ kernel, parameterised by the scale s = amax / 127
    x2 = x.detach().clone().requires_grad_()
    s = (amax.detach() / 127).reshape(1).requires_grad_()
    zp = torch.zeros(1)
    factor = 1.0 / (x.numel() * 127) ** 0.5
    y2 = torch._fake_quantize_learnable_per_tensor_affine(x2, s, zp, -128, 127, factor)
    (y2 * upstream).sum().backward()
    torch.testing.assert_close(y, y2, rtol=0, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(amax.grad.reshape(1), s.grad / 127, rtol=1e-4, atol=1e-6)
    # and the forward is TensorRT's: round half to even, clamp, scale = amax/127
    ref = fake_quant_ref(x.detach().numpy(), 4.0)
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=0, atol=1e-5)


def test_tracked_quantizer_gradient_is_straight_through():
    q = QATActQuant(momentum=0.0)
    q.set_amax(2.0)
    x = torch.linspace(-4, 4, 101, requires_grad=True)
    q(x).sum().backward()
    inside = (x.detach().abs() <= 2.0 * 128 / 127 - 1e-6) & (x.detach() <= 2.0)
    assert torch.equal(x.grad, inside.float())


# ------------------------------------------------------------------------ simulated BN folding
def _pair(dims: int, groups: int, bias: bool, affine: bool, momentum: float | None, seed: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dims - 1](4, 6, 3, padding=1, groups=groups, bias=bias)
    bn = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d][dims - 1](6, affine=affine, momentum=momentum)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        if affine:
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
    return conv, bn


@settings(max_examples=25, deadline=None)
@given(dims=st.sampled_from([1, 2, 3]), groups=st.sampled_from([1, 2]), bias=st.booleans(), affine=st.booleans(),
       momentum=st.sampled_from([None, 0.1]), seed=st.integers(0, 999))
def test_quant_convbn_without_quantization_is_the_float_conv_bn(dims, groups, bias, affine, momentum, seed):
    conv, bn = _pair(dims, groups, bias, affine, momentum, seed)
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    m = QuantConvBn(ConvBn(conv, bn))
    m.enabled.fill_(False)
    x = torch.randn(3, 4, *([5] * dims))
    for _ in range(2):  # training: batch statistics, running statistics updated the same way
        torch.testing.assert_close(m.train()(x), ref_bn.train()(ref_conv(x)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == 2
    torch.testing.assert_close(m.eval()(x), ref_bn.eval()(ref_conv(x)), rtol=1e-4, atol=1e-4)
    m.train().bn_frozen.fill_(True)  # frozen: running statistics, not updated
    before = bn.running_mean.clone()
    torch.testing.assert_close(m(x), ref_bn.eval()(ref_conv(x)), rtol=1e-4, atol=1e-4)
    assert torch.equal(bn.running_mean, before)


def test_quant_convbn_eval_is_the_folded_fake_quant_conv():
    conv, bn = _pair(2, 1, True, True, 0.1, 3)
    m = QuantConvBn(ConvBn(conv, bn)).eval()
    x = torch.randn(2, 4, 6, 6)
    a, c = fold_math.bn_affine(bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    w, b = fold_math.fold_affine_after(conv.weight, conv.bias, a, c)
    amax = w.detach().abs().reshape(6, -1).amax(1).numpy()
    wq = fake_quant_ref(w.detach().numpy(), amax, INT8_WEIGHT_AXIS0)
    ref = F.conv2d(x.double(), torch.from_numpy(wq), b.double(), padding=1)
    torch.testing.assert_close(m(x).double(), ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------- prepare
def test_prepare_shares_parameters_so_an_earlier_optimizer_keeps_training(trained, digits):
    xtr, ytr, _, _ = digits
    model = copy.deepcopy(trained)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built BEFORE prepare
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    qm = qat.prepare(model, xtr[:200])
    assert {id(p) for p in qm.parameters()} == {id(p) for p in model.parameters()}
    assert [type(m) for m in model.modules()] == kinds  # the user's structure is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # prepare changed no value
    out0 = qm.eval()(xtr[:50]).detach()
    qm.train()
    F.cross_entropy(qm(xtr[:50]), ytr[:50]).backward()
    opt.step()
    qat.step(qm)
    assert not torch.equal(model.stem.weight, before["stem.weight"])
    assert not torch.equal(qm.eval()(xtr[:50]).detach(), out0)


def test_quantizers_sit_where_the_ptq_plan_puts_them(trained):
    from qfold.fold.passes import fold_batchnorm

    folded, _ = fold_batchnorm(copy.deepcopy(trained).eval())
    ptq = prepare_fake_quant(trace(folded), plan_quantization(trace(folded)))
    qm = qat.prepare(copy.deepcopy(trained))
    assert set(act_quantizers(qm)) == set(act_quantizers(ptq))
    assert set(quant_layers(qm)) == set(quant_layers(ptq)) == {"stem", "dw", "pw", "mix", "fc"}
    assert isinstance(quant_layers(qm)["dw"], QuantConvBn)
    conv = qat.convert(qat.prepare(copy.deepcopy(trained), torch.rand(8, 1, 8, 8)))
    assert [(n.op, str(n.target)) for n in conv.graph.nodes] == [(n.op, str(n.target)) for n in ptq.graph.nodes]


def test_calibration_initialises_amax_from_data(trained, digits):
    xtr = digits[0][:300]
    qm = qat.prepare(copy.deepcopy(trained), xtr)
    peaks: dict[str, float] = {}
    with quantization_disabled(qm):
        qm.eval()
        handles = [q.register_forward_pre_hook(lambda m, a, k=k: peaks.__setitem__(k, max(peaks.get(k, 0.0), float(a[0].abs().max()))))
                   for k, q in act_quantizers(qm).items()]
        try:
            with torch.no_grad():
                qm(xtr)
        finally:
            for h in handles:
                h.remove()
    groups = getattr(qm, qat._GROUPS_ATTR)
    assert groups == (("cat", "r0"),)  # the concat's inputs share one scale, as TensorRT requires
    expect = dict(peaks)
    for g in groups:
        expect.update({k: max(peaks[m] for m in g) for k in g})
    for k, q in act_quantizers(qm).items():
        assert float(q.amax) == pytest.approx(expect[k], rel=1e-6)


def test_bound_swap_replaces_relu_with_relu6(trained):
    qm = qat.prepare(copy.deepcopy(trained), torch.rand(8, 1, 8, 8), config=qat.QATConfig(bound="swap"))
    assert isinstance(qm.get_submodule("r0"), nn.ReLU6) and isinstance(trained.r0, nn.ReLU)


# ----------------------------------------------------------------------------- schedule, resume
def test_schedule_freezes_bn_statistics_then_amax(trained, digits):
    xtr, ytr, _, _ = digits
    model = copy.deepcopy(trained)
    qm = qat.prepare(model, xtr[:200], config=qat.QATConfig(freeze_bn_step=2, freeze_amax_step=3, amax_momentum=0.5))
    opt = torch.optim.SGD(qm.parameters(), lr=0.05)
    means, amaxes, wamax = [], [], []
    for i in range(5):
        idx = slice(50 * i, 50 * i + 50)
        F.cross_entropy(qm(xtr[idx] * (1 + i)), ytr[idx]).backward()  # growing inputs: amax must move
        opt.step()
        opt.zero_grad()
        assert qat.step(qm) == i + 1
        means.append(model.bn1.running_mean.clone())
        amaxes.append(float(act_quantizers(qm)["r0"].amax))
        wamax.append(quant_layers(qm)["stem"].weight_amax.clone())
    assert not torch.equal(means[0], means[1])  # steps 1, 2 update the statistics
    assert all(torch.equal(means[1], m) for m in means[2:])  # frozen after step 2
    assert amaxes[0] != amaxes[1] != amaxes[2] and amaxes[2] == amaxes[3] == amaxes[4]
    assert torch.equal(wamax[3], wamax[4])


def test_state_dict_resumes_without_recalibration(trained, digits):
    xtr, ytr, xte, _ = digits
    cfg = qat.QATConfig(learn_amax=True, freeze_bn_step=3)
    qm = qat.prepare(copy.deepcopy(trained), xtr[:200], config=cfg)
    opt = torch.optim.Adam(list(qm.parameters()), lr=1e-3)
    assert len(qat.amax_parameters(qm)) == len(act_quantizers(qm))
    for i in range(4):
        F.cross_entropy(qm(xtr[50 * i : 50 * i + 50]), ytr[50 * i : 50 * i + 50]).backward()
        opt.step()
        opt.zero_grad()
        qat.step(qm)
    buf = io.BytesIO()
    torch.save(qm.state_dict(), buf)
    torch.manual_seed(123)
    fresh = qat.prepare(TinyNet(), None, config=cfg)  # no calibration data: nothing recalibrated
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert int(fresh.qfold_qat_step) == 4 and bool(quant_layers(fresh)["dw"].bn_frozen)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(xte), qm.eval()(xte))
        assert torch.equal(qat.convert(fresh)(xte), qat.convert(qm)(xte))
    # deepcopy (EMA teachers, checkpoint averaging) keeps the schedule and the counter
    twin = copy.deepcopy(qm).train()
    assert qat.step(twin) == 5


# -------------------------------------------------------------------------------------- errors
def test_clear_errors(trained):
    model = copy.deepcopy(trained)
    with pytest.raises(ValueError, match="training mode"):
        qat.prepare(copy.deepcopy(trained).eval())
    qm = qat.prepare(model)
    with pytest.raises(ValueError, match="already prepared"):
        qat.prepare(qm)
    with pytest.raises(ValueError, match="before calibration or training"):
        qat.convert(qm)
    with pytest.raises(ValueError, match="before calibration or training"):
        qat_export(qm, Path(tempfile.gettempdir()) / "never.onnx", torch.rand(1, 1, 8, 8))
    with pytest.raises(RuntimeError, match="no amax yet"):
        qm.eval()(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="eval mode"):
        qat.step(qm.eval())
    with pytest.raises(ValueError, match="not a QAT-prepared model"):
        qat.step(trained)
    with pytest.raises(ValueError, match="bound.*preserve"):
        qat.QATConfig(bound="preserve")
    with pytest.raises(ValueError, match="freeze_bn_step"):
        qat.QATConfig(freeze_bn_step=-1)
    qm.train()(torch.rand(4, 1, 8, 8))  # a training forward initialises every quantizer ...
    qat.convert(qm)  # ... so conversion now works


# ------------------------------------------------------------------------------- autocast, DDP
@pytest.mark.parametrize("learn", [False, True])
def test_autocast_bf16_trains_and_matches_fp32(trained, digits, learn):
    xtr, ytr, _, _ = digits
    cfg = qat.QATConfig(learn_amax=learn)
    q32 = qat.prepare(copy.deepcopy(trained), xtr[:200], config=cfg)
    q16 = qat.prepare(copy.deepcopy(trained), xtr[:200], config=cfg)
    x, y = xtr[:100], ytr[:100]
    ref = q32(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q16(x)
        loss = F.cross_entropy(out, y)
    loss.backward()
    assert out.dtype in (torch.bfloat16, torch.float32)
    err = (out.float() - ref.detach()).abs().max() / ref.detach().abs().max()
    assert err < 0.08, f"bf16 autocast output differs from fp32 by {float(err):.3f} of its range"
    grads = [p.grad for p in q16.parameters() if p.grad is not None]
    assert len(grads) == len(list(q16.parameters())) and all(torch.isfinite(g).all() for g in grads)
    for q in act_quantizers(q16).values():
        assert q.amax.dtype == torch.float32 and torch.isfinite(q.amax)
    assert quant_layers(q16)["stem"].bn.running_var.dtype == torch.float32


def _ddp_worker(rank: int, world: int, init: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = TinyNet().train()
        g = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
        calib = torch.rand(32, 1, 8, 8, generator=g) * (1 + 3 * rank)
        qm = qat.prepare(model, calib)
        calibrated = torch.stack([q.amax.detach().clone() for q in act_quantizers(qm).values()])
        ddp = DDP(qm)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        for _ in range(3):
            x = torch.rand(16, 1, 8, 8, generator=g) * (1 + rank)
            y = torch.randint(0, 10, (16,), generator=g)
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
            opt.zero_grad()
            qat.step(ddp)
        trained_amax = torch.stack([q.amax.detach().clone() for q in act_quantizers(qm).values()])
        wamax = torch.cat([m.weight_amax for m in quant_layers(qm).values()])
        mine = torch.cat([calibrated, trained_amax, wamax])
        allv = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(allv, mine)
        if rank == 0:
            torch.save({"all": allv, "calib_n": len(calibrated)}, os.path.join(out_dir, "ddp.pt"))
        del ddp  # release DDP's reducer before the group goes away ...
        dist.barrier()  # ... and let both ranks finish communicating: gloo aborts on a one-sided teardown
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_gloo_ranks_keep_amax_identical(tmp_path):
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"  # a file rendezvous: no port to race for
    # spawn, not fork: a forked child of a process that already ran torch ops can deadlock
    mp.spawn(_ddp_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    res = torch.load(tmp_path / "ddp.pt", weights_only=True)
    a, b = res["all"]
    assert torch.equal(a, b), "amax differs between ranks"
    # the calibrated amax is that of both ranks' data together (max calibration of the union)
    torch.manual_seed(0)
    both = torch.cat([torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(100 + r)) * (1 + 3 * r) for r in range(2)])
    single = qat.prepare(TinyNet().train(), both)
    expect = torch.stack([q.amax.detach() for q in act_quantizers(single).values()])
    torch.testing.assert_close(a[: res["calib_n"]], expect)


def test_lightning_callback_steps_the_schedule():
    pl = pytest.importorskip("lightning.pytorch", reason="PyTorch Lightning is an optional dependency (pip install -e \".[lightning]\" from the checkout)")
    from qfold.qat.lightning import QATCallback

    assert issubclass(QATCallback, pl.Callback)
    qm = qat.prepare(TinyNet().train(), torch.rand(8, 1, 8, 8))
    QATCallback().on_train_batch_end(None, qm, None, None, 0)
    assert int(qm.qfold_qat_step) == 1


# ------------------------------------------------------------------------- export and engine
def test_export_runs_in_onnxruntime_within_one_output_step(trained, digits, tmp_path):
    import onnxruntime as ort

    xtr, ytr, xte, _ = digits
    qm = qat.prepare(copy.deepcopy(trained), xtr[:300], config=qat.QATConfig(freeze_bn_step=10))
    _train(qm, xtr[:500], ytr[:500], epochs=1, lr=1e-3, step_fn=qat.step)
    conv = qat.convert(qm)
    with torch.no_grad():
        fq = conv(xte)
        torch.testing.assert_close(qm.eval()(xte), fq, rtol=0, atol=1e-5)
    p1 = qat_export(qm, tmp_path / "a.onnx", xte[:1])
    p2 = qat_export(qm, tmp_path / "b.onnx", xte[:1])
    assert p1.read_bytes() == p2.read_bytes()  # deterministic
    sess = ort.InferenceSession(str(p1), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": xte.numpy()})[0]
    step = float(fq.abs().max()) / 127
    err = float(np.abs(out - fq.numpy()).max())
    assert err <= step, f"ORT differs from the fake-quant model by {err:.4g} > one output step {step:.4g}"
    assert (out.argmax(1) == fq.numpy().argmax(1)).mean() > 0.99


def test_small_acceptance_qat_beats_ptq_after_literal_relu6_swap(trained, digits):
    """CI version of tools/bench_qat.py: a model whose activations exceed 6, literally bounded."""
    xtr, ytr, xte, yte = digits
    fp32 = _acc(trained, xte, yte)
    model = copy.deepcopy(trained)
    with torch.no_grad():  # same function, activations x4: BN scales up, the next layers scale down
        for bn in (model.bn0, model.bn1, model.bn3):
            bn.weight.mul_(4)
            bn.bias.mul_(4)
        model.dw.weight.div_(4)
        model.pw.weight.div_(4)
        model.bn2.weight.mul_(4)
        model.bn2.bias.mul_(4)
        model.mix.weight.div_(4)
        model.fc.weight.div_(4)
    assert _acc(model, xte, yte) == fp32
    cfg = qat.QATConfig(bound="swap", freeze_bn_step=28, freeze_amax_step=42)
    ptq = _acc(qat.prepare(copy.deepcopy(model), xtr[:300], config=cfg), xte, yte)
    qm = qat.prepare(model, xtr[:300], config=cfg)
    _train(qm, xtr, ytr, epochs=2, lr=2e-3, step_fn=qat.step)
    qat_acc = _acc(qm, xte, yte)
    print(f"digits TinyNet top-1: FP32 {fp32:.4f}, PTQ after swap {ptq:.4f}, QAT 2 epochs {qat_acc:.4f}")
    assert ptq < fp32 - 0.01, (fp32, ptq)
    assert qat_acc > ptq and qat_acc >= fp32 - 0.01, (fp32, ptq, qat_acc)
