#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (every host runs the same command; JAX finds the
# coordinator itself on TPU VMs).
#   bash launch/tpu_vm.sh NAME ZONE [ACCELERATOR] [CONFIG] [WORKDIR]
# Example: bash launch/tpu_vm.sh ddpm-cifar us-central2-b v4-32 configs/cifar10.py gs://bucket/runs/cifar10
# The data set must be prepared in array_record format under DATA_DIR on every
# host (or a mounted bucket): see docs/data.md.
set -euo pipefail
NAME=${1:?tpu name}; ZONE=${2:?zone}; ACCEL=${3:-v4-8}
CONFIG=${4:-configs/cifar10.py}; WORKDIR=${5:-runs/$(basename "$CONFIG" .py)}
DATA_DIR=${DATA_DIR:-$HOME/tensorflow_datasets}
REPO=${REPO:-https://github.com/your-org/diffusion_jax.git}

gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$ACCEL" \
    --version tpu-ubuntu2204-base 2>/dev/null || echo "TPU $NAME exists; reusing it."
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d diffusion_jax ] || git clone $REPO diffusion_jax
  cd diffusion_jax && pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  python3 -m diffusion_jax.main --config $CONFIG --workdir $WORKDIR \
      --config.data.data_dir=$DATA_DIR --config.training.distributed=True
"
