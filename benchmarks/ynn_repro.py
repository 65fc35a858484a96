r"""XLA:CPU (jaxlib 0.10), YNNPACK fusions off: two devices running at once compute wrong results.

    python benchmarks/ynn_repro.py                     # exit status 1 if reproduced
    python benchmarks/ynn_repro.py --program unet      # the first program found: the U-Net
    python benchmarks/ynn_repro.py --options '{"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}'
    python benchmarks/ynn_repro.py --dump_hlo /tmp/blocks.hlo   # device 0's optimised HLO

The program (``--program blocks``, the smallest found): 20 steps
``x <- x - 0.1 * f(x)`` in a ``lax.fori_loop`` (the shape of a sampler's chain),
batch 100 of 8x8x32 per device, where f is three pairs of a residual block and
an attention block (:class:`Blocks`). Its only matrix operations are 2-D
float32 dots, ``f32[6400, K] x f32[K, 32]`` (K = 32 or 64: the 1x1 projections
and the 3x3 convolutions in matmul form) and ``f32[100, 128] x f32[128, 32]``;
everything else is elementwise and reduction fusions. It is compiled for each
of two CPU devices (``jax_num_cpu_devices=2``) with ``--options`` (default:
``{'xla_cpu_experimental_ynn_fusion_type': ''}``, YNNPACK fusions off), and
with XLA's default options for the reference.

- Runs 1 and 3 dispatch both devices' executables at once (JAX dispatches
  asynchronously): on each device, images 0-2 of 100 come out wrong (max
  difference 0.2-0.6 against the default's; the other 97 agree to 1e-5).
- Runs 2 and 4 run them one after the other, and every image agrees.
- So it is a race between two executions running at once, not an arithmetic
  difference. In a batch-sharded sampler it shows as images 0-2 and 100-102 of
  200 (``tests/test_host.py``).

**The operation: the 2-D float32 dot as XLA:CPU executes it itself.** With
``xla_cpu_experimental_ynn_fusion_type='LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'``
(YNNPACK takes the dots, every other fusion stays off), the same program is
right on every run (three runs of four); with ``''`` it is wrong on every run.
The dots are the only operations that change hands between the two settings.

Not reproduced (each agrees to float32 rounding on every run):
- the same function called once, or unrolled 3 times, without the loop;
- one CPU device;
- two of the three (residual, attention) pairs, or all three with 32 channels
  throughout (no padding to 64), or without the first residual block;
- each candidate operation alone in a 20-step ``fori_loop`` on two devices:
  3x3 convolution, strided convolution, dense matmul, GroupNorm, SiLU,
  nearest-neighbour upsampling, 2x2 average pooling, attention on 16 tokens;
- ``xla_cpu_multi_thread_eigen=false``, the concurrency-optimised scheduler
  off and ``xla_backend_optimization_level=0`` do not make it go away.

The train step's only loops are the RNG's integer loops, with no dot in them.
Its YNNPACK-off step equals the default's on one and on two devices
(``tests/test_train.py``). So the library turns YNNPACK fusions off for the
train step only (``host.CPU_KIND_OPTIONS``).
"""

import argparse
import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

jax.config.update('jax_num_cpu_devices', 2)

from diffusion_jax import config_lib  # pylint: disable=g-import-not-at-top
from diffusion_jax import models  # pylint: disable=g-import-not-at-top
from diffusion_jax.models import layers  # pylint: disable=g-import-not-at-top

YNN_OFF = {'xla_cpu_experimental_ynn_fusion_type': ''}


class Attention(nn.Module):
  """``AttnBlock`` with its two batched matmuls written as multiply + sum (no dot)."""

  @nn.compact
  def __call__(self, x):
    b, height, width, c = x.shape
    h = layers._group_norm(x, num_groups=32, name='norm')  # pylint: disable=protected-access
    q, k, v = (layers._dense(c, name=n, dtype=jnp.float32)(h).reshape(b, height * width, c)  # pylint: disable=protected-access
               for n in ('q', 'k', 'v'))
    w = jax.nn.softmax((q[:, :, None, :] * k[:, None, :, :]).sum(-1) * c ** -0.5, axis=-1)
    h = (w[:, :, :, None] * v[:, None, :, :]).sum(2).reshape(x.shape)
    return x + layers._dense(c, name='proj_out', dtype=jnp.float32)(h)  # pylint: disable=protected-access


