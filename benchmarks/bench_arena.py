r"""Why a CPU step's temporary buffer can be faulted in afresh on every call: glibc's arenas.

    python benchmarks/bench_arena.py [--sizes_mb 40,62,100] [--calls 20]

XLA:CPU allocates a step's temporaries as one buffer per device, with
``malloc`` on every call (the digits step on two devices: 62 MB each). The
command line's training program sets ``host.reuse_malloc_settings`` so that
freed buffers stay in the process and the next call reuses them. In glibc's
main arena, which grows with ``sbrk``, no fresh ``mmap`` and no trimming
suffice. A thread that glibc gives a thread arena (which of XLA's threads
does depends on the order of their first allocations) allocates from heaps
of at most 64 MiB: a buffer that does not fit the heap in use gets a new
heap, deleted again when it is empty, unless the top pad (``M_TOP_PAD``, a
whole heap in the library's settings) keeps it. A buffer larger than a heap
is mapped afresh on such a thread whatever the settings.

Each case runs in a fresh process (``--worker``): set the library's
``mallopt`` values, with or without the top pad, fill the thread's arena
with 20 MB of small blocks (as a running program has), then ``--calls``
times ``malloc`` a buffer, write every byte and ``free`` it, on the main
thread or on a second thread, counting minor page faults (``getrusage``) and
time per call. Linux with glibc only.
"""

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import threading
import time

import machine   # benchmarks/ is on sys.path when run as a script
from diffusion_jax import host


def worker(size_mb: float, thread: str, calls: int, top_pad: bool) -> dict:
  """Times ``calls`` malloc / memset / free of ``size_mb`` MB on the main or a second thread."""
  libc = ctypes.CDLL('libc.so.6')
  libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]
  libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
  values = host.reuse_malloc_settings(2)
  if not top_pad:
    del values[host.M_TOP_PAD]
  for param, value in values.items():
    if libc.mallopt(param, value) != 1:
      raise RuntimeError(f'mallopt({param}, {value}) failed')
  size, out = int(size_mb * 1e6), {}

  def run():
    kept = [libc.malloc(1000) for _ in range(20000)]   # 20 MB in the thread's arena
    faults0, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(calls):
      p = libc.malloc(size)
      libc.memset(p, 1, size)
      libc.free(p)
    out['ms_per_call'] = (time.perf_counter() - start) / calls * 1e3
    out['faults_per_call'] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / calls
    for p in kept:
      libc.free(p)

  if thread == 'main':
    run()
  else:
    t = threading.Thread(target=run)
    t.start()
    t.join()
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sizes_mb', default='40,62,100')
  parser.add_argument('--calls', type=int, default=20)
  parser.add_argument('--worker', nargs=3, metavar=('SIZE_MB', 'THREAD', 'TOP_PAD'))
  args = parser.parse_args()
  if args.worker:
    size, thread, pad = args.worker
    print(json.dumps(worker(float(size), thread, args.calls, pad == 'pad')))
    return
  print(machine.describe(machine.cpu_info()), flush=True)
  print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
  print('| buffer | thread (arena) | settings | minor faults per call | ms per call |\n'
        '|---|---|---|---|---|')
  cases = (('main', 'main', 'pad'), ('second', 'a thread arena', 'nopad'),
           ('second', 'a thread arena', 'pad'))
  for size in [float(s) for s in args.sizes_mb.split(',')]:
    for thread, arena, pad in cases:
      proc = subprocess.run([sys.executable, __file__, '--worker', str(size), thread, pad,
                             '--calls', str(args.calls)], capture_output=True, text=True,
                            check=True)
      r = json.loads(proc.stdout.strip().splitlines()[-1])
      settings = 'library' if pad == 'pad' else 'library without the top pad'
      print(f"| {size:g} MB | {thread} ({arena}) | {settings} | {r['faults_per_call']:,.0f} | "
            f"{r['ms_per_call']:.2f} |", flush=True)


if __name__ == '__main__':
  main()
