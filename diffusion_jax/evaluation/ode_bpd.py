"""Eval part ``ode_bpd``: test-set bits/dim under the probability-flow ODE (Song et al. 2021, §4.3).

The exact likelihood of :func:`diffusion_jax.sde.ode_log_likelihood`, on
uniformly dequantised 8-bit test images, reported in bits/dim
(:func:`diffusion_jax.sde.bpd_from_log_p`). The DDPM bound of eq. 5
(:mod:`diffusion_jax.evaluation.bits_per_dim`) is an upper bound on the same
quantity for the discrete chain.
"""

from typing import Optional

import jax
import numpy as np

from diffusion_jax import runner
from diffusion_jax import sde
from diffusion_jax.evaluation import runtime as rt
from diffusion_jax.schedule import Schedule


def ode_bpd_eval(config, s: Schedule, apply_fn, params, images_uint8: np.ndarray, rng, *,
                 batch_size: Optional[int] = None, mesh=None,
                 labels: Optional[np.ndarray] = None, progress: bool = True) -> dict:
  """Bits/dim of 8-bit images under the probability-flow ODE, uniformly dequantised.

  Batch i (``batch_size``, default ``eval.batch_size``; the last one padded by
  repeating its final image, the padding dropped) uses ``fold_in(rng, i)``:
  one half dequantises (:func:`dequantize`), the other draws the Hutchinson
  probes of :func:`ode_log_likelihood` (``eval.ode_bpd_exact_trace`` for the
  exact trace), with ``sampling.ode_rtol`` / ``ode_atol``. One jitted function
  for one batch shape, batch-sharded over ``mesh`` (axis ``'data'``) when
  given. A class-conditional model needs the images' true ``labels``
  (the likelihood of p(x | y), unguided).

  Returns:
    NumPy dict: ``bpd`` [N] per image (:func:`bpd_from_log_p`), ``nfe`` [batches]
    model calls per batch.
  """
  images_uint8 = np.asarray(images_uint8)
  n = images_uint8.shape[0]
  if n == 0:
    raise ValueError('ode_bpd_eval needs at least one image.')
  sc, mean_type = config.sampling, config.diffusion.mean_type
  bs = rt.eval_batch_size(config, n, batch_size, mesh)
  sharding = rt.batch_sharding(mesh, bs)
  dims = int(np.prod(images_uint8.shape[1:]))

  def fn(params, key, x, y):
    deq_key, probe_key = jax.random.split(key)
    log_p, nfe = sde.ode_log_likelihood(
        s, rt.model_fn_of(apply_fn, params, y), sde.dequantize(deq_key, x), probe_key,
        rtol=float(sc.ode_rtol), atol=float(sc.ode_atol),
        mean_type=mean_type, exact_trace=bool(config.eval.ode_bpd_exact_trace))
    return sde.bpd_from_log_p(log_p, dims), nfe

  jitted = runner.jit_batched(fn, batch=bs, num_batched=1, conditional=labels is not None,
                              devices=rt.mesh_devices(mesh),
                              out=lambda data, rep: (data, rep))   # nfe: replicated
  bpd, nfe = [], []
  for (b, calls), k in rt.over_batches(jitted, params, images_uint8.astype(np.float32), rng, bs,
                                       sharding, labels=labels, desc='ODE bits/dim',
                                       progress=progress):
    bpd.append(rt.to_host(b).astype(np.float64)[:k])
    nfe.append(int(calls))
  return dict(bpd=np.concatenate(bpd), nfe=np.asarray(nfe, np.int64))
