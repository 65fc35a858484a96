r"""Our CPU train step under glibc ``malloc`` settings set at run time (``mallopt``).

    python benchmarks/bench_malloc.py \
        [--modes default,no_mmap,arenas4,arenas2,arenas1,library,library_arenas2] \
        [--steps 20] [--rounds 3] [--repeats 2]

The digits train step's temporary buffers (116 MB) are larger than glibc's
largest ``mmap`` threshold (32 MiB), so by default every call maps them fresh
and the kernel faults their pages in again (about 30,000 minor faults per
step). Each mode sets ``mallopt`` through ``ctypes`` before JAX starts, then
times ``--rounds`` rounds of ``--steps`` steps (after a warm-up) and counts the
minor page faults per step (``getrusage``):

- ``default``: glibc as it is;
- ``no_mmap``: ``M_MMAP_MAX=0`` (no allocation is a fresh ``mmap``) and
  ``M_TRIM_THRESHOLD=1 GiB`` (freed memory stays with the process);
- ``arenas4`` / ``arenas2`` / ``arenas1``: ``no_mmap`` with ``M_ARENA_MAX`` 4 / 2 / 1, so that
  the threads share a few arenas instead of growing and dropping their own
  heaps.
- ``library``: what the command line's training program sets
  (``training.cpu_malloc='reuse'``, ``host.configure_malloc``: ``no_mmap``, a
  top pad of a thread heap, and glibc's own arena limit of 8 per core), set
  as it sets it, before JAX starts;
- ``library_arenasN`` (``library_arenas2``, ``library_arenas4``, ...): the same
  with ``M_ARENA_MAX=N``; with 2, all of XLA's threads share two arenas.

Every mode sets the CPU devices and their operation threads as the training
program does (``host.configure_cpu_devices``,
``host.configure_cpu_op_threads``).

Modes alternate over ``--repeats`` passes, one process each (``--worker``), so
drift on the machine falls on every mode alike. Linux with glibc only.
"""

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# glibc mallopt parameters (malloc.h), as the library names them.
from diffusion_jax.host import M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD
MODES = {
    'default': {},
    'no_mmap': {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 1 << 30},
    'arenas4': {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 1 << 30, M_ARENA_MAX: 4},
    'arenas2': {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 1 << 30, M_ARENA_MAX: 2},
    'arenas1': {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 1 << 30, M_ARENA_MAX: 1},
    'library': {},   # host.configure_malloc (training.cpu_malloc='reuse'), set before JAX starts
    'library_arenas2': {M_ARENA_MAX: 2},   # then M_ARENA_MAX=2 on top
}


def mode_settings(mode: str) -> dict:
  """The mallopt values a mode sets by itself (``library_arenasN``: ``M_ARENA_MAX=N``)."""
  if mode in MODES:
    return MODES[mode]
  if mode.startswith('library_arenas') and mode[len('library_arenas'):].isdigit():
    return {M_ARENA_MAX: int(mode[len('library_arenas'):])}
  raise ValueError(f'--modes: unknown mode {mode!r}; allowed: {", ".join(MODES)}, library_arenasN')


def worker(mode: str, steps: int, rounds: int) -> dict:
  """Sets ``mode``'s mallopt values, then times the digits train step; returns the figures."""
  from bench_train import load_config   # pylint: disable=g-import-not-at-top
  from diffusion_jax import host   # pylint: disable=g-import-not-at-top
  config = load_config(None)
  host.configure_cpu_devices(config)
  if mode.startswith('library'):   # as `python -m diffusion_jax.main` does, before JAX starts
    config.training.cpu_malloc = 'reuse'
    if not host.configure_malloc(config):
      raise RuntimeError('host.configure_malloc set nothing')
  libc = ctypes.CDLL('libc.so.6')
  for param, value in mode_settings(mode).items():
    if libc.mallopt(param, value) != 1:
      raise RuntimeError(f'mallopt({param}, {value}) failed')
  host.configure_cpu_op_threads(config)
  from bench_peer import Ours   # pylint: disable=g-import-not-at-top  (imports JAX)
  ours = Ours(config)
  ours.compile()
  ours.train_steps(5)
  ms, faults = [], []
  for _ in range(rounds):
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    ours.train_steps(steps)
    ms.append((time.perf_counter() - t0) / steps * 1e3)
    faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / steps)
  return dict(mode=mode, ms=ms, faults=faults)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--modes', default=','.join(MODES))
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(args.worker, args.steps, args.rounds)))
    return
  import machine   # pylint: disable=g-import-not-at-top
  print(machine.describe(machine.cpu_info()), flush=True)
  print('load average before: ' + ' '.join(f'{x:.2f}' for x in os.getloadavg()), flush=True)
  results = {m: {'ms': [], 'faults': []} for m in args.modes.split(',')}
  for mode in results:
    mode_settings(mode)   # an unknown mode fails here, before any worker starts
  for _ in range(args.repeats):
    for mode in results:
      out = subprocess.run([sys.executable, __file__, '--worker', mode, '--steps', str(args.steps),
                            '--rounds', str(args.rounds)], check=True, capture_output=True,
                           text=True).stdout.strip().splitlines()[-1]
      got = json.loads(out)
      results[mode]['ms'] += got['ms']
      results[mode]['faults'] += got['faults']
      print(f'{mode}: ' + ', '.join(f'{m:.1f}' for m in got['ms']) + ' ms/step, '
            f'{statistics.median(got["faults"]):,.0f} faults/step', flush=True)
  print('\n| malloc | ms per step (median, range) | minor faults per step (median) |')
  print('|---|---|---|')
  for mode, r in results.items():
    print(f'| {mode} | {statistics.median(r["ms"]):.1f} ({min(r["ms"]):.1f}-{max(r["ms"]):.1f}) '
          f'| {statistics.median(r["faults"]):,.0f} |')
  print('load average after: ' + ' '.join(f'{x:.2f}' for x in os.getloadavg()))


if __name__ == '__main__':
  main()