class Blocks(nn.Module):
  """The smallest program found: three (residual block, attention block) pairs at 8x8.

  ResnetBlock(32) -> Attention -> [zero-pad to 64 channels -> ResnetBlock(64 -> 32)
  -> Attention] x 2, GroupNorm with 32 groups, a constant timestep embedding.
  The 3x3 convolutions take their matmul form (``conv_impl='matmul'``) and the
  attention has no batched matmul, so the program's only matrix operations are
  2-D float32 dots (``f32[6400, K] x f32[K, 32]`` and ``f32[100, 128] x
  f32[128, 32]``); the rest are elementwise and reduction fusions.
  """

  @nn.compact
  def __call__(self, x):
    temb = jnp.ones((x.shape[0], 128), x.dtype)
    block = lambda name: layers.ResnetBlock(out_ch=32, num_groups=32, conv_impl='matmul',  # noqa: E731
                                            name=name)
    x = Attention(name='attn_0')(block('res_0')(x, temb, False))
    for i in (1, 2):
      x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, 32)))
      x = Attention(name=f'attn_{i}')(block(f'res_{i}')(x, temb, False))
    return x


def program(name: str):
  """(apply(params, x), params, x [200, ...]) of ``name``: 'blocks' or 'unet'."""
  noise = lambda p: jax.tree.map(  # noqa: E731  (the output projections start at zero)
      lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(2), a.shape), p)
  if name == 'blocks':
    module = Blocks()
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (200, 8, 8, 32)))
    params = noise(module.init(jax.random.PRNGKey(1), x[:1])['params'])
    return (lambda p, x: module.apply({'params': p}, x)), params, x
  config = config_lib.digits_config()
  config.model.ch_mult = (1, 2)
  model = models.create_model(config)
  params = noise(model.init(jax.random.PRNGKey(1), np.zeros((1, 8, 8, 1), np.float32),
                            np.zeros((1,), np.int32))['params'])
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (200, 8, 8, 1)))
  t = np.full((100,), 500, np.int32)
  return (lambda p, x: model.apply({'params': p}, x, t, train=False)), params, x


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--program', default='blocks', choices=('blocks', 'unet'))
  parser.add_argument('--options', default=json.dumps(YNN_OFF),
                      help='the compile options under test, as JSON (default: YNNPACK fusions off)')
  parser.add_argument('--dump_hlo', default=None, metavar='PATH',
                      help="write device 0's optimised HLO (YNNPACK fusions off) to PATH")
  args = parser.parse_args()
  apply, params, x = program(args.program)
  options = json.loads(args.options)

  def chain(p, x):
    return jax.lax.fori_loop(0, 20, lambda i, x: x - 0.1 * apply(p, x), x)

  devices = jax.devices()[:2]
  args_ = [jax.device_put((params, x[100 * i:100 * (i + 1)]), d) for i, d in enumerate(devices)]
  lowered = [jax.jit(chain).lower(*a) for a in args_]
  off = [lo.compile(compiler_options=options) for lo in lowered]
  if args.dump_hlo:
    with open(args.dump_hlo, 'w') as f:
      f.write(off[0].as_text())
  ref = [np.asarray(lo.compile()(*a)) for lo, a in zip(lowered, args_)]
  wrong = False
  for run in range(1, 5):
    together = run % 2 == 1   # both devices at once (JAX dispatches asynchronously), or one by one
    if together:
      outs = [np.asarray(o) for o in [off[i](*args_[i]) for i in range(2)]]
    else:
      outs = [np.asarray(off[i](*args_[i])) for i in range(2)]
    for i in range(2):
      err = np.abs(outs[i] - ref[i]).reshape(100, -1).max(1)
      bad = np.nonzero(err > 1e-3)[0].tolist()
      wrong |= bool(bad)
      print(f'run {run} ({"both devices at once" if together else "one device at a time"}), '
            f'device {i}: max |options - default| {err.max():.3g}, '
            f'images off by > 1e-3: {bad}', flush=True)
  print(f'jax {jax.__version__}, --program {args.program}, options {options}: '
        + ('REPRODUCED' if wrong else 'not reproduced'))
  return 1 if wrong else 0


if __name__ == '__main__':
  sys.exit(main())
