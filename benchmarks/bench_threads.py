r"""Our CPU train step: ops on each device's own thread or on the pool; the state flat or not.

    python benchmarks/bench_threads.py [--modes device,pool,tree] [--steps 10] [--rounds 5] \
        [--repeats 3] [--sampler_steps 100]

XLA:CPU splits a convolution or a dot over a thread pool that all of a
process's CPU devices share (``--xla_cpu_multi_thread_eigen``). With one
device per core, the command line's program turns that off
(``training.cpu_op_threads='device'``, ``host.configure_cpu_op_threads``),
so that each device computes its own operations on one thread. Modes:

- ``device``: the program's settings (each device's operations on one thread,
  the training state flat: ``training.flat_state='auto'``);
- ``pool``: XLA's default threads (``training.cpu_op_threads='pool'``), the
  state flat;
- ``tree``: one thread per device, the state as trees
  (``training.flat_state='off'``).

Each mode runs in a fresh process (``--worker``) set up as the command line's
program sets itself up (devices, ``malloc``, threads, before JAX starts); the
modes alternate over ``--repeats`` passes, so the machine's drift falls on
both. A worker times ``--rounds`` rounds of ``--steps`` digits train steps
(after a warm-up) and, with ``--sampler_steps``, one DDIM call of that many
steps at batch 64. A JSON file goes to ``benchmarks/results/``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODES = {'device': ('device', 'auto'), 'pool': ('pool', 'auto'), 'tree': ('device', 'off')}


def worker(mode: str, steps: int, rounds: int, sampler_steps: int) -> dict:
  """Sets the CPU up as the training program does with ``mode``; times the step and a sampler."""
  from bench_train import load_config   # pylint: disable=g-import-not-at-top
  from diffusion_jax import host   # pylint: disable=g-import-not-at-top
  config = load_config(None)
  config.training.cpu_op_threads, config.training.flat_state = MODES[mode]
  host.configure_cpu_devices(config)
  host.configure_malloc(config)
  applied = host.configure_cpu_op_threads(config)
  from bench_peer import Ours   # pylint: disable=g-import-not-at-top  (starts JAX)
  import jax   # pylint: disable=g-import-not-at-top
  ours = Ours(config)
  ours.compile()
  ours.train_steps(5)
  ms = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    ours.train_steps(steps)
    ms.append((time.perf_counter() - t0) / steps * 1e3)
  sampler_s = None
  if sampler_steps:
    sample, _ = ours.sampler('ddim', sampler_steps, 64)
    sample()
    t0 = time.perf_counter()
    sample()
    sampler_s = time.perf_counter() - t0
  return dict(mode=mode, flag_set=applied, devices=jax.device_count(),
              xla_flags=os.environ.get('XLA_FLAGS', ''), ms=ms, sampler_s=sampler_s)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--modes', default=','.join(MODES))
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--sampler_steps', type=int, default=100, help='0: no sampler')
  parser.add_argument('--json', default=None,
                      help='default: benchmarks/results/threads_<simd>.json')
  parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(args.worker, args.steps, args.rounds, args.sampler_steps)))
    return
  import machine   # pylint: disable=g-import-not-at-top
  cpu = machine.cpu_info()
  print(machine.describe(cpu), flush=True)
  load_before = os.getloadavg()
  print('load average before: ' + ' '.join(f'{x:.2f}' for x in load_before), flush=True)
  runs = {m: [] for m in args.modes.split(',')}
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES')}
  for _ in range(args.repeats):
    for mode in runs:
      out = subprocess.run([sys.executable, __file__, '--worker', mode, '--steps', str(args.steps),
                            '--rounds', str(args.rounds), '--sampler_steps',
                            str(args.sampler_steps)], check=True, capture_output=True, text=True,
                           env=env).stdout.strip().splitlines()[-1]
      got = json.loads(out)
      runs[mode].append(got)
      sampler = f', DDIM-{args.sampler_steps} {got["sampler_s"]:.2f} s' if got['sampler_s'] else ''
      print(f'{mode} ({got["devices"]} devices, XLA_FLAGS={got["xla_flags"]!r}): '
            + ', '.join(f'{m:.1f}' for m in got['ms']) + f' ms/step{sampler}', flush=True)
  print('\n| mode | train step ms (median, range) | DDIM sampler s (median) |')
  print('|---|---|---|')
  summary = {}
  for mode, got in runs.items():
    ms = [m for g in got for m in g['ms']]
    samplers = [g['sampler_s'] for g in got if g['sampler_s']]
    summary[mode] = dict(median_ms=statistics.median(ms), min_ms=min(ms), max_ms=max(ms),
                         sampler_s=statistics.median(samplers) if samplers else None)
    sampler = f'{summary[mode]["sampler_s"]:.2f}' if samplers else '-'
    print(f'| {mode} | {summary[mode]["median_ms"]:.1f} ({min(ms):.1f}-{max(ms):.1f}) '
          f'| {sampler} |')
  load_after = os.getloadavg()
  print('load average after: ' + ' '.join(f'{x:.2f}' for x in load_after))
  path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                                   f'threads_{cpu.get("simd_level", "cpu")}.json')
  with open(path, 'w') as f:
    json.dump(dict(machine=cpu, load_before=load_before, load_after=load_after, runs=runs,
                   summary=summary, args=vars(args)), f, indent=1)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
