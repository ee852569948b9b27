"""``qfold``: the command line. Flags map onto :class:`qfold.config.PTQConfig`; the work is in the pipeline.

Subcommands run the pipeline up to their step and write that step's artifacts:
``fold`` -> ``bound`` -> ``calibrate`` -> ``export``; ``build`` turns a Q/DQ ONNX into an engine;
``eval`` measures an engine against the FP32 model; ``sensitivity`` ranks the quantized layers;
``ptq`` does everything (``--fallback auto`` searches the layers to keep float for ``--max-drop``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from calib.atomic import atomic_write_text
from qfold import config as cfgmod

EXIT_BUDGET = 3


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--example", nargs="?", const="resnet", default=None, metavar="NAME",
                   help="use a built-in reference model and its shipped MNIST data (default: resnet)")
    g.add_argument("--model", help="'package.module:factory' or a saved ExportedProgram (.pt2)")
    g.add_argument("--checkpoint", help="state_dict file loaded into the --model factory's model")
    g.add_argument("--calib-data", help=".npy/.npz, image folder, or 'package.module:function'")
    g.add_argument("--eval-data", help="as --calib-data; labels ('y') enable accuracy metrics")
    g.add_argument("--config", help="TOML file with [fold] [bound] [calib] [export] [engine] [eval] sections")
    g.add_argument("--out", default="qfold-out", help="output folder (default: qfold-out)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_option_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("options (override the --config file)")
    g.add_argument("--no-reparam", action="store_true", help="skip RepVGG-style branch merging")
    g.add_argument("--strict-fold", action="store_true", help="fail when a BatchNorm cannot be folded")
    g.add_argument("--bound-mode", choices=cfgmod.BOUND_MODES, help="ReLU->ReLU6: preserve (default), swap, off")
    g.add_argument("--method", choices=cfgmod.CALIB_METHODS, help="activation calibration method (default: max; see README)")
    g.add_argument("--percentile", type=float, help="percentile for --method percentile (default 99.99)")
    g.add_argument("--keep-float", action="append", default=None, metavar="PATTERN",
                   help="keep matching layers in float: glob on the name, 're:<regex>' or 'type:<Class>' (repeatable)")
    g.add_argument("--opset", type=int, help="ONNX opset (>= 13, default 17)")
    g.add_argument("--backend", choices=cfgmod.BACKENDS, help="engine backend (default: onnxruntime)")
    g.add_argument("--max-drop", type=float, metavar="PP", help="exit non-zero when the engine's top-1 drop exceeds PP points")
    g.add_argument("--fallback", choices=cfgmod.FALLBACK_MODES,
                   help="auto: keep the fewest layers float (FP16 on TensorRT) so the engine's drop is within --max-drop")


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
    put("eval", "max_drop_pp", getattr(args, "max_drop", None))
    put("eval", "fallback", getattr(args, "fallback", None))
    cfg = base.replace(**over) if over else base
    if getattr(args, "no_progress", False):
        cfg = cfgmod.from_dict({**cfg.to_dict(), "progress": False})
    return cfg


def _load(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    from qfold import sources

    if args.example is not None:
        if args.model:
            raise ValueError("give either --example or --model, not both")
        from qfold.examples import load_data, load_model

        model = load_model(args.example)
        calib_x, _ = load_data("calib")
        eval_x, eval_y = load_data("test")
    else:
        if not args.model:
            raise ValueError("no model: pass --model package.module:factory (or a .pt2 file), or --example")
        model = sources.load_model(args.model, args.checkpoint)
        if not args.calib_data:
            raise ValueError("no calibration data: pass --calib-data (qfold never calibrates on random data)")
        calib_x, _ = sources.load_data(args.calib_data)
        eval_x, eval_y = sources.load_data(args.eval_data) if args.eval_data else (None, None)
    return model, calib_x, eval_x, eval_y


def cmd_ptq(args: argparse.Namespace) -> int:
    from qfold.pipeline import QualityGateError, run_ptq

    cfg = _config(args)
    model, calib_x, eval_x, eval_y = _load(args)
    out = Path(args.out)
    atomic_write_text(out / "config.toml", cfgmod.to_toml(cfg))
    try:
        res = run_ptq(model, calib_x, eval_x, eval_y, config=cfg, out_dir=out)
    except QualityGateError as exc:
        print(f"qfold: {exc}", file=sys.stderr)
        return EXIT_BUDGET
    print(res.accuracy.to_markdown(worst=5))
    print(f"artifacts in {out}/: " + ", ".join(sorted(p.name for p in res.artifacts.values())))
    return 0


def cmd_fold(args: argparse.Namespace) -> int:
    from qfold.pipeline import fold_stage

    cfg = _config(args)
    model, calib_x, _, _ = _load(args)
    folded, reports = fold_stage(model, cfg, calib_x[:2])
    out = Path(args.out)
    for name, rep in reports.items():
        print(rep)
        atomic_write_text(out / f"{name}_report.json", json.dumps(rep.to_dict(), indent=2, sort_keys=True) + "\n")
    _export_float(folded, calib_x[:1], out / "model_folded.onnx", cfg)
    return 0


def cmd_bound(args: argparse.Namespace) -> int:
    from qfold.pipeline import bound_stage, fold_stage

    cfg = _config(args)
    model, calib_x, _, _ = _load(args)
    folded, _ = fold_stage(model, cfg, calib_x[:2])
    bounded, report = bound_stage(folded, calib_x, cfg)
    out = Path(args.out)
    if report is not None:
        print(report)
        atomic_write_text(out / "bound_report.json", json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
    _export_float(bounded, calib_x[:1], out / "model_bounded.onnx", cfg)
    return 0


def _export_float(model: torch.nn.Module, example: torch.Tensor, path: Path, cfg: cfgmod.PTQConfig) -> None:
    from qfold.export import ExportConfig, export_onnx

    export_onnx(model, example, path, ExportConfig(opset=cfg.export.opset, exporter=cfg.export.exporter))
    print(f"wrote {path}")


def _calibrated(args: argparse.Namespace):
    """Fold, bound and calibrate as the arguments say: ``(config, model, calib_x, fake-quant model, calib result)``."""
    from qfold import pipeline as pl

    cfg = _config(args)
    model, calib_x, _, _ = _load(args)
    folded, _ = pl.fold_stage(model, cfg, calib_x[:2])
    bounded, _ = pl.bound_stage(folded, calib_x, cfg)
    fq, _, cres = pl.calibrate_stage(bounded, calib_x, cfg)
    return cfg, model, calib_x, fq, cres


def cmd_calibrate(args: argparse.Namespace) -> int:
    from qfold import pipeline as pl

    _, model, calib_x, fq, cres = _calibrated(args)
    amax = {k: float(q.amax) for k, q in pl.act_quantizers(fq).items()}
    out = Path(args.out)
    path = pl.calibration_table(fq, cres, amax, calib_x, model).save_json(out / "calibration.json")
    for k, v in amax.items():
        print(f"{k:40s} amax {v:.6g}")
    print(f"wrote {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from qfold import pipeline as pl

    cfg, _, calib_x, fq, _ = _calibrated(args)
    path, violations = pl.export_stage(fq, calib_x[:1], Path(args.out), cfg)
    for v in violations:
        print(f"TensorRT rule: {v}", file=sys.stderr)
    print(f"wrote {path}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from qfold.pipeline import build_engine_stage

    cfg = _config(args)
    onnx_path = Path(args.onnx)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"Q/DQ ONNX {onnx_path} does not exist; run `qfold export` first")
    calib_x = None
    if args.calib_data:
        from qfold import sources

        calib_x, _ = sources.load_data(args.calib_data)
    engine = build_engine_stage(onnx_path, Path(args.out), cfg, calib_x)
    print(f"built {engine.info.engine_path} ({engine.info.backend})")
    left = engine.info.extra.get("float_for_lack_of_amax") or []
    if left:
        print(f"note: {len(left)} tensor(s) the ONNX Runtime rendering would quantize had no amax, so their layers run in "
              "float (slower, not less accurate); pass --calib-data to calibrate them", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from qfold import evaluate as ev
    from qfold.engine import get_backend
    from qfold.engine.base import EngineConfig

    cfg = _config(args)
    model, calib_x, eval_x, eval_y = _load(args)
    x = calib_x if eval_x is None else eval_x
    backend = get_backend(cfg.engine.backend)
    engine = backend.load(Path(args.engine), EngineConfig(backend=cfg.engine.backend, device=cfg.engine.device))
    bs = cfg.eval.batch_size
    ref = ev.run_logits(model, x, bs, cfg.progress, "FP32")
    report = ev.AccuracyReport(reference=ev.reference_metrics(ref, eval_y))
    import numpy as np

    out = ev.run_logits(lambda xb: engine.run(xb.numpy().astype(np.float32)), x, bs, cfg.progress, "engine")
    report.stages["engine"] = ev.stage_metrics(ref, out, eval_y)
    report.save(Path(args.out), stem="engine_accuracy")
    print(report.to_markdown())
    drop = report.drop_pp("engine")
    if cfg.eval.max_drop_pp is not None and drop is not None and drop > cfg.eval.max_drop_pp:
        print(f"qfold: engine top-1 drop {drop:.2f} pp exceeds the budget of {cfg.eval.max_drop_pp:.2f} pp", file=sys.stderr)
        return EXIT_BUDGET
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from qfold.sensitivity import analyze

    cfg = _config(args)
    model, calib_x, eval_x, eval_y = _load(args)
    report = analyze(model, calib_x, eval_x, eval_y, cfg)
    paths = report.save(Path(args.out), plot=cfg.eval.plots)
    print(report.to_markdown())
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(prog="qfold", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    specs = [
        ("ptq", cmd_ptq, "the whole path: fold, bound, calibrate, export, build, evaluate"),
        ("fold", cmd_fold, "merge branches and fold BatchNorm; writes the report and a float ONNX"),
        ("bound", cmd_bound, "fold, then ReLU -> ReLU6; writes the report and a float ONNX"),
        ("calibrate", cmd_calibrate, "fold, bound, calibrate; writes calibration.json"),
        ("export", cmd_export, "fold, bound, calibrate, export the TensorRT-profile Q/DQ ONNX"),
        ("build", cmd_build, "build an engine from a Q/DQ ONNX"),
        ("eval", cmd_eval, "measure an engine against the FP32 model"),
        ("sensitivity", cmd_sensitivity, "rank the quantized layers: output when only one is quantized / only one is float"),
    ]
    for name, fn, help_ in specs:
        p = sub.add_parser(name, help=help_, description=help_)
        if name == "build":
            p.add_argument("onnx", help="the Q/DQ ONNX (from `qfold export`)")
            p.add_argument("--out", default="qfold-out")
            p.add_argument("--config")
            p.add_argument("--backend", choices=cfgmod.BACKENDS)
            p.add_argument("--calib-data", help="calibration data for the tensors only the ONNX Runtime rendering quantizes")
        else:
            _add_model_args(p)
            _add_option_args(p)
            if name == "eval":
                p.add_argument("--engine", required=True, help="engine file from `qfold build` / `qfold ptq`")
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qfold`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"qfold {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
