"""QAT acceptance benchmark: where PTQ loses accuracy, a short QAT fine-tune wins it back.

    python tools/bench_qat.py                      # mobilenetv2 example, literal ReLU6 swap, 2 epochs
    python tools/bench_qat.py --model resnet --epochs 1 --bound off

Reference model: ``qfold.examples.load_model(name)`` (trained FP32, plain ReLU). With ``--bound
swap`` every ReLU becomes ReLU6 literally (no rescale), which clips the many pre-activations
above 6 of these models, the case where PTQ loses accuracy. PTQ here is ``qfold.qat.prepare`` +
``convert`` with no training step: BN folded with running statistics, activation amax from the
512-image calibration split (``--calib-method``), per-channel max weights, the same export. QAT
fine-tunes the same start on the 3,488-image MNIST training split (``tools/train_reference.py``'s
split; test = the fixed 1,000) for ``--epochs`` epochs with BN statistics frozen after the first
epoch and amax frozen for the last quarter. Accuracies are top-1 on the test split, in PyTorch
(fake quant) and from the ONNX Runtime engine run on the exported Q/DQ ONNX. Seeded and
single-threaded; prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qfold import qat  # noqa: E402
from qfold.config import CalibConfig
from qfold.examples import load_data, load_model, normalize  # noqa: E402


def train_split() -> tuple[torch.Tensor, torch.Tensor]:
    """The 3,488-image training split of ``tools/train_reference.py`` (disjoint from calib and test)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_reference import make_split

    split = make_split()
    return normalize(split["train_images"]), torch.from_numpy(split["train_labels"])


@torch.no_grad()
def top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> float:
    model.eval()
    hits = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch))
    return hits / len(x)


def ort_top1(qmodel: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, folder: Path, name: str) -> float:
    import onnxruntime as ort

    path = qat.export(qmodel, folder / f"{name}.onnx", x[:1])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(None, {"input": x[i : i + 250].numpy()})[0] for i in range(0, len(x), 250)])
    return float((logits.argmax(1) == y.numpy()).mean())


def fine_tune(qmodel: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    learned = qat.amax_parameters(qmodel)  # LSQ ranges: their own group, no momentum
    weights = [p for p in qmodel.parameters() if all(p is not a for a in learned)]
    opt = torch.optim.SGD(weights, lr=lr, momentum=0.9)
    if learned:
        opt.add_param_group({"params": learned, "lr": lr, "momentum": 0.0})
    qmodel.train()
    steps = 0
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(qmodel(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps = qat.step(qmodel)
    return steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mobilenetv2")
    p.add_argument("--bound", default="swap", choices=["swap", "off"])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--calib-method", default="max")
    p.add_argument("--learn-amax", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime engine columns")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    xc, _ = load_data("calib")
    xt, yt = load_data("test")
    xtr, ytr = train_split()
    steps_per_epoch = (len(xtr) + 63) // 64
    config = qat.QATConfig(
        freeze_bn_step=steps_per_epoch,
        freeze_amax_step=max(1, (3 * args.epochs * steps_per_epoch) // 4),
        learn_amax=args.learn_amax,
        calib=CalibConfig(method=args.calib_method),
        bound=args.bound,
    )
    fp32 = top1(load_model(args.model), xt, yt)
    # float model after the bound (no quantization): what the swap alone costs
    bounded = qat.prepare(load_model(args.model).train(), xc, config=config)
    from qfold.quant.prepare import quantization_disabled

    with quantization_disabled(bounded):
        bound_acc = top1(bounded, xt, yt)
    ptq = qat.prepare(load_model(args.model).train(), xc, config=config)
    ptq_acc = top1(ptq, xt, yt)
    qmodel = qat.prepare(load_model(args.model).train(), xc, config=config)
    t0 = time.perf_counter()
    steps = fine_tune(qmodel, xtr, ytr, args.epochs, args.lr, args.seed)
    secs = time.perf_counter() - t0
    qat_acc = top1(qmodel, xt, yt)
    with tempfile.TemporaryDirectory() as tmp:
        ptq_ort = None if args.no_ort else ort_top1(ptq, xt, yt, Path(tmp), "ptq")
        qat_ort = None if args.no_ort else ort_top1(qmodel, xt, yt, Path(tmp), "qat")

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}"

    def drop(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * (v - fp32):+.1f}"

    print(f"\nmodel {args.model}, bound {args.bound}, calib {args.calib_method}, learn_amax {args.learn_amax}, "
          f"{args.epochs} epoch(s) = {steps} steps, SGD lr {args.lr}, QAT {secs:.0f} s\n")
    print("| stage | top-1 PyTorch (%) | vs FP32 (pp) | top-1 ORT engine (%) | vs FP32 (pp) |")
    print("|---|---|---|---|---|")
    print(f"| FP32 (ReLU) | {pct(fp32)} | +0.0 | | |")
    print(f"| float after bound={args.bound} | {pct(bound_acc)} | {drop(bound_acc)} | | |")
    print(f"| PTQ int8 | {pct(ptq_acc)} | {drop(ptq_acc)} | {pct(ptq_ort)} | {drop(ptq_ort)} |")
    print(f"| QAT int8 | {pct(qat_acc)} | {drop(qat_acc)} | {pct(qat_ort)} | {drop(qat_ort)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
