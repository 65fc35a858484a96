r"""Where a train step's (and a sampler step's) device time goes, by kernel kind.

    python benchmarks/profile_step.py --config configs/cifar10.py --dtype bfloat16   # on a GPU
    python benchmarks/profile_step.py --xplane /tmp/trace_train/.../host.xplane.pb --per 5

Compiles the config's train step (``bench_peer.Ours``: dropout 0, a random
batch placed as ``train.next_batches`` places it) and a DDIM-10 sampler for
twice the batch, times both, and takes a ``jax.profiler`` trace of each (5 train steps; one
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

from bench_peer import Ours            # benchmarks/ is on sys.path when run as a script
from bench_train import load_config

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
  ours = Ours(config)    # bench_peer's: the step, a random batch placed as training places it
  print(f'{jax.devices()[0].device_kind}: train step compiled in {ours.compile():.1f} s')
  ours.train_steps(5)
  t0 = time.perf_counter()
  ours.train_steps(20)
  print(f'train step: {(time.perf_counter() - t0) / 20 * 1e3:.2f} ms (batch {batch})')
  trace('train', lambda: ours.train_steps(5), 5)

  # After the train steps: the sampler holds the EMA parameters, which a step donates.
  sampler, _ = ours.sampler('ddim', 10, 2 * batch)
  sampler()
  t0 = time.perf_counter()
  sampler()
  print(f'sampler step: {(time.perf_counter() - t0) / 10 * 1e3:.2f} ms (batch {2 * batch})')
  trace('sampler', sampler, 10)

if __name__ == '__main__':
  main()
