r"""A/B of XLA compile options for the train step: compile time, step time, same bits.

    python benchmarks/ab_compile_options.py '{"xla_backend_optimization_level": 3}'   # XLA's default

Side "library" is what the train step compiles with
(``host.cpu_compiler_options(mesh, kind='train_step')``), side "given" the
options on the command line. Compile time is measured in fresh
processes, alternating the sides (in one process the first compile pays a
warm-up and a repeated one is cached). Then, in one process, both sides are
compiled from one lowering: it prints whether their optimised HLO differs at
all, one step from the same state must give bitwise equal parameters, and
rounds of steps alternate between the sides (the order flips every round, so
this machine's drift hits both alike); medians printed. The step is jitted
without compile options, so each side is compiled with its own alone.
"""

import argparse
import json
import subprocess
import sys
import time
from unittest import mock

import jax
import numpy as np

from bench_train import load_config   # benchmarks/ is on sys.path when run as a script
from diffusion_jax import host


def lowered_step(config_path):
  config = load_config(config_path)
  host.configure_cpu_devices(config)
  from diffusion_jax import train   # pylint: disable=g-import-not-at-top
  model, schedule, optimizer, mesh, state = train.setup(config)
  # make_train_fn's jit carries the library's options, and options given at
  # compile time are merged into those: without any, each side gets its own.
  with mock.patch.object(host, 'cpu_compiler_options', lambda *a, **k: None):
    fn = train.make_train_fn(config, model, schedule, optimizer, mesh)
  shape = (1, config.training.batch_size) + train.image_shape(config)
  x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
  batch = {'image': jax.device_put(x, train.batch_sharding(mesh))}
  return fn.lower(state, batch), state, batch, mesh


def compile_seconds_in_a_fresh_process(config_path, options) -> float:
  cmd = [sys.executable, __file__, json.dumps(options), '--compile_only']
  if config_path:
    cmd += ['--config', config_path]
  out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
  return float(out.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('options', help='JSON dict of XLA compile options for side "given"')
  p.add_argument('--config', default=None, help='configs/<name>.py (default: digits)')
  p.add_argument('--compile_rounds', type=int, default=2)
  p.add_argument('--rounds', type=int, default=10)
  p.add_argument('--steps', type=int, default=5, help='steps per round')
  p.add_argument('--compile_only', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args()
  given = json.loads(args.options)
  if args.compile_only:   # child: print the compile time of one side
    lowered = lowered_step(args.config)[0]
    t = time.perf_counter()
    lowered.compile(compiler_options=given or None)
    return print(time.perf_counter() - t)

  lowered, state0, batch, mesh = lowered_step(args.config)
  sides = {'library': host.cpu_compiler_options(mesh, kind='train_step') or {}, 'given': given}
  seconds = {name: [] for name in sides}
  for r in range(args.compile_rounds):
    for name in (list(sides) if r % 2 else list(sides)[::-1]):
      seconds[name].append(compile_seconds_in_a_fresh_process(args.config, sides[name]))
  for name, options in sides.items():
    print(f'{name} {options}: compile ' + ', '.join(f'{s:.1f}' for s in seconds[name])
          + ' s (fresh processes)', flush=True)
  compiled = {name: lowered.compile(compiler_options=o or None) for name, o in sides.items()}
  texts = [c.as_text() for c in compiled.values()]
  print('optimised HLO text identical (the options changed nothing in the program):',
        texts[0] == texts[1], flush=True)
  fresh = lambda: jax.tree.map(lambda a: a.copy(), state0)   # the step donates its state
  a, b = (jax.tree.leaves(jax.device_get(c(fresh(), batch)[0].params)) for c in compiled.values())
  print('parameters after one step bitwise equal:',
        all(np.array_equal(u, v) for u, v in zip(a, b)))
  states = {name: fresh() for name in compiled}
  times = {name: [] for name in compiled}
  for r in range(args.rounds):
    for name in (list(compiled) if r % 2 == 0 else list(compiled)[::-1]):
      state = jax.block_until_ready(compiled[name](states[name], batch)[0])   # warm-up
      t = time.perf_counter()
      for _ in range(args.steps):
        state, _ = compiled[name](state, batch)
      jax.block_until_ready(state)
      times[name].append((time.perf_counter() - t) / args.steps * 1e3)
      states[name] = state
  print('median ms/step:', {name: round(float(np.median(v)), 1) for name, v in times.items()})


if __name__ == '__main__':
  main()
