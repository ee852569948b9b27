"""The one torch.fx vocabulary (qfold.fx): every pass reads ReLU and add sites the same way."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from qfold import qat
from qfold.capture import trace
from qfold.fx import describe, is_add, relu_site, tensor_leaves, training_batchnorm


class EveryRelu(nn.Module):
    """Each way of writing a ReLU, in place and not, and each way of adding."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3, self.c4, self.c5, self.c6 = (nn.Conv2d(2, 2, 1) for _ in range(6))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.c1(x) * 8)
        b = torch.relu_(self.c2(x) * 8)
        c = F.relu_(self.c3(x) * 8)
        d = (self.c4(x) * 8).relu()
        e = (self.c5(x) * 8).relu_()
        f = self.act(self.c6(x) * 8)
        return torch.add(a + b, c).add(d) + operator.iadd(e, f)


def test_relu_sites_and_adds_are_found_in_every_spelling():
    gm = trace(EveryRelu())
    sites = {n.name: relu_site(gm, n) for n in gm.graph.nodes if relu_site(gm, n) is not None}
    assert sorted(sites.values()) == [False, False, True, True, True, True]
    assert sum(is_add(n) for n in gm.graph.nodes) == 5
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "c1")
    assert describe(gm, node) == "'c1' (Conv2d)"
    assert describe(gm, next(iter(gm.graph.nodes))) == "the model input 'x'"


def test_qat_swap_bounds_every_relu_spelling():
    """QAT's literal ReLU6 swap uses the same site table as the bound (it once missed relu_)."""
    torch.manual_seed(0)
    model = EveryRelu().train()
    gm = qat.prepare(model, None, config=qat.QATConfig(bound="swap"))
    assert isinstance(gm, fx.GraphModule)
    assert not any(relu_site(gm, n) is not None for n in gm.graph.nodes)
    assert sum(isinstance(m, nn.ReLU6) for m in gm.modules()) == 6


def test_training_batchnorm_and_tensor_leaves():
    m = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1))
    assert training_batchnorm(m)[0] == "1"
    assert training_batchnorm(m.eval()) is None
    t = torch.zeros(1)
    leaves = tensor_leaves({"a": (t, [t * 2, 3]), "b": "s"})
    assert len(leaves) == 2 and leaves[0] is t and float(leaves[1]) == 0
