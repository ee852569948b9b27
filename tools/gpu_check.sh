#!/usr/bin/env bash
# The one prepared GPU check: CUDA-marked tests, the whole suite on the GPU machine's own torch,
# and the TensorRT check script. Usage (repo root, on a CUDA machine): bash tools/gpu_check.sh [OUT_DIR]
set -u
out=${1:-gpu-check}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, onnx, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'onnx', onnx.__version__, 'ort', o.__version__)" | tee -a "$out/gpu.txt"
python3 -c "import tensorrt as t; print('tensorrt', t.__version__)" 2>&1 | tail -1 | tee -a "$out/gpu.txt"
echo "== CUDA and TensorRT tests"
python3 -m pytest -q -rs -p no:cacheprovider -m "cuda or tensorrt" tests 2>&1 | tee "$out/cuda_tests.log" | tail -15
echo "== whole suite"
python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$out/all_tests.log" | tail -8
echo "== TensorRT check"
python3 tools/trt_check.py --out "$out/trt" > "$out/trt_check.json" 2> "$out/trt_check.err"; echo "trt_check rc=$?"
tail -5 "$out/trt_check.err"
