"""qfold.inputs.rows: rows per forward from the largest layer output of one sample."""
from __future__ import annotations

import torch
import torch.nn as nn

from qfold.config import PTQConfig
from qfold.inputs.rows import (
    ACTIVATION_BUDGET,
    MAX_ROWS,
    auto_rows,
    largest_output_bytes,
    with_rows,
)


class Wide(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def test_rows_fit_the_largest_output_in_the_budget() -> None:
    m = Wide(64).eval()
    x = torch.randn(3, 3, 224, 224)
    assert largest_output_bytes(m, x[:1]) == 64 * 224 * 224 * 4  # the conv's output, not the input
    assert auto_rows(m, x) == ACTIVATION_BUDGET // (64 * 224 * 224 * 4) == 1
    assert auto_rows(Wide(8).eval(), x) == ACTIVATION_BUDGET // (8 * 224 * 224 * 4) == 10
    assert auto_rows(Wide(8).eval(), torch.randn(1, 3, 8, 8)) == MAX_ROWS
    assert auto_rows(Wide(8).eval(), x, budget=1) == 1
    assert not m.conv._forward_hooks  # hooks removed


def test_with_rows_keeps_given_batch_sizes_and_measures_each_data_set() -> None:
    m, x = Wide(8).eval(), torch.randn(2, 3, 224, 224)
    cfg = with_rows(PTQConfig(), m, x, torch.randn(2, 3, 112, 112))
    assert (cfg.calib.batch_size, cfg.eval.batch_size) == (10, ACTIVATION_BUDGET // (8 * 112 * 112 * 4)) == (10, 41)
    assert with_rows(PTQConfig(), m, x).eval.batch_size == 10  # no eval data: the calibration data's
    given = PTQConfig().replace(calib={"batch_size": 3}, eval={"batch_size": 7})
    assert with_rows(given, m, x) is given


def test_measuring_rows_changes_no_state() -> None:
    """A model in train mode: its BatchNorm statistics and training flags are as before."""
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    auto_rows(m, torch.randn(2, 3, 16, 16) + 5.0)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(mod.training for mod in m.modules())
