"""The same numbers on a CUDA device as on the CPU (skipped without one, with the reason)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from qfold.capture import trace
from qfold.examples import load_data, load_model
from qfold.fold.passes import fold_batchnorm
from qfold.quant import plan_quantization, prepare_fake_quant
from qfold.quant.prepare import act_quantizers

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _no_tf32():
    """Ampere+ GPUs run fp32 convs in TF32 by default (10-bit mantissa); compare in true fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_fold_on_cuda_matches_cpu():
    model = load_model("densenet")
    x, _ = load_data("calib")
    x = x[:16]
    cpu, _ = fold_batchnorm(model)
    gpu, report = fold_batchnorm(model.cuda())
    assert all(p.device.type == "cuda" for p in gpu.parameters())
    with torch.no_grad():
        ref = model.cpu()(x)
        torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cpu(x), ref, rtol=1e-4, atol=1e-4)
    assert report.folded


def test_fake_quant_model_on_cuda_matches_cpu():
    model = load_model("resnet")
    x, _ = load_data("calib")
    folded, _ = fold_batchnorm(model)
    gm = folded if isinstance(folded, torch.fx.GraphModule) else trace(folded)
    fq = prepare_fake_quant(gm, plan_quantization(gm))
    for q in act_quantizers(fq).values():
        q.set_amax(4.0)
    with torch.no_grad():
        ref = fq(x[:32])
        got = fq.cuda()(x[:32].cuda()).cpu()
    step = ref.abs().max() / 127
    assert (got - ref).abs().max() <= step  # same codes up to float summation order in the convs


def test_qat_step_on_cuda_under_bf16_autocast():
    from qfold import qat

    model = load_model("mobilenetv2").cuda().train()
    x, y = load_data("calib")
    x, y = x[:128].cuda(), y[:128].cuda()
    qmodel = qat.prepare(model, x[:64], config=qat.QATConfig(bound="swap", freeze_bn_step=2))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for i in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(qmodel(x[i * 32 : (i + 1) * 32]), y[i * 32 : (i + 1) * 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
        qat.step(qmodel)
    assert torch.isfinite(loss)
    converted = qat.convert(qmodel)
    with torch.no_grad():
        out = converted(x[:8])
    assert out.shape == (8, 10) and torch.isfinite(out).all()
