"""qfold: post-training int8 quantization of PyTorch CNNs, from FP32 model to engine and accuracy report.

Subcommands run the pipeline up to their step and write that step's files: fold, then bound,
then calibrate, then export (the Q/DQ ONNX); build turns a Q/DQ ONNX into an engine; eval
measures an engine against the FP32 model; sensitivity ranks the quantized layers; ptq does
everything (with --fallback auto it keeps the fewest layers float to meet --max-drop). Flags map onto
qfold.config.PTQConfig. Every input is checked before the work starts: bad input exits with
status 2 and one line naming the cause and the fix.
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, NoReturn

import torch

from calib.atomic import atomic_write_text
from qfold import config as cfgmod
from qfold import outdir
from qfold.engine import require_backend
from qfold.errors import BackendUnavailableError, QualityGateError
from qfold.host import tune_allocator

EXIT_BUDGET = 3
_CPU_TARGET_HELP = ("ONNX Runtime CPU rendering: auto (this CPU, default), vnni (fast, exact with VNNI/AMX), "
                    "portable (exact on every CPU), arm64")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (usage is in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parent(*adders) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    for add in adders:
        add(p)
    return p


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--config", help="TOML file with [fold] [bound] [calib] [export] [engine] [eval] sections; flags override it")
    g.add_argument("--out", default="qfold-out", help="output folder (default: qfold-out); the run's files replace an earlier "
                   "qfold run's there, and it never writes over files qfold did not write")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--debug", action="store_true", help="show the Python traceback of an error")


def _model(p: argparse.ArgumentParser) -> None:
    from qfold.examples import MODELS

    names = sorted(MODELS)
    g = p.add_argument_group("model and data")
    g.add_argument("--example", nargs="?", const="resnet", default=None, choices=names, metavar="NAME",
                   help=f"use a built-in reference model and its shipped MNIST data; NAME is one of {', '.join(names)} (default: resnet)")
    g.add_argument("--model", help="'package.module:factory' (a function returning the model) or a saved ExportedProgram (.pt2)")
    g.add_argument("--checkpoint", help="state_dict file (.pt) loaded into the model that the --model factory returns")
    g.add_argument("--calib-data", help=".npy/.npz file, image folder (one sub-folder per class), 'package.module:function', or example:calib / example:test")


def _eval_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-data", help="as --calib-data; labels ('y' in a .npz) enable accuracy metrics")
    p.add_argument("--max-drop", type=float, metavar="PP", help="exit 3 when the engine's top-1 drop exceeds PP percentage points "
                   "(needs labelled evaluation data)")


def _stage_samples(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage-samples", type=int, metavar="N", help="for speed: measure the folded and bounded stages and the "
                   "per-layer report on the first N evaluation samples (fake-quant and engine always see all; the report says so)")


def _fold(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-reparam", action="store_true", help="skip RepVGG-style branch merging")
    p.add_argument("--strict-fold", action="store_true", help="fail when a BatchNorm cannot be folded")


def _bound(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bound-mode", choices=cfgmod.BOUND_MODES, help="ReLU -> ReLU6: preserve (default), swap, off")


def _calib(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=cfgmod.CALIB_METHODS, help="activation calibration method (default: max; see README)")
    p.add_argument("--percentile", type=float, help="percentile for --method percentile (default 99.99)")


def _keep_float(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep-float", action="append", default=None, metavar="PATTERN",
                   help="keep matching layers in float: glob on the name, 're:<regex>' or 'type:<Class>' (repeatable)")


def _opset(p: argparse.ArgumentParser) -> None:
    lo, hi = cfgmod.OPSET_RANGE["torchscript"]
    p.add_argument("--opset", type=int, help=f"ONNX opset, {lo} to {hi} (default 17)")


def _backend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=cfgmod.BACKENDS, help="engine backend (default: onnxruntime)")
    p.add_argument("--cpu-target", choices=cfgmod.CPU_TARGETS, help=_CPU_TARGET_HELP)


def _fallback(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fallback", choices=cfgmod.FALLBACK_MODES,
                   help="auto: keep the fewest layers float (FP16 on TensorRT) so the engine's drop is within --max-drop")


def _sensitivity_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-data", help="as --calib-data; labels ('y' in a .npz) add the top-1 drop to the ranking")


def _config(args: argparse.Namespace) -> cfgmod.PTQConfig:
    base = cfgmod.load_config(args.config) if getattr(args, "config", None) else cfgmod.PTQConfig()
    over: dict[str, dict] = {}

    def put(section: str, key: str, value: object) -> None:
        if value is not None:
            over.setdefault(section, {})[key] = value

    put("fold", "reparameterize", False if getattr(args, "no_reparam", False) else None)
    put("fold", "strict", True if getattr(args, "strict_fold", False) else None)
    put("bound", "mode", getattr(args, "bound_mode", None))
    put("calib", "method", getattr(args, "method", None))
    put("calib", "percentile", getattr(args, "percentile", None))
    put("export", "keep_float", getattr(args, "keep_float", None))
    put("export", "opset", getattr(args, "opset", None))
    put("engine", "backend", getattr(args, "backend", None))
    put("engine", "cpu_target", getattr(args, "cpu_target", None))
    put("eval", "max_drop_pp", getattr(args, "max_drop", None))
    put("eval", "fallback", getattr(args, "fallback", None))
    put("eval", "stage_samples", getattr(args, "stage_samples", None))
    cfg = base.replace(**over) if over else base
    if getattr(args, "no_progress", False):
        cfg = cfgmod.from_dict({**cfg.to_dict(), "progress": False})
    return cfg


def _load(args: argparse.Namespace, cfg: cfgmod.PTQConfig) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Model and data as the flags say, checked against each other before any work (warnings printed)."""
    from qfold.inputs import sources as sources
    from qfold.inputs.validate import check_model_and_data

    eval_data = getattr(args, "eval_data", None)
    if args.example is not None:
        extra = [flag for flag, v in (("--model", args.model), ("--checkpoint", args.checkpoint),
                                      ("--calib-data", args.calib_data), ("--eval-data", eval_data)) if v]
        if extra:
            raise ValueError(f"--example brings its own model and data, so {' and '.join(extra)} would be ignored; "
                             "drop --example or drop " + " and ".join(extra))
        from qfold.examples import load_data, load_model

        model = load_model(args.example)
        calib_x, _ = load_data("calib")
        eval_x, eval_y = load_data("test")
    else:
        if not args.model:
            raise ValueError("no model: pass --model package.module:factory (or a .pt2 file), or --example")
        if args.checkpoint and args.model.endswith(".pt2"):
            raise ValueError("--checkpoint loads a state_dict into a --model factory's model; a .pt2 program already holds its weights, drop --checkpoint")
        model = sources.load_model(args.model, args.checkpoint)
        if not args.calib_data:
            raise ValueError("no calibration data: pass --calib-data (qfold never calibrates on random data)")
        calib_x, _ = sources.load_data(args.calib_data)
        eval_x, eval_y = sources.load_data(eval_data) if eval_data else (None, None)
    if cfg.calib.max_samples is not None:
        calib_x = calib_x[: cfg.calib.max_samples]
    budget = cfg.eval.max_drop_pp if args.command in ("ptq", "eval") else None
    for w in check_model_and_data(model, calib_x, eval_x, eval_y, max_drop_pp=budget):
        print(f"qfold {args.command}: warning: {w}", file=sys.stderr)
    return model, calib_x, eval_x, eval_y


