#!/usr/bin/env python3
"""Edge-deployment build: ``python tools/build_edge.py tools/edge/example.toml``.

Folds, bounds, calibrates, exports, builds and evaluates the model the TOML names, and writes an
artifact folder (Q/DQ ONNX, calibration JSON + TensorRT cache, engine, reports, manifest with
sha256 of every artifact and the toolchain versions). Exit status: 0 built, 3 accuracy budget
exceeded (the manifest and accuracy.md say by how much), 2 bad input.
"""
from __future__ import annotations

import argparse
import sys
import traceback


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Edge-deployment build: fold, bound, calibrate, export, build and evaluate the model a "
                                 "build TOML names, into an artifact folder with a manifest. Exit status: 0 built, 2 bad input "
                                 "(one line), 3 accuracy budget exceeded.")
    ap.add_argument("build_toml", help="the build description (see tools/edge/example.toml)")
    ap.add_argument("--out", help="artifact folder (overrides the file's [output] dir)")
    ap.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    args = ap.parse_args(argv)
    from qfold.edge import run_build
    from qfold.errors import QualityGateError
    from qfold.host import tune_allocator

    tune_allocator()  # this script owns its process, as the qfold command does (qfold/host.py)
    try:
        manifest = run_build(args.build_toml, args.out)
    except QualityGateError as exc:
        print(f"build_edge: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("build_edge: interrupted; the output folder was left as it was", file=sys.stderr)
        return 130
    except Exception as exc:  # every error ends in one line; --debug shows where it came from
        if args.debug:
            traceback.print_exc()
        bad = isinstance(exc, (ValueError, TypeError, FileNotFoundError, ImportError, PermissionError, NotADirectoryError))
        text = " ".join(str(exc).split()) or type(exc).__name__
        print(f"build_edge: error: {text if bad else f'{type(exc).__name__}: {text} (run with --debug for the traceback)'}",
              file=sys.stderr)
        return 2 if bad else 1
    drop = manifest["accuracy"]["engine_top1_drop_pp"]
    print(f"built {len(manifest['artifacts'])} artifacts; engine top-1 drop "
          + ("n/a (no labels)" if drop is None else f"{drop:+.2f} pp"))
    for name, digest in manifest["artifacts"].items():
        print(f"  {digest[:16]}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
