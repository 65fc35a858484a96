#!/usr/bin/env bash
# Train on the GPUs of one machine (all visible GPUs form the data-parallel mesh).
#   bash launch/gpu.sh [CONFIG] [WORKDIR] [extra --config.x=y flags]
# Several machines: run this on each with JAX_COORDINATOR_ADDRESS=host0:1234,
# JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i set (or under SLURM, where JAX finds them).
set -euo pipefail
CONFIG=${1:-configs/cifar10.py}; WORKDIR=${2:-runs/$(basename "$CONFIG" .py)}
shift $(( $# > 2 ? 2 : $# ))
pip install -q -e . 'jax[cuda12]'
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python -m diffusion_jax.main --config "$CONFIG" --workdir "$WORKDIR" \
    --config.model.dtype=bfloat16 "$@"
