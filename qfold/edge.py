"""Reproducible edge builds: a TOML file in, a checked artifact folder with a manifest out.

The TOML holds ``[model]`` (``example = "resnet"`` or ``factory = "pkg.mod:fn"`` + ``checkpoint``),
``[data]`` (``calib`` / ``eval`` sources, or ``example = true``), ``[output] dir``, and any
:class:`qfold.config.PTQConfig` sections (``[calib]``, ``[export]``, ``[engine]``, ``[eval]``
with ``max_drop_pp`` as the accuracy budget ...). Paths are relative to the TOML file.

The manifest lists the sha256 of every artifact, the versions of Python, torch, onnx,
onnxruntime and TensorRT, and the configuration. The same inputs give byte-identical ONNX,
calibration files and manifest hashes.
"""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from calib.atomic import atomic_write_text
from qfold import config as cfgmod
from qfold.inputs import sources as sources

SECTIONS_OWN = ("model", "data", "output")
#: The keys of the build file's own sections and their types (a typo is an error, not a silent default).
OWN_KEYS: dict[str, dict[str, type]] = {
    "model": {"example": str, "factory": str, "checkpoint": str},
    "data": {"example": bool, "calib": str, "eval": str},
    "output": {"dir": str},
}


@dataclass(frozen=True)
class BuildSpec:
    """A parsed build file."""

    model: dict[str, Any]
    data: dict[str, Any]
    out_dir: Path
    config: cfgmod.PTQConfig
    source: Path


def load_build_spec(path: str | Path) -> BuildSpec:
    """Parse a build TOML; unknown sections and keys are errors (they would silently do nothing)."""
    path = Path(path)
    data = cfgmod.read_toml(path, "build file")
    own = {k: data.pop(k, {}) for k in SECTIONS_OWN}
    for sec, keys in OWN_KEYS.items():
        if not isinstance(own[sec], dict):
            raise ValueError(f"[{sec}] in build file {path} must be a section (a TOML table), got {own[sec]!r}")
        bad = sorted(set(own[sec]) - set(keys))
        if bad:
            raise ValueError(f"unknown key(s) {bad} in [{sec}] of build file {path}; known: {sorted(keys)}")
        for k, v in own[sec].items():
            if not isinstance(v, keys[k]):
                raise ValueError(f"{sec}.{k} in build file {path} must be a {keys[k].__name__}, got {type(v).__name__} {v!r}")
    if not own["model"]:
        raise ValueError(f"build file {path} has no [model] section (example = \"resnet\" or factory = \"pkg.mod:fn\")")
    if ("example" in own["model"]) == ("factory" in own["model"]):
        raise ValueError(f"[model] in build file {path} needs exactly one of example = \"resnet\" or factory = \"pkg.mod:fn\"")
    out = Path(own["output"].get("dir", "build"))
    base = path.resolve().parent
    return BuildSpec(own["model"], own["data"], out if out.is_absolute() else base / out, cfgmod.from_dict(data), path.resolve())


def _resolve(spec: BuildSpec, value: str) -> str:
    p = Path(value)
    return str(p if p.is_absolute() or ":" in value and not (spec.source.parent / p).exists() else spec.source.parent / p)


def _inputs(spec: BuildSpec):
    if "example" in spec.model:
        from qfold.examples import load_data, load_model

        model = load_model(spec.model["example"])
    else:
        ckpt = spec.model.get("checkpoint")
        model = sources.load_model(_resolve(spec, spec.model["factory"]), _resolve(spec, ckpt) if ckpt else None)
    if spec.data.get("example") or ("example" in spec.model and not spec.data):
        from qfold.examples import load_data

        (cx, _), (ex, ey) = load_data("calib"), load_data("test")
    else:
        if "calib" not in spec.data:
            raise ValueError("[data] needs calib = <source> (qfold never calibrates on random data)")
        cx, _ = sources.load_data(_resolve(spec, spec.data["calib"]))
        ex, ey = sources.load_data(_resolve(spec, spec.data["eval"])) if "eval" in spec.data else (None, None)
    return model, cx, ex, ey


def versions() -> dict[str, str | None]:
    """Versions of the toolchain that produced an artifact (None: not installed)."""

    def v(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "qfold": v("qfold"),
        "torch": torch.__version__,
        "onnx": v("onnx"),
        "onnxruntime": v("onnxruntime"),
        "tensorrt": v("tensorrt"),
    }


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_build(path: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Build the artifact folder described by the TOML at ``path`` and return the manifest.

    ``out_dir`` overrides the file's ``[output] dir``.

    Raises:
        qfold.pipeline.QualityGateError: the accuracy budget is exceeded (after every artifact and
            the manifest, which records the excess, are written).
    """
    from qfold.errors import QualityGateError
    from qfold.inputs.validate import check_model_and_data
    from qfold.outdir import check_out_dir, owned

    spec = load_build_spec(path)
    out = check_out_dir(spec.out_dir if out_dir is None else Path(out_dir), "output folder")
    model, cx, ex, ey = _inputs(spec)
    if spec.config.calib.max_samples is not None:
        cx = cx[: spec.config.calib.max_samples]
    check_model_and_data(model, cx, ex, ey, max_drop_pp=spec.config.eval.max_drop_pp)
    with owned(out, keep_on=(QualityGateError,), flag="output folder") as run:
        manifest, failure = _build_into(spec, model, cx, ex, ey, run.path)
        if failure is not None:
            raise failure
    return manifest


def _build_into(spec: BuildSpec, model: torch.nn.Module, cx: torch.Tensor, ex: torch.Tensor | None, ey: torch.Tensor | None,
                out: Path) -> tuple[dict[str, Any], Any]:
    """Run the pipeline into the staging folder ``out`` and write the manifest of exactly its files."""
    from qfold.errors import QualityGateError
    from qfold.pipeline import run_ptq

    atomic_write_text(out / "config.toml", cfgmod.to_toml(spec.config))
    failure: QualityGateError | None = None
    try:
        res = run_ptq(model, cx, ex, ey, config=spec.config, out_dir=out)
        accuracy = res.accuracy
    except QualityGateError as exc:
        failure, accuracy = exc, exc.report
    drop = accuracy.drop_pp("engine") if accuracy is not None else None
    budget = spec.config.eval.max_drop_pp
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json" and not p.name.startswith("."))
    manifest = {
        "schema": 1,
        "artifacts": {str(p.relative_to(out)): sha256_file(p) for p in files},
        "versions": versions(),
        "config": spec.config.to_dict(),
        "model": spec.model,
        "data": spec.data,
        "accuracy": {
            "engine_top1_drop_pp": drop,
            "budget_pp": budget,
            "exceeded_by_pp": None if failure is None else drop - budget,
        },
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest, failure