def _write_json(path: Path, data: object) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def cmd_ptq(args: argparse.Namespace, cfg: cfgmod.PTQConfig, run: outdir.Run) -> int:
    from qfold.errors import InputWarning
    from qfold.pipeline import run_ptq

    model, calib_x, eval_x, eval_y = _load(args, cfg)
    atomic_write_text(run.path / "config.toml", cfgmod.to_toml(cfg))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InputWarning)  # _load printed them
            res = run_ptq(model, calib_x, eval_x, eval_y, config=cfg, out_dir=run.path)
    except QualityGateError as exc:
        print(f"qfold: {exc}".replace(str(run.path), str(run.out)), file=sys.stderr)
        run.status = "failed: accuracy budget exceeded"
        return EXIT_BUDGET
    print(res.accuracy.to_markdown(worst=5))
    print(f"artifacts in {run.out}/: " + ", ".join(sorted(p.name for p in res.artifacts.values())))
    return 0


def cmd_fold(args: argparse.Namespace, cfg: cfgmod.PTQConfig, run: outdir.Run) -> int:
    from qfold.pipeline import fold_stage

    model, calib_x, _, _ = _load(args, cfg)
    folded, reports = fold_stage(model, cfg, calib_x[:2])
    for name, rep in reports.items():
        print(rep)
        _write_json(run.path / f"{name}_report.json", rep.to_dict())
    _export_float(folded, calib_x[:1], run, "model_folded.onnx", cfg)
    return 0


