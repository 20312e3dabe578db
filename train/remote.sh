#!/usr/bin/env bash
# Train on a borrowed GPU host that has JAX (and PyTorch) but no TensorFlow and no package index:
# the Keras wheels travel in .whl/, the packed cells in .carry/ (see train/remote.py).
# Usage, from the repository root there: train/remote.sh OUT_DIR [SECONDS_FOR_EVERYTHING]
set -uo pipefail
out=${1:?output folder}
total=${2:-560}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
backend=jax
KERAS_BACKEND=jax python3 -c "import jax, keras; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__); keras.ops.convert_to_numpy(keras.ops.conv(keras.ops.ones((1, 8, 8, 3)), keras.ops.ones((3, 3, 3, 4))))" || backend=torch
echo "backend: $backend"
KERAS_BACKEND=$backend python3 -m smearscope remote fit --pack .carry/nih-cells.npz --out "$out" --budget-s $((total - SECONDS)) "${@:3}"
