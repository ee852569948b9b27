"""Where models and data come from: ``package.module:factory`` specs, checkpoints, .npy/.npz files,
image folders, and ``package.module:function`` data sources. Errors name the cause and the fix."""
from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".tif", ".tiff")


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".tar")


def _resolve(spec: str, what: str):
    if ":" not in spec:
        if what == "model factory" and Path(spec).suffix.lower() in CHECKPOINT_SUFFIXES:
            raise ValueError(f"--model {spec!r} looks like a weights file; qfold needs the architecture too: pass --model "
                             f"package.module:factory --checkpoint {spec}, or save the whole model with torch.export.save as a .pt2 file")
        if what == "model factory" and Path(spec).suffix.lower() == ".onnx":
            raise ValueError(f"--model {spec!r} is an ONNX file; qfold quantizes PyTorch models: pass --model package.module:factory "
                             "or a .pt2 ExportedProgram (to build an engine from a Q/DQ ONNX, use qfold build)")
        raise ValueError(f"{what} {spec!r} is not of the form 'package.module:name'")
    mod_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {mod_name!r} for {what} {spec!r}: {exc}. Is it on PYTHONPATH?") from exc
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise ValueError(f"module {mod_name!r} has no attribute {attr!r} ({what} {spec!r})") from exc
    return obj


def load_model(spec: str, checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """A model from ``package.module:factory`` (+ optional state_dict file) or a saved ExportedProgram (.pt2).

    The model is returned in eval mode.
    """
    if spec.endswith(".pt2"):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"no ExportedProgram file at {path}")
        from qfold.capture.exported import from_exported_program

        try:
            program = torch.export.load(str(path))
        except Exception as exc:  # torch raises several types for corrupt archives
            raise ValueError(f"{path} is not a readable ExportedProgram ({exc})") from exc
        return from_exported_program(program)
    factory = _resolve(spec, "model factory")
    model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for corrupt files
            raise ValueError(f"checkpoint {path} is not a readable torch state_dict ({_load_failure(exc)}); "
                             "save it with torch.save(model.state_dict(), path)") from exc
        if not isinstance(state, dict):
            raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a state_dict; "
                             "save it with torch.save(model.state_dict(), path)")
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"checkpoint {path} does not fit model {spec!r}: {exc}") from exc
    return model.eval()


def _load_failure(exc: Exception) -> str:
    """The cause of a failed ``torch.load(weights_only=True)``, without torch's advice to load unsafely."""
    text = str(exc)
    if "Weights only load failed" not in text:
        return " ".join(text.split())[:200] or type(exc).__name__
    detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
    detail = detail[0].strip() if detail else ""
    if detail.startswith("Unsupported global"):
        name = detail.split("GLOBAL", 1)[-1].split()[0] if "GLOBAL" in detail else "an object"
        return f"it pickles {name}, not only tensors; qfold loads checkpoints with weights_only=True and will not run pickled code"
    return f"not a torch checkpoint: {detail or 'unreadable'}"


def _from_array_file(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        obj = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable .npy/.npz file ({exc})") from exc
    if isinstance(obj, np.ndarray):
        return obj, None
    keys = list(obj.keys())
    x_key = next((k for k in ("x", "X", "inputs", "data", "images") if k in keys), keys[0] if keys else None)
    if x_key is None:
        raise ValueError(f"{path} holds no arrays")
    y_key = next((k for k in ("y", "Y", "labels", "targets") if k in keys), None)
    return obj[x_key], (obj[y_key] if y_key else None)


def _from_image_folder(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    from PIL import Image  # matplotlib depends on pillow

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image folder {path} contains no images ({', '.join(IMAGE_SUFFIXES)})")
    arrays, labels, classes = [], [], sorted({p.parent.name for p in files})
    for f in files:
        img = np.asarray(Image.open(f))
        arrays.append(img[None] if img.ndim == 2 else img.transpose(2, 0, 1))
        labels.append(classes.index(f.parent.name))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images in {path} have different shapes {sorted(shapes)}; resize them to one shape first")
    y = np.asarray(labels) if len(classes) > 1 else None
    return np.stack(arrays).astype(np.float32) / 255.0, y


def load_data(spec: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inputs (float32) and optional integer labels from a .npy/.npz file, an image folder
    (one sub-folder per class), ``package.module:function`` returning ``x`` or ``(x, y)``, or
    ``example:calib`` / ``example:test`` (the built-in example's splits)."""
    path = Path(spec)
    if spec.startswith("example:") and not path.exists():  # the built-in example's splits: example:calib, example:test
        from qfold.examples import load_data as example_data

        return example_data(spec.partition(":")[2])
    if path.suffix in (".npy", ".npz"):
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        x, y = _from_array_file(path)
    elif path.is_dir():
        x, y = _from_image_folder(path)
    elif ":" in spec and not path.exists():
        out = _resolve(spec, "data function")()
        x, y = out if isinstance(out, (tuple, list)) else (out, None)
    else:
        raise ValueError(f"data {spec!r}: expected a .npy/.npz file, an image folder, or 'package.module:function'")
    x_t = torch.as_tensor(np.asarray(x))
    if not x_t.is_floating_point():
        raise TypeError(f"data {spec!r}: inputs have dtype {x_t.dtype}; give float inputs, preprocessed as the model expects")
    y_t = None if y is None else torch.as_tensor(np.asarray(y)).long()
    if y_t is not None and y_t.shape[0] != x_t.shape[0]:
        raise ValueError(f"data {spec!r}: {x_t.shape[0]} inputs but {y_t.shape[0]} labels")
    return x_t.float(), y_t


def batches(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive batches of ``x`` (the last may be short), in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i in range(0, x.shape[0], batch_size):
        yield x[i : i + batch_size]