def cmd_bound(args: argparse.Namespace, cfg: cfgmod.PTQConfig, run: outdir.Run) -> int:
    from qfold.pipeline import bound_stage, fold_stage

    model, calib_x, _, _ = _load(args, cfg)
    folded, _ = fold_stage(model, cfg, calib_x[:2])
    bounded, report = bound_stage(folded, calib_x, cfg)
    if report is not None:
        print(report)
        _write_json(run.path / "bound_report.json", report.to_dict())
    _export_float(bounded, calib_x[:1], run, "model_bounded.onnx", cfg)
    return 0


def _export_float(model: torch.nn.Module, example: torch.Tensor, run: outdir.Run, name: str, cfg: cfgmod.PTQConfig) -> None:
    from qfold.onnx import export_onnx

    export_onnx(model, example, run.path / name, cfg.export)
    print(f"wrote {run.out / name}")


def _calibrated(args: argparse.Namespace, cfg: cfgmod.PTQConfig):
    """Fold, bound and calibrate as the arguments say: ``(model, calib_x, fake-quant model, plan, calib result)``."""
    from qfold import pipeline as pl

    model, calib_x, _, _ = _load(args, cfg)
    folded, _ = pl.fold_stage(model, cfg, calib_x[:2])
    bounded, _ = pl.bound_stage(folded, calib_x, cfg)
    fq, plan, cres = pl.calibrate_stage(bounded, calib_x, cfg)
    return model, calib_x, fq, plan, cres


def cmd_calibrate(args: argparse.Namespace, cfg: cfgmod.PTQConfig, run: outdir.Run) -> int:
    from qfold.quant.calibrate import calibration_table

    model, calib_x, fq, _, cres = _calibrated(args, cfg)
    table = calibration_table(fq, cres, calib_x, model)
    table.save_json(run.path / "calibration.json")
    for k, v in table.amax.items():
        print(f"{k:40s} amax {v:.6g}")
    print(f"wrote {run.out / 'calibration.json'} ({calib_x.shape[0]} samples)")
    return 0


def cmd_export(args: argparse.Namespace, cfg: cfgmod.PTQConfig, run: outdir.Run) -> int:
    from qfold import pipeline as pl

    _, calib_x, fq, plan, cres = _calibrated(args, cfg)
    path, violations = pl.export_stage(fq, calib_x[:1], run.path, cfg, plan.precision_map(), cres)
    for v in violations:
        print(f"TensorRT rule: {v}", file=sys.stderr)
    print(f"wrote {run.final(path)}")
    return 0


def cmd_build(args: argparse.Namespace, cfg: cfgmod.PTQConfig, run: outdir.Run) -> int:
    from qfold.inputs.validate import check_onnx_file
    from qfold.pipeline import build_engine_stage

    onnx_path = Path(args.onnx)
    check_onnx_file(onnx_path)
    calib_x = None
    if args.calib_data:
        from qfold.inputs import sources as sources

        calib_x, _ = sources.load_data(args.calib_data)
        if cfg.calib.max_samples is not None:
            calib_x = calib_x[: cfg.calib.max_samples]
    engine = build_engine_stage(onnx_path, run.path, cfg, calib_x)
    print(f"built {run.final(engine.info.engine_path)} ({engine.info.backend})")
    _print_self_check(engine.info.extra)
    left = engine.info.extra.get("float_for_lack_of_amax") or []
    if left:
        print(f"note: {len(left)} tensor(s) the ONNX Runtime rendering would quantize had no amax, so their layers run in "
              "float (slower, not less accurate); pass --calib-data to calibrate them", file=sys.stderr)
    return 0


