r"""One 3x3 convolution, forward and forward+backward: XLA:CPU's kernels against PyTorch's.

    python benchmarks/bench_conv.py                              # 64 x 16 x 16 x 128 -> 128
    python benchmarks/bench_conv.py --shape 128,8,8,64 --cout 64  # a digits-sized layer

Separates the convolution kernels from the rest of a train step. Ours: one
``lax.conv_general_dilated`` (NHWC, HWIO, 'SAME') compiled under three sets of
compile options: the train step's (``host.cpu_compiler_options(...,
kind='train_step')``), the samplers' (``kind='sampler'``: YNNPACK fusions on)
and XLA's defaults. Forward is the convolution and a sum of squares;
forward+backward is its gradient with respect to the input and the weights.
The peer: ``torch.nn.functional.conv2d`` with the same data, in NCHW and in
channels-last memory format, with torch's default threads. Rounds alternate
over all sides (medians; GFLOP/s counts the convolutions' multiply-adds as 2
FLOPs: 1x forward, 3x forward+backward). Without torch only our sides run.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import host
import machine   # benchmarks/ is on sys.path when run as a script


def ours_sides(x, w):
  """{name: (fwd, fwd+bwd)} compiled executables, one pair per set of options."""
  def fwd(x, w):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.sum(y * y)
  both = jax.grad(fwd, argnums=(0, 1))
  devices = jax.devices()[:1]
  options = {'ours (train step options)': host.cpu_compiler_options(devices, kind='train_step'),
             'ours (sampler options)': host.cpu_compiler_options(devices, kind='sampler'),
             'ours (XLA defaults)': {}}
  return {name: tuple(jax.jit(f).lower(x, w).compile(compiler_options=opts or {})
                      for f in (fwd, both))
          for name, opts in options.items()}


def peer_sides(torch, x, w):
  """{name: (fwd, fwd+bwd)} torch closures, or {} when ``torch`` is None (not installed)."""
  if torch is None:
    return {}
  sides = {}
  for fmt_name, fmt in (('NCHW', torch.contiguous_format), ('channels-last', torch.channels_last)):
    tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(memory_format=fmt)
    tw = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))).to(memory_format=fmt)
    tx.requires_grad_()
    tw.requires_grad_()

    def fwd(tx=tx, tw=tw):
      with torch.no_grad():
        y = torch.nn.functional.conv2d(tx, tw, padding=1)
        return (y * y).sum()

    def both(tx=tx, tw=tw):
      tx.grad = tw.grad = None
      y = torch.nn.functional.conv2d(tx, tw, padding=1)
      (y * y).sum().backward()
      return tw.grad

    sides[f'torch {torch.__version__} ({fmt_name})'] = (fwd, both)
  return sides


def time_call(fn, args, repeats):
  """Seconds per call, over ``repeats`` calls after the caller's warm-up."""
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / repeats


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--shape', default='64,16,16,128', help='input N,H,W,C')
  p.add_argument('--cout', type=int, default=128, help='output channels')
  p.add_argument('--rounds', type=int, default=7)
  p.add_argument('--repeats', type=int, default=10, help='calls per round and side')
  p.add_argument('--json', default=None)
  a = p.parse_args()
  n, h, wd, c = (int(v) for v in a.shape.split(','))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n, h, wd, c), dtype=np.float32)
  w = (rng.standard_normal((3, 3, c, a.cout), dtype=np.float32) / np.sqrt(9 * c)).astype(np.float32)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    torch = None
  info = machine.cpu_info() | machine.jax_info(jax)
  if torch is not None:
    info |= machine.torch_info(torch)
  print(machine.describe(info))
  jx, jw = jnp.asarray(x), jnp.asarray(w)
  sides = {k: (v, (jx, jw)) for k, v in ours_sides(jx, jw).items()}
  sides |= {k: (v, ()) for k, v in peer_sides(torch, x, w).items()}
  flops = 2.0 * n * h * wd * c * a.cout * 9
  times = {(k, part): [] for k in sides for part in (0, 1)}
  for (fns, args) in sides.values():   # warm-up
    for fn in fns:
      for _ in range(2):
        jax.block_until_ready(fn(*args))
  for r in range(a.rounds):
    order = list(sides) if r % 2 == 0 else list(reversed(sides))
    for k in order:
      fns, args = sides[k]
      for part in (0, 1):
        times[(k, part)].append(time_call(fns[part], args, a.repeats))
  rows = []
  print(f'\none 3x3 convolution, input {a.shape} (NHWC), {a.cout} output channels, float32; '
        f'medians of {a.rounds} alternating rounds of {a.repeats} calls\n')
  print('| side | forward ms | GFLOP/s | forward+backward ms | GFLOP/s |')
  print('|---|---|---|---|---|')
  for k in sides:
    f_ms, b_ms = (1e3 * statistics.median(times[(k, part)]) for part in (0, 1))
    rows.append(dict(side=k, forward_ms=f_ms, forward_backward_ms=b_ms))
    print(f'| {k} | {f_ms:.2f} | {flops / f_ms / 1e6:.0f} | {b_ms:.2f} | '
          f'{3 * flops / b_ms / 1e6:.0f} |')
  if a.json:
    with open(a.json, 'w') as f:
      json.dump(dict(machine=info, shape=a.shape, cout=a.cout, rounds=a.rounds,
                     repeats=a.repeats, rows=rows), f, indent=2)
    print(f'wrote {a.json}')


if __name__ == '__main__':
  main()
