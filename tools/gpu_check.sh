#!/usr/bin/env bash
# The one prepared GPU check. From a qfold checkout on a machine with an NVIDIA GPU:
#
#   bash tools/gpu_check.sh [--require-tensorrt | --no-require-tensorrt] [--skip-suite] [OUT_DIR]
#
# 1. needs nvidia-smi (an NVIDIA driver); otherwise one line and exit 2, before installing anything;
# 2. installs the project with its test extras (pip install -e ".[test]") when any is missing;
# 3. when `import tensorrt` fails and NVIDIA's index (https://pypi.nvidia.com) is reachable, installs
#    the TensorRT wheel for torch's CUDA major and the driver (tensorrt-cu12 or tensorrt-cu13, chosen
#    by `python -m qfold.engine.trt_install`);
# 4. runs the CUDA- and TensorRT-marked tests (TensorRT ones must run, not skip), then the whole suite
#    (unless --skip-suite);
# 5. runs tools/trt_check.py: qfold's PTQ pipeline on the resnet example, INT8 (FP32 and FP16
#    fallback) and FP16 TensorRT engines built, run, compared with the fake-quant model, latencies.
#
# --require-tensorrt (the default): without TensorRT it prints ONE line, "TensorRT not installed:
# not verified", and exits 2. --no-require-tensorrt: the CUDA tests and the CPU half only.
# Exit 0 only when every step passed; logs and the JSON report are in OUT_DIR (default gpu-check).
set -euo pipefail

require=1
suite=1
out=gpu-check
for arg in "$@"; do
  case "$arg" in
    --require-tensorrt) require=1 ;;
    --no-require-tensorrt) require=0 ;;
    --skip-suite) suite=0 ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) out=$arg ;;
  esac
done

cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
PY=${PYTHON:-python3}
NVIDIA_INDEX=https://pypi.nvidia.com
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
logf=$out/gpu_check.log
: > "$logf"
note() { echo "$*" >> "$logf"; }
fail() { echo "$1" >&2; note "FAILED: $1"; exit "${2:-1}"; }

# 1. a GPU, before touching the Python environment
if ! command -v nvidia-smi > /dev/null 2>&1 || ! nvidia-smi > "$out/nvidia-smi.txt" 2>&1; then
  if [ "$require" = 1 ]; then fail "no NVIDIA GPU (nvidia-smi missing or failing): TensorRT not verified" 2; fi
  fail "no NVIDIA GPU (nvidia-smi missing or failing): nothing to check" 2
fi

# 2. the project and its test extras (installed only when something is missing; tests needing mlxtend
#    or onnxscript skip with the reason when those optional extras cannot be installed)
needed="import torch, onnx, onnxruntime, numpy, pytest, hypothesis, sklearn, qfold, calib"
if ! "$PY" -c "$needed" >> "$logf" 2>&1 || ! "$PY" -c "import mlxtend, onnxscript" > /dev/null 2>&1; then
  if ! "$PY" -m pip install --retries 1 --timeout 20 -e ".[test]" > "$out/pip_project.log" 2>&1; then
    note "pip install -e .[test] failed (see pip_project.log); using the checkout as it is"
  fi
  "$PY" -c "$needed" >> "$logf" 2>&1 || fail "could not install qfold's test dependencies (see $out/pip_project.log)"
fi

# 3. TensorRT: the wheel for torch's CUDA major, from NVIDIA's index when it is reachable
have_trt() { "$PY" -c "import tensorrt" > /dev/null 2>&1; }
if ! have_trt; then
  if "$PY" -c "import urllib.request as u; u.urlopen('$NVIDIA_INDEX/', timeout=15)" >> "$logf" 2>&1; then
    if wheel=$("$PY" -m qfold.engine.trt_install 2>> "$logf"); then
      note "installing $wheel from $NVIDIA_INDEX"
      "$PY" -m pip install --retries 1 --timeout 60 "$wheel" --extra-index-url "$NVIDIA_INDEX" \
        > "$out/pip_tensorrt.log" 2>&1 \
        || note "pip install $wheel failed (see pip_tensorrt.log)"
    fi
  else
    note "$NVIDIA_INDEX is not reachable: TensorRT cannot be installed here"
  fi
fi
if have_trt; then
  trt=1
  "$PY" -c "import tensorrt as t; print('tensorrt', t.__version__)" >> "$logf"
else
  trt=0
  if [ "$require" = 1 ]; then fail "TensorRT not installed: not verified" 2; fi
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" >> "$logf"

# 4. tests: CUDA and TensorRT ones first (TensorRT tests must run), then the whole suite
markers="cuda"; [ "$trt" = 1 ] && markers="cuda or tensorrt"
"$PY" -m pytest -q -rs -p no:cacheprovider -m "$markers" tests > "$out/gpu_tests.log" 2>&1 \
  || fail "CUDA/TensorRT tests failed (see $out/gpu_tests.log)"
if [ "$trt" = 1 ] && grep -q "SKIPPED.*tensorrt\|needs TensorRT" "$out/gpu_tests.log"; then
  fail "TensorRT tests were skipped although tensorrt imports (see $out/gpu_tests.log)"
fi
if [ "$suite" = 1 ]; then
  "$PY" -m pytest -q -p no:cacheprovider tests > "$out/all_tests.log" 2>&1 \
    || fail "the test suite failed on this machine (see $out/all_tests.log)"
fi

# 5. engines of the example: built, run, compared with fake-quant, timed
flag=--require-tensorrt; [ "$trt" = 1 ] || flag=--no-require-tensorrt
rc=0
"$PY" tools/trt_check.py --out "$out/trt" "$flag" > "$out/trt_check.json" 2> "$out/trt_check.err" || rc=$?
if [ "$rc" != 0 ]; then
  fail "$(tail -1 "$out/trt_check.err") (tools/trt_check.py exit $rc; see $out/trt_check.err)" "$rc"
fi
grep '^|' "$out/trt_check.err" || true
tail -1 "$out/trt_check.err"
if [ "$trt" = 0 ]; then
  echo "gpu_check: CUDA tests passed; TensorRT not installed: not verified (--no-require-tensorrt)"
fi
