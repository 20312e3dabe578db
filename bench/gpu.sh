#!/usr/bin/env bash
# On an NVIDIA GPU host, from a copy of the repository, offline: the FP16 TensorRT throughput of the
# released classifier at 128x128, by trtexec (inside nvcr.io/nvidia/tensorrt or tritonserver images),
# else ONNX Runtime's CUDA provider where onnxruntime-gpu is installed. Writes OUT_DIR/gpu.txt.
# Not run here (no GPU). Usage: bench/gpu.sh [OUT_DIR] [BATCH]
set -uo pipefail
out=${1:-bench/results/gpu}
batch=${2:-256}
onnx=model_repository/malaria_resnet50v2/source/model.onnx
[ -f "$onnx" ] || onnx=model_repository/malaria_resnet50v2/1/model.onnx
mkdir -p "$out"
exec > >(tee "$out/gpu.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no NVIDIA GPU"; exit 1; }
if command -v trtexec >/dev/null; then
  trtexec --onnx="$onnx" --saveEngine="$out/model.plan" --fp16 \
    --minShapes=image:1x128x128x3 --optShapes=image:${batch}x128x128x3 --maxShapes=image:${batch}x128x128x3 \
    --shapes=image:${batch}x128x128x3 --duration=20 --useCudaGraph --noDataTransfers | grep -E "Throughput|Latency|GPU Compute"
  echo "images/s = Throughput (qps) x ${batch}"
elif python3 -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
  python3 - "$onnx" "$batch" <<'PY'
import sys, time
import numpy as np
import onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CUDAExecutionProvider"])
batch = np.random.default_rng(0).integers(0, 256, (int(sys.argv[2]), 128, 128, 3), dtype=np.uint8)
for _ in range(5):
    session.run(None, {"image": batch})
runs, started = 50, time.perf_counter()
for _ in range(runs):
    session.run(None, {"image": batch})
print(f"ONNX Runtime CUDA, batch {len(batch)}: {runs * len(batch) / (time.perf_counter() - started):.0f} images/s")
PY
else
  echo "neither trtexec nor onnxruntime-gpu here: run inside nvcr.io/nvidia/tensorrt:25.10-py3"
  exit 1
fi
