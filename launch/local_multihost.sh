#!/usr/bin/env bash
# Two JAX processes on this machine talking over jax.distributed on 127.0.0.1,
# each with 4 fake CPU devices: a rehearsal of a multi-host run.
#   bash launch/local_multihost.sh WORKDIR [extra --config.x=y flags]
set -euo pipefail
WORKDIR=${1:-runs/multihost}; shift || true
PORT=${PORT:-$((20000 + RANDOM % 20000))}
export XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu
export JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAX_NUM_PROCESSES=2
pids=()
for i in 0 1; do
  JAX_PROCESS_ID=$i python -m diffusion_jax.main --workdir "$WORKDIR" "$@" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
