#!/usr/bin/env bash
# Runs inside the official TensorRT container on the target GPU host (see docker-compose.yml):
# builds the engines of every graph in the field path (the classifier and the detector in FP16, the
# detector with its own profile of field sizes; the crop graph in FP32, without TF32, as its levels are
# rounded exactly) and regenerates their config.pbtxt for tensorrt_plan.
set -euo pipefail
cd /workspace/smearscope
# The config generator uses Triton's own protobuf schema; numpy/pillow for the shared contract package.
python -m pip install -q "tritonclient[grpc]>=2.51,<3" "protobuf>=6.33,<7" numpy pillow
python -m smearscope build-engine --repository model_repository --name "${MODEL_NAME:-malaria_resnet50v2}" \
  --opt-batch "${OPT_BATCH:-64}" --max-batch "${MAX_BATCH:-256}"
python -m smearscope build-engine --repository model_repository --name rbc_detector
python -m smearscope build-engine --repository model_repository --name cell_crops