def _print_self_check(extra: dict) -> None:
    if "cpu_target" not in extra:
        return
    check = extra.get("self_check")
    print(f"cpu target: {extra['cpu_target']} (built on {extra['built_on_cpu']['describe']})")
    if check is None:
        print("note: no engine self-check ran (no calibration data); pass --calib-data to run it", file=sys.stderr)
    else:
        print(f"self-check passed: max error {check['max_err_steps']:.2f} output steps vs its portable twin (exact u8 x u8 kernels), SQNR {check['sqnr_db']:.2f} dB")
        rendering = extra.get("rendering_check")
        if rendering is not None:
            print(f"vs the fake-quant model (the Q/DQ ONNX as float ops): max error {rendering['max_err_steps']:.2f} output steps, "
                  f"SQNR {rendering['sqnr_db']:.2f} dB")


def cmd_eval(args: argparse.Namespace, cfg: cfgmod.PTQConfig, run: outdir.Run) -> int:
    import numpy as np

    from qfold.engine import get_backend
    from qfold.inputs.rows import rows as batch_rows
    from qfold.report import stages as ev

    engine_path = Path(args.engine)
    if not engine_path.is_file():
        raise FileNotFoundError(f"engine {engine_path} does not exist; build one with `qfold build` or `qfold ptq`")
    model, calib_x, eval_x, eval_y = _load(args, cfg)
    x = calib_x if eval_x is None else eval_x
    backend = get_backend(cfg.engine.backend)
    engine = backend.load(engine_path, cfg.engine)
    bs = batch_rows(cfg.eval.batch_size, model, x)
    ref = ev.run_logits(model, x, bs, cfg.progress, "FP32")
    report = ev.AccuracyReport(reference=ev.reference_metrics(ref, eval_y))
    out = ev.run_logits(lambda xb: engine.run(xb.numpy().astype(np.float32)), x, bs, cfg.progress, "engine")
    report.stages["engine"] = ev.stage_metrics(ref, out, eval_y)
    report.save(run.path, stem="engine_accuracy")
    print(report.to_markdown())
    if hasattr(engine, "check"):  # ONNX Runtime: the build's self-check, on this CPU
        from qfold.engine.ort import self_check_rows
        from qfold.inputs.sources import batches

        rows = self_check_rows(int(np.prod(calib_x.shape[1:])))
        check = engine.check(b.numpy() for b in batches(calib_x[:rows], batch_rows(cfg.calib.batch_size, model, calib_x)))
        _write_json(run.path / "engine_check.json", check.to_dict())
        print(f"engine self-check on this CPU ({engine.cpu.describe()}, runs as '{engine.running_as}'): "
              f"{'passed' if check.passed else 'FAILED'}; {check.summary()}", file=sys.stdout if check.passed else sys.stderr)
    try:
        report.check_budget(cfg.eval.max_drop_pp, run.out / "engine_accuracy.md")
    except QualityGateError as exc:
        print(f"qfold: {exc}", file=sys.stderr)
        run.status = "failed: accuracy budget exceeded"
        return EXIT_BUDGET
    return 0


def cmd_sensitivity(args: argparse.Namespace, cfg: cfgmod.PTQConfig, run: outdir.Run) -> int:
    from qfold.budget.sensitivity import analyze

    model, calib_x, eval_x, eval_y = _load(args, cfg)
    report = analyze(model, calib_x, eval_x, eval_y, cfg)
    paths = report.save(run.path, plot=cfg.eval.plots)
    print(report.to_markdown())
    print("wrote " + ", ".join(str(run.final(p)) for p in paths))
    return 0


