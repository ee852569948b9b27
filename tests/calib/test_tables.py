"""Calibration tables: TensorRT cache text format and versioned JSON."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from calib import (
    CalibrationError,
    CalibTable,
    hash_batches,
    hash_model,
    read_trt_cache,
    scale_from_amax,
    versions,
    write_trt_cache,
)
from calib.trtcache import hex_to_scale, scale_to_hex

GOLDEN = Path(__file__).parent / "golden" / "sample.trtcache"


def test_scale_hex_golden_values():
    assert scale_to_hex(1 / 127) == "3c010204"
    assert scale_to_hex(float(scale_from_amax(1.0))) == "3c010204"
    assert hex_to_scale("4000889d") == pytest.approx(2.0084, abs=1e-4)
    assert scale_to_hex(2.0**-100 / 127) == "0a010204"  # the scale of amax 0 is still a valid positive float


def test_golden_cache_round_trips_byte_exact(tmp_path):
    header, scales = read_trt_cache(GOLDEN)
    assert (header.version, header.algorithm) == ("100300", "EntropyCalibration2")
    assert scales["input"] == np.float32(1 / 127) and scales["onnx::Conv_7:0"] == np.float32(6 / 127)
    assert list(scales)[0] == "input" and len(scales) == 5
    out = write_trt_cache(tmp_path / "c.cache", scales, trt_version=header.version, algorithm=header.algorithm)
    assert out.read_bytes() == GOLDEN.read_bytes()


def test_write_is_deterministic_and_atomic(tmp_path):
    p = tmp_path / "c.cache"
    write_trt_cache(p, {"a": 0.5, "b": 0.25})
    first = p.read_bytes()
    write_trt_cache(p, {"a": 0.5, "b": 0.25})
    assert p.read_bytes() == first == b"TRT-100300-EntropyCalibration2\na: 3f000000\nb: 3e800000\n"
    with pytest.raises(CalibrationError, match="'b': scale -1.0 must be finite and > 0"):
        write_trt_cache(p, {"a": 1.0, "b": -1.0})
    assert p.read_bytes() == first and os.listdir(tmp_path) == ["c.cache"]  # old file whole, no temp left


@pytest.mark.parametrize("scales,match", [
    ({"a": float("nan")}, "finite"), ({"a": 0.0}, "> 0"), ({"a": 1e-50}, "> 0"), ({"a": 1e39}, "float32"),
    ({"a\nb": 1.0}, "newline"), ({"a": [1.0, 2.0]}, "one per-tensor scale"),
])
def test_write_rejects_bad_scales(tmp_path, scales, match):
    with pytest.raises(CalibrationError, match=match):
        write_trt_cache(tmp_path / "c", scales)


def test_write_rejects_bad_header_fields(tmp_path):
    with pytest.raises(CalibrationError, match="digits"):
        write_trt_cache(tmp_path / "c", {"a": 1.0}, trt_version="10.3")
    with pytest.raises(CalibrationError, match="MinMaxCalibration"):
        write_trt_cache(tmp_path / "c", {"a": 1.0}, algorithm="Entropy3")


@pytest.mark.parametrize("text,match", [
    ("", "empty file"),
    ("TRT-8601\nx: 3c010204\n", "line 1: expected a header"),
    ("TRT-8601-MinMaxCalibration\nx: 3c010204\ny 3c010204\n", "line 3: expected '<tensor name>: <hex scale>'"),
    ("TRT-8601-MinMaxCalibration\nx: 3c010204\ny: 3c01", r"line 3: tensor 'y' has value '3c01' and the file ends .*\(truncated"),
    ("TRT-8601-MinMaxCalibration\nx: 3c0102041\n", r"line 2: tensor 'x' has value '3c0102041', not 1-8 hex digits"),
    ("TRT-8601-MinMaxCalibration\nx: 3g\n", r"line 2: tensor 'x' has value '3g', not 1-8 hex digits"),
    ("TRT-8601-MinMaxCalibration\nx: bc010204\n", "line 2: tensor 'x' has scale -0.00787"),
    ("TRT-8601-MinMaxCalibration\nx: 7fc00000\n", "line 2: .*must be >= 0 and not NaN"),
    ("TRT-8601-MinMaxCalibration\nx: 3c010204\nx: 3c010204\n", "line 3: tensor 'x' appears twice"),
    ("TRT-8601-MinMaxCalibration\n\nx: 3c010204\n", "line 2: expected"),
])
def test_read_errors_name_the_line(tmp_path, text, match):
    p = tmp_path / "bad.cache"
    p.write_text(text)
    with pytest.raises(CalibrationError, match=match):
        read_trt_cache(p)


def test_read_truncated_golden_names_the_line(tmp_path):
    data = GOLDEN.read_bytes()
    p = tmp_path / "t.cache"
    p.write_bytes(data[: data.index(b"3c4985f0") + 4])
    with pytest.raises(CalibrationError, match="line 4: tensor 'layer1.0/conv1/Conv_output_0' has value '3c49'"):
        read_trt_cache(p)
    with pytest.raises(CalibrationError, match="does not exist"):
        read_trt_cache(tmp_path / "missing")


def test_read_accepts_crlf_and_no_final_newline(tmp_path):
    p = tmp_path / "w.cache"
    p.write_bytes(b"TRT-8601-EntropyCalibration2\r\na:b: 3c010204\r\nc: 3F800000")
    header, scales = read_trt_cache(p)
    assert header.version == "8601" and scales == {"a:b": np.float32(1 / 127), "c": 1.0}


def test_json_table_is_deterministic_and_round_trips(tmp_path):
    meta = {"spec": {"bits": 8, "narrow": True}, "versions": versions()}
    t = CalibTable({"conv2": 1.5, "conv1": 0.1 + 0.2, "w": [0.5, 0.0]}, "entropy", meta)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    t.save_json(a)
    CalibTable(dict(reversed(list(t.amax.items()))), "entropy", meta).save_json(b)
    assert a.read_bytes() == b.read_bytes()
    doc = json.loads(a.read_text())
    assert doc["schema"] == 1 and list(doc["amax"]) == ["conv1", "conv2", "w"]
    u = CalibTable.load_json(a)
    assert u.amax == t.amax and u.amax["conv1"] == 0.1 + 0.2 and u.meta == meta and u.method == "entropy"
    assert u.scales()["conv2"] == np.float32(1.5 / 127)
    assert u.scales()["w"][1] > 0


def test_json_table_to_trt_cache(tmp_path):
    t = CalibTable({"input": 1.0, "w": [1.0, 2.0]}, "max")
    t.save_trt_cache(tmp_path / "c.cache", algorithm="MinMaxCalibration")
    assert (tmp_path / "c.cache").read_text() == "TRT-100300-MinMaxCalibration\ninput: 3c010204\n"


@pytest.mark.parametrize("mutate,match", [
    (lambda s: s[: len(s) // 2], r"line \d+ column \d+: not valid JSON"),
    (lambda s: s.replace('"schema": 1', '"schema": 7'), "schema 7"),
    (lambda s: s.replace('"amax"', '"amix"'), "missing"),
    (lambda s: s.replace("1.5", "-1.5"), "'b' must be finite numbers >= 0"),
])
def test_json_load_errors(tmp_path, mutate, match):
    p = tmp_path / "t.json"
    CalibTable({"b": 1.5}, "max").save_json(p)
    p.write_text(mutate(p.read_text()))
    with pytest.raises(CalibrationError, match=match):
        CalibTable.load_json(p)


def test_bad_amax_and_meta_are_rejected(tmp_path):
    with pytest.raises(CalibrationError, match="'x' must be finite"):
        CalibTable({"x": float("inf")}, "max")
    with pytest.raises(CalibrationError, match="plain JSON"):
        CalibTable({"x": 1.0}, "max", {"m": object()}).save_json(tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()


def test_hashes_change_with_data_and_weights():
    m = nn.Linear(3, 2)
    h0 = hash_model(m)
    assert h0 == hash_model(m)
    with torch.no_grad():
        m.weight[0, 0] += 1e-6
    assert hash_model(m) != h0
    x = [torch.ones(2, 3), (torch.zeros(1), {"k": torch.ones(1)})]
    assert hash_batches(x) == hash_batches([t for t in x])
    assert hash_batches(x) != hash_batches(x[:1]) != hash_batches([torch.ones(3, 2)])


# ----------------------------------------------------------------------------- caches TensorRT wrote

REAL = Path(__file__).parent / "golden" / "real_trtcache"  # excerpts of public caches; SOURCES.md says whose


def _be_float32(hex_text: str) -> float:
    """Independent decoding: numpy reads the zero-padded big-endian bytes as float32."""
    return float(np.frombuffer(bytes.fromhex(hex_text.rjust(8, "0")), dtype=">f4")[0])


@pytest.mark.parametrize("name,version,unusable", [
    ("deimkit_trt100900.cache", "100900", {"ONNXTRT_Broadcast_1855_output"}),
    ("segformer_test_trt8401.cache", "8401", {"(Unnamed Layer* 64) [Shuffle]_output", "366"}),
    ("segformer_backup_trt8401.cache", "8401", {"input", "371", "376", "380", "(Unnamed Layer* 64) [Shuffle]_output",
                                                "366", "395"}),
])
def test_reads_caches_written_by_tensorrt(name, version, unusable):
    path = REAL / name
    lines = path.read_text().splitlines()
    with pytest.warns(UserWarning, match=f"{len(unusable)} tensor\\(s\\) have a zero or infinite scale") as rec:
        header, scales = read_trt_cache(path)
    assert (header.version, header.algorithm) == (version, "EntropyCalibration2")
    assert len(scales) == len(lines) - 1 and list(scales) == [ln.rpartition(": ")[0] for ln in lines[1:]]
    for ln in lines[1:]:
        tensor, _, value = ln.rpartition(": ")
        assert scales[tensor] == _be_float32(value)
    assert {k for k, v in scales.items() if v == 0 or np.isinf(v)} == unusable
    assert len(rec) == 1 and sorted(unusable)[0] in str(rec[0].message)


def test_real_cache_values_are_scales_of_plausible_ranges():
    with pytest.warns(UserWarning, match="ONNXTRT_Broadcast_1855_output"):
        _, scales = read_trt_cache(REAL / "deimkit_trt100900.cache")
    assert scales["images"] * 127 == pytest.approx(1.0, rel=0.01)  # a [0, 1] image input: amax 1


def test_cache_note_says_tensorrt_11_has_no_reader(tmp_path):
    from calib import write_trt_cache_note

    cache = write_trt_cache(tmp_path / "calibration.trtcache", {"a": 0.5})
    note = json.loads(write_trt_cache_note(cache).read_text())
    assert note["header"] == "TRT-100300-EntropyCalibration2"
    assert "TensorRT 11 removed implicit INT8 calibration" in note["tensorrt_11"]
    assert "trtexec --calib" in note["readers"]
    assert write_trt_cache_note(cache).read_bytes() == (tmp_path / "calibration.trtcache.json").read_bytes()
    (tmp_path / "bad").write_text("not a cache\n")
    with pytest.raises(CalibrationError, match="line 1: expected a header"):
        write_trt_cache_note(tmp_path / "bad")
