r"""XLA:CPU (jaxlib 0.10), YNNPACK fusions off: two devices running at once compute wrong images.

    python benchmarks/ynn_repro.py            # prints one line per run; exit status 1 if reproduced

The program: 20 steps ``x <- x - 0.1 * unet(x, t)`` in a ``lax.fori_loop`` (the
shape of a sampler's chain), for a small U-Net (the digits config with two
resolution levels, ``model.ch_mult=(1, 2)``), batch 100 of 8x8x1 images. It
is compiled for each of two CPU devices (``jax_num_cpu_devices=2``) with
``compiler_options={'xla_cpu_experimental_ynn_fusion_type': ''}``, and with
XLA's default options for the reference.

- Runs 1 and 3 dispatch both devices' executables at once (JAX dispatches
  asynchronously). On each device, images 0-2 of 100 come out wrong (max
  difference ~0.6 against the default's; the other 97 agree to 3e-6).
- Runs 2 and 4 run them one after the other, and every image agrees.
- So it is a race between two executions running at once. In a batch-sharded
  sampler it shows as images 0-2 and 100-102 of 200 (``tests/test_host.py``).

Not reproduced (each agrees to float32 rounding on every run):
- the same U-Net called once, or unrolled 3 times;
- one CPU device;
- each candidate operation alone in a 20-step ``fori_loop`` on two devices:
  3x3 convolution, strided convolution, dense matmul, GroupNorm, SiLU,
  nearest-neighbour upsampling, 2x2 average pooling, attention on 16 tokens.

With ``model.conv_impl='xla'`` it still reproduces. Without the attention
block (``attn_resolutions=()``) as well, it does not.

The train step's only loops are the RNG's integer loops, with no convolution
or dot in them. Its YNNPACK-off step equals the default's on one and on two
devices (``tests/test_train.py``). So the library turns YNNPACK fusions off
for the train step only (``host.CPU_KIND_OPTIONS``).
"""

import sys

import jax
import numpy as np

jax.config.update('jax_num_cpu_devices', 2)

from diffusion_jax import config_lib  # pylint: disable=g-import-not-at-top
from diffusion_jax import models  # pylint: disable=g-import-not-at-top

YNN_OFF = {'xla_cpu_experimental_ynn_fusion_type': ''}


def main():
  config = config_lib.digits_config()
  config.model.ch_mult = (1, 2)
  model = models.create_model(config)
  params = model.init(jax.random.PRNGKey(1), np.zeros((1, 8, 8, 1), np.float32),
                      np.zeros((1,), np.int32))['params']
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape),
                        params)
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (200, 8, 8, 1)))
  t = np.full((200,), 500, np.int32)

  def chain(p, x, t):
    step = lambda i, x: x - 0.1 * model.apply({'params': p}, x, t, train=False)
    return jax.lax.fori_loop(0, 20, step, x)

  devices = jax.devices()[:2]
  args = [jax.device_put((params, x[100 * i:100 * (i + 1)], t[100 * i:100 * (i + 1)]), d)
          for i, d in enumerate(devices)]
  lowered = [jax.jit(chain).lower(*a) for a in args]
  off = [lo.compile(compiler_options=YNN_OFF) for lo in lowered]
  ref = [np.asarray(lo.compile()(*a)) for lo, a in zip(lowered, args)]
  wrong = False
  for run in range(1, 5):
    together = run % 2 == 1   # both devices at once (JAX dispatches asynchronously), or one by one
    if together:
      outs = [np.asarray(o) for o in [off[i](*args[i]) for i in range(2)]]
    else:
      outs = [np.asarray(off[i](*args[i])) for i in range(2)]
    for i in range(2):
      err = np.abs(outs[i] - ref[i]).reshape(100, -1).max(1)
      bad = np.nonzero(err > 1e-3)[0].tolist()
      wrong |= bool(bad)
      print(f'run {run} ({"both devices at once" if together else "one device at a time"}), '
            f'device {i}: max |YNNPACK off - default| {err.max():.3g}, '
            f'images off by > 1e-3: {bad}', flush=True)
  print(f'jax {jax.__version__}: ' + ('REPRODUCED' if wrong else 'not reproduced'))
  return 1 if wrong else 0


if __name__ == '__main__':
  sys.exit(main())
