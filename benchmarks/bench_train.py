"""Training-step throughput: compile time and steady-state images/s, side by side.

    python benchmarks/bench_train.py                      # digits default
    python benchmarks/bench_train.py --config configs/cifar10.py --batch 32 --steps 5

Compares ``training.steps_per_call`` = 1 (a plain jitted step) with k > 1 (a
``lax.scan`` of k steps per host call) in one run on the same machine.
"""

import argparse
import importlib.util
import time

import jax
import jax.numpy as jnp

from diffusion_jax import config_lib
from diffusion_jax import train


def load_config(path):
  if path is None:
    return config_lib.digits_config()
  spec = importlib.util.spec_from_file_location('cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def measure(config, steps_per_call: int, calls: int):
  model, schedule, optimizer, mesh, state = train.setup(config)
  fn = train.make_train_fn(config, model, schedule, optimizer, mesh)
  shape = (steps_per_call, config.training.batch_size) + train.image_shape(config)
  batch = {'image': jnp.zeros(shape, jnp.float32)}
  t0 = time.perf_counter()
  state, _ = fn(state, batch)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(calls):
    state, _ = fn(state, batch)
  jax.block_until_ready(state)
  per_step = (time.perf_counter() - t0) / (calls * steps_per_call)
  return compile_s, per_step


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--config', default=None)
  p.add_argument('--batch', type=int, default=None)
  p.add_argument('--steps', type=int, default=20, help='steps timed per variant')
  p.add_argument('--scan', type=int, default=4, help='k for the lax.scan variant (0: skip)')
  p.add_argument('--dtype', default=None, choices=('float32', 'bfloat16'),
                 help="model.dtype (default: the config's)")
  args = p.parse_args()
  config = load_config(args.config)
  if args.batch:
    config.training.batch_size = args.batch
  if args.dtype:
    config.model.dtype = args.dtype
  print(f'devices: {jax.devices()}  batch {config.training.batch_size}  '
        f'image {train.image_shape(config)}  {config.model.dtype}')
  variants = [1] + ([args.scan] if args.scan > 1 else [])
  base = None
  for k in variants:
    compile_s, per_step = measure(config, k, max(1, args.steps // k))
    base = base or per_step
    print(f'steps_per_call={k}: compile {compile_s:6.1f} s, {per_step * 1e3:8.1f} ms/step, '
          f'{config.training.batch_size / per_step:8.0f} images/s, '
          f'{base / per_step:5.2f}x the single-step speed')


if __name__ == '__main__':
  main()
