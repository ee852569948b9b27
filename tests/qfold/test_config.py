"""Pipeline configuration: defaults, TOML round trip, and errors for what would silently do nothing."""
from __future__ import annotations

import pytest

from qfold.config import PTQConfig, from_dict, load_config, to_toml


def test_toml_round_trip_and_overrides(tmp_path):
    cfg = PTQConfig().replace(calib={"method": "percentile", "percentile": 99.9}, export={"keep_float": ["fc"]},
                              eval={"max_drop_pp": 0.3})
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg
    assert cfg.export.keep_float == ("fc",) and cfg.calib.batch_size == PTQConfig().calib.batch_size


@pytest.mark.parametrize(
    "data, message",
    [
        ({"calibration": {}}, "unknown configuration section 'calibration'"),
        ({"calib": {"methd": "max"}}, r"unknown key\(s\) \['methd'\] in section \[calib\]"),
        ({"calib": {"method": "kl"}}, "calib.method must be one of"),
        ({"bound": {"mode": "relu6"}}, "bound.mode must be one of"),
        ({"export": {"opset": 11}}, "opset must be >= 13"),
        ({"engine": {"backend": "tvm"}}, "engine.backend must be one of"),
    ],
)
def test_bad_configuration_is_an_error(data, message):
    with pytest.raises(ValueError, match=message):
        from_dict(data)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("[calib\nmethod = 1")
    with pytest.raises(ValueError, match="is not valid TOML"):
        load_config(tmp_path / "bad.toml")
