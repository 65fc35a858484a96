"""Times the samplers of diffusion_jax.sampling: compile once, then steps per second.

  python benchmarks/bench_sampling.py [--T 1000] [--batch 64] [--size 32] [--ddim_steps 50]

The model is a small two-layer convolution (a stand-in for the U-Net) so the
numbers measure the sampler's overhead on top of the network. Each sampler is
jitted once; the first call includes compilation, the second is steady state.
"""

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax import sampling
from diffusion_jax.schedule import make_schedule


class TinyEps(nn.Module):
  """A two-layer conv net with a timestep bias: enough work to be realistic per step."""
  ch: int = 32

  @nn.compact
  def __call__(self, x, t):
    h = nn.Conv(self.ch, (3, 3))(x) + nn.Embed(1000, self.ch)(t % 1000)[:, None, None, :]
    return nn.Conv(x.shape[-1], (3, 3))(nn.silu(h))


def _time(f, *args):
  t0 = time.perf_counter()
  jax.block_until_ready(f(*args))
  return time.perf_counter() - t0


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--T', type=int, default=1000)
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--size', type=int, default=32)
  p.add_argument('--ddim_steps', type=int, default=50)
  args = p.parse_args()
  s = make_schedule('linear', args.T)
  shape = (args.batch, args.size, args.size, 3)
  model = TinyEps()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros(shape), jnp.zeros((args.batch,), jnp.int32))
  runs = {
      'ancestral': (args.T, lambda m, r: sampling.p_sample_loop(s, m, r, shape)),
      f'ddim{args.ddim_steps}': (args.ddim_steps, lambda m, r: sampling.ddim_sample_loop(
          s, m, r, shape, num_steps=args.ddim_steps)),
      f'pc{args.ddim_steps}': (2 * args.ddim_steps, lambda m, r: sampling.pc_sample_loop(
          s, m, r, shape, num_steps=args.ddim_steps)),
  }
  print(f'device={jax.devices()[0].device_kind} T={args.T} shape={shape}')
  for name, (evals, run) in runs.items():
    f = jax.jit(lambda params, rng, run=run: run(lambda x, t: model.apply(params, x, t), rng))
    first = _time(f, params, jax.random.PRNGKey(1))
    second = _time(f, params, jax.random.PRNGKey(2))
    print(f'{name:12s} first call {first:7.2f}s  steady {second:7.3f}s  '
          f'{evals / second:8.1f} model evals/s  cache_size={f._cache_size()}')


if __name__ == '__main__':
  main()
