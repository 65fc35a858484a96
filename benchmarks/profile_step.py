r"""Where a train step's (and a sampler step's) device time goes, by kernel kind.

    python benchmarks/profile_step.py --config configs/cifar10.py --dtype bfloat16   # on a GPU
    python benchmarks/profile_step.py --xplane /tmp/trace_train/.../host.xplane.pb --per 5

Compiles the config's train step (dropout 0, a random batch placed as
``train.next_batches`` places it) and a DDIM-10 sampler for twice the batch,
times both, then takes a ``jax.profiler`` trace of each (5 train steps; one
sampler call = 10 network calls) and sums the device's kernels by kind:
cuDNN convolutions, matmuls, reductions, transposes, concatenates, copies and
other fusions. ``--xplane`` only summarises a trace taken before.
"""

import argparse
import collections
import glob
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import data as data_lib
from diffusion_jax import sampling
from diffusion_jax import train

from bench_train import load_config   # benchmarks/ is on sys.path when run as a script

KINDS = (('cuDNN convolutions', ('xmma', 'cudnn', 'convolution')),
         ('matmuls', ('nvjet', 'gemm', 'cublas', 'dot')),
         ('transposes', ('transpose',)),
         ('reductions (GroupNorm statistics, norms)', ('reduce',)),
         ('concatenates (skip connections)', ('concatenate',)),
         ('memcpy / memset', ('Memcpy', 'Memset', 'copy')))


def kind_of(name: str) -> str:
  for kind, keys in KINDS:
    if any(k in name for k in keys):
      return kind
  return 'other fusions (elementwise)'


def summarise(xplane: str, per: int, label: str) -> None:
  """Prints device-busy time per ``per`` (steps) and its split by kernel kind."""
  from jax._src.profiler import ProfileData   # pylint: disable=g-import-not-at-top
  data = ProfileData.from_file(xplane)
  planes = [p for p in data.planes if 'GPU' in p.name or 'TPU' in p.name] or [
      p for p in data.planes if 'CPU' in p.name or 'host' in p.name.lower()]
  time_ns, count = collections.Counter(), collections.Counter()
  for plane in planes:
    for line in plane.lines:
      if 'GPU' in plane.name and not line.name.startswith('Stream'):
        continue     # the 'XLA Ops' / 'XLA Modules' lines repeat the stream's kernels
      for event in line.events:
        kind = kind_of(event.name)
        time_ns[kind] += event.duration_ns
        count[kind] += 1
  total = sum(time_ns.values())
  print(f'{label}: device busy {total / 1e6 / per:.2f} ms per step '
        f'({sum(count.values()) // per} kernels)')
  print('| kernels | ms per step | share | count per step |\n|---|---|---|---|')
  for kind, ns in time_ns.most_common():
    print(f'| {kind} | {ns / 1e6 / per:.2f} | {ns / total:.1%} | {count[kind] // per} |')


def trace(tag: str, run, per: int) -> None:
  log_dir = f'/tmp/profile_step_{tag}'
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  with jax.profiler.trace(log_dir, profiler_options=options):
    run()
  xplane = sorted(glob.glob(log_dir + '/**/*.xplane.pb', recursive=True))[-1]
  print(f'trace: {xplane}')
  summarise(xplane, per, tag)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--config', default=None, help='configs/<name>.py (default: digits)')
  p.add_argument('--batch', type=int, default=None)
  p.add_argument('--dtype', default=None, choices=('float32', 'bfloat16'))
  p.add_argument('--xplane', default=None, help='only summarise this trace file')
  p.add_argument('--per', type=int, default=1, help='with --xplane: steps in the trace')
  args = p.parse_args()
  if args.xplane:
    return summarise(args.xplane, args.per, os.path.basename(args.xplane))

  config = load_config(args.config)
  if args.batch:
    config.training.batch_size = args.batch
  if args.dtype:
    config.model.dtype = args.dtype
  config.model.dropout = 0.0
  batch = config.training.batch_size
  model, schedule, optimizer, mesh, state = train.setup(config)
  step = train.make_train_fn(config, model, schedule, optimizer, mesh)
  x = np.random.default_rng(0).uniform(-1, 1, (1, batch) + train.image_shape(config))
  images = data_lib.shard_batch({'image': x.astype(np.float32)}, train.batch_sharding(mesh))
  t0 = time.perf_counter()
  step = step.lower(state, images).compile()
  print(f'{jax.devices()[0].device_kind}: train step compiled in {time.perf_counter() - t0:.1f} s')

  def train_steps(n):
    nonlocal state
    for _ in range(n):
      state, _ = step(state, images)
    jax.block_until_ready(state)
  train_steps(5)
  t0 = time.perf_counter()
  train_steps(20)
  print(f'train step: {(time.perf_counter() - t0) / 20 * 1e3:.2f} ms (batch {batch})')

  config.sampling.sampler, config.sampling.num_steps, config.sampling.eta = 'ddim', 10, 0.0
  sampler = sampling.make_sampler(config, schedule, model, batch_size=2 * batch)
  variables = {'params': jax.tree.map(jnp.copy, state.ema_params)}   # the step donates state
  rng = jax.random.PRNGKey(1)
  sampler = sampler.lower(variables, rng).compile()
  jax.block_until_ready(sampler(variables, rng))
  t0 = time.perf_counter()
  jax.block_until_ready(sampler(variables, rng))
  print(f'sampler step: {(time.perf_counter() - t0) / 10 * 1e3:.2f} ms (batch {2 * batch})')

  trace('train', lambda: train_steps(5), 5)
  trace('sampler', lambda: jax.block_until_ready(sampler(variables, rng)), 10)


if __name__ == '__main__':
  main()