#: name -> (function, one-line help, parent parsers of its own flags)
_COMMANDS: dict[str, tuple[Any, str, tuple[Any, ...]]] = {
    "ptq": (cmd_ptq, "the whole path: fold, bound, calibrate, export, build, evaluate",
            (_common, _model, _eval_data, _stage_samples, _fallback, _fold, _bound, _calib, _keep_float, _opset, _backend)),
    "fold": (cmd_fold, "merge branches and fold BatchNorm; writes the report and a float ONNX", (_common, _model, _fold)),
    "bound": (cmd_bound, "fold, then ReLU -> ReLU6; writes the report and a float ONNX", (_common, _model, _fold, _bound)),
    "calibrate": (cmd_calibrate, "fold, bound, calibrate; writes calibration.json",
                  (_common, _model, _fold, _bound, _calib, _keep_float)),
    "export": (cmd_export, "fold, bound, calibrate, export the TensorRT-profile Q/DQ ONNX",
               (_common, _model, _fold, _bound, _calib, _keep_float, _opset)),
    "build": (cmd_build, "build an engine from a Q/DQ ONNX", (_common, _backend)),
    "eval": (cmd_eval, "measure an engine against the FP32 model", (_common, _model, _eval_data, _backend)),
    "sensitivity": (cmd_sensitivity, "rank the quantized layers by the output error when only one is quantized or only one is float",
                    (_common, _model, _sensitivity_data, _fold, _bound, _calib, _keep_float)),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests). Each subcommand takes only its own flags."""
    from qfold import __version__

    parser = _Parser(prog="qfold", description=__doc__.split("\n")[0],
                     epilog="Exit status: 0 done, 2 bad input (one line on stderr), 3 accuracy budget exceeded.")
    parser.add_argument("--version", action="version", version=f"qfold {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (fn, help_, adders) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, parents=[_parent(*adders)])
        if name == "build":
            p.add_argument("onnx", help="the Q/DQ ONNX (model_qdq.onnx from qfold export or qfold ptq)")
            p.add_argument("--calib-data", help="calibration data for the tensors only the ONNX Runtime rendering quantizes")
        if name == "eval":
            p.add_argument("--engine", required=True, help="engine file from qfold build or qfold ptq")
        p.set_defaults(func=fn, parser=p)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, (ValueError, FileNotFoundError, BackendUnavailableError)) else f"{type(exc).__name__}: {text}"


#: Errors that mean bad input (exit 2); anything else is a qfold bug or a failure of the model itself (exit 1).
_BAD_INPUT = (ValueError, TypeError, FileNotFoundError, BackendUnavailableError, ImportError, PermissionError, NotADirectoryError, IsADirectoryError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qfold`` console script: 0 done, 2 bad input, 3 accuracy budget exceeded, 1 failure."""
    args, extra = build_parser().parse_known_args(argv)
    if extra:
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}; qfold {args.command} does not take them")
    prog = f"qfold {args.command}"
    try:
        inputs = {f"--{k.replace('_', '-')}": getattr(args, k, None) for k in ("config", "checkpoint", "calib_data", "eval_data", "engine")}
        outdir.check_out_dir(args.out, inputs={**inputs, "the ONNX": getattr(args, "onnx", None), "--model": getattr(args, "model", None)})
        cfg = _config(args)
        if hasattr(args, "backend"):  # before any work: a missing TensorRT fails in a second
            require_backend(cfg.engine.backend)
        tune_allocator()  # this process is qfold's: keep freed tensors in the heap (qfold.host)
        with outdir.owned(args.out) as run:
            return args.func(args, cfg, run)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {args.out} was left as it was", file=sys.stderr)
        return 130
    except Exception as exc:  # every error ends in one line; --debug shows where it came from
        if args.debug:
            traceback.print_exc()
        bad = isinstance(exc, _BAD_INPUT)
        hint = "" if args.debug else " (run with --debug for the traceback)"
        print(f"{prog}: error: {_one_line(exc)}{'' if bad else hint}", file=sys.stderr)
        return 2 if bad else 1


if __name__ == "__main__":
    sys.exit(main())
