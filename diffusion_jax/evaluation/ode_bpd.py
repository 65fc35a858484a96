"""Eval part ``ode_bpd``: test-set bits/dim under the probability-flow ODE (Song et al. 2021, §4.3).

The exact likelihood of :func:`diffusion_jax.sde.ode_log_likelihood`, on
uniformly dequantised 8-bit test images, reported in bits/dim
(:func:`diffusion_jax.sde.bpd_from_log_p`). The DDPM bound of eq. 5
(:mod:`diffusion_jax.evaluation.bits_per_dim`) is an upper bound on the same
quantity for the discrete chain.
"""

from typing import Optional

import jax
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
from tqdm import tqdm

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
  bs = min(int(batch_size or config.eval.batch_size), n)
  if mesh is not None:
    bs = rt.round_up(bs, mesh.size)
  sharding = rt.batch_sharding(mesh, bs)
  dims = int(np.prod(images_uint8.shape[1:]))

  def fn(params, x, key, y=None):
    model_fn = ((lambda xx, t: apply_fn(params, xx, t)) if y is None
                else (lambda xx, t: apply_fn(params, xx, t, y)))
    deq_key, probe_key = jax.random.split(key)
    log_p, nfe = sde.ode_log_likelihood(
        s, model_fn, sde.dequantize(deq_key, x), probe_key, rtol=float(sc.get('ode_rtol', 1e-5)),
        atol=float(sc.get('ode_atol', 1e-5)), mean_type=mean_type,
        exact_trace=bool(config.eval.get('ode_bpd_exact_trace', False)))
    return sde.bpd_from_log_p(log_p, dims), nfe

  if sharding is None:
    jitted = jax.jit(fn)
  else:
    rep = NamedSharding(sharding.mesh, PartitionSpec())
    extra = (sharding,) if labels is not None else ()
    jitted = jax.jit(fn, in_shardings=(rep, sharding, rep) + extra,
                     out_shardings=(sharding, rep))
  pad = lambda a: np.concatenate([a, np.repeat(a[-1:], bs - a.shape[0], axis=0)], axis=0)
  bpd, nfe = [], []
  for i in tqdm(range(-(-n // bs)), desc='ODE bits/dim', unit='batch',
                disable=not (progress and rt.is_main()), dynamic_ncols=True):
    chunk = images_uint8[i * bs:(i + 1) * bs]
    args = (params, rt.put(pad(chunk.astype(np.float32)), sharding), jax.random.fold_in(rng, i))
    if labels is not None:
      args += (rt.put(pad(np.asarray(labels[i * bs:(i + 1) * bs], np.int32)), sharding),)
    b, k = jitted(*args)
    bpd.append(rt.to_host(b).astype(np.float64)[:chunk.shape[0]])
    nfe.append(int(k))
  return dict(bpd=np.concatenate(bpd), nfe=np.asarray(nfe, np.int64))
