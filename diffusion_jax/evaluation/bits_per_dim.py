"""Test-set bits/dim: the variational bound of DDPM eq. 5 (Table 2).

:func:`bpd_eval` evaluates :func:`diffusion.calc_bpd_loop` (L_T + sum_t L_t +
L_0, every t) on the evaluation split in sharded batches; :func:`bpd_summary`
is the JSON breakdown of Table 2 and §4.3 ("Progressive coding"): the rate
L_T + sum L_t and the distortion L_0. Zero-based ``t``: column ``t`` of ``vb``
is the paper's L_t, column 0 the decoder term L_0.
"""

from __future__ import annotations

from typing import Callable, Optional

from jax.sharding import Mesh
import numpy as np

from diffusion_jax import data as data_lib
from diffusion_jax import diffusion
from diffusion_jax import runner
from diffusion_jax.evaluation import runtime as rt
from diffusion_jax.schedule import Schedule


def eval_images(config, num: Optional[int] = None, split: Optional[str] = None) -> np.ndarray:
  """The evaluation split as float32 in [-1, 1], on the 8-bit grid: ``uint8 / 127.5 - 1``.

  Uses :func:`data.load_uint8` so the discretized decoder's 256 bins (DDPM eq.
  13) contain the data exactly (for digits this rounds ``x / 16 * 255``).
  """
  split = split or config.data.eval_split
  num = None if num is None or num < 0 else int(num)
  return data_lib.load_uint8(config, split, num=num).astype(np.float32) / 127.5 - 1.0


def make_bpd_fn(config, schedule: Schedule, apply_fn: rt.ApplyFn, *, batch: int,
                devices=None) -> Callable:
  """Jitted ``(params, rng, x0 [B], y) -> calc_bpd_loop(...)`` (:func:`runner.jit_batched`).

  ``y``: the true labels ``[B]`` of a class-conditional model, so the bound is
  that of p(x_0 | y) (no guidance: a guided eps is not a likelihood model).
  """
  d = config.diffusion

  def fn(params, rng, x0, y):
    return diffusion.calc_bpd_loop(schedule, rt.model_fn_of(apply_fn, params, y), x0, rng,
                                   mean_type=d.mean_type, var_type=d.var_type,
                                   clip_denoised=bool(d.clip_denoised))

  return runner.jit_batched(fn, batch=batch, num_batched=1,
                            conditional=bool(config.model.num_classes), devices=devices)


def bpd_eval(config, schedule: Schedule, apply_fn: rt.ApplyFn, params, images: np.ndarray, rng, *,
             batch_size: Optional[int] = None, mesh: Optional[Mesh] = None,
             progress: bool = True, labels: Optional[np.ndarray] = None) -> dict:
  """The variational bound (DDPM eq. 5) of ``images`` with :func:`diffusion.calc_bpd_loop`.

  One jitted function for one batch shape: batches of ``batch_size`` (default
  ``eval.batch_size``), the last one padded by repeating its final image (the
  padding is dropped). Batch ``i`` uses ``fold_in(rng, i)``. A class-conditional
  model needs the images' true ``labels`` [N] (:func:`eval_labels`).

  Returns:
    NumPy dict: per example ``total_bpd``, ``prior_bpd`` (L_T), ``decoder_bpd``
    (L_0) ``[N]``; per zero-based t the example means ``vb`` (column t is the
    paper's L_t, column 0 is L_0), ``xstart_mse`` and ``mse`` ``[T]``.
  """
  images = np.asarray(images, np.float32)
  n = images.shape[0]
  if n == 0:
    raise ValueError('bpd_eval needs at least one image.')
  if (labels is None) != (not config.model.num_classes):
    raise ValueError('bpd_eval needs labels exactly for a class-conditional model '
                     f'(model.num_classes={config.model.num_classes}).')
  bs = rt.eval_batch_size(config, n, batch_size, mesh)
  sharding = rt.batch_sharding(mesh, bs)
  fn = make_bpd_fn(config, schedule, apply_fn, batch=bs, devices=rt.mesh_devices(mesh))
  T = schedule.num_timesteps
  sums = {k: np.zeros(T, np.float64) for k in ('vb', 'xstart_mse', 'mse')}
  per_ex = {k: [] for k in ('total_bpd', 'prior_bpd', 'decoder_bpd')}
  for outputs, k in rt.over_batches(fn, params, images, rng, bs, sharding, labels=labels,
                                    desc='bits/dim', progress=progress):
    out = {key: rt.to_host(v)[:k].astype(np.float64) for key, v in outputs.items()}
    for key in sums:
      sums[key] += out[key].sum(axis=0)
    per_ex['total_bpd'].append(out['total_bpd'])
    per_ex['prior_bpd'].append(out['prior_bpd'])
    per_ex['decoder_bpd'].append(out['vb'][:, 0])
  result = {k: np.concatenate(v) for k, v in per_ex.items()}
  result.update({k: v / n for k, v in sums.items()})
  return result


def eval_labels(config, num: Optional[int] = None, split: Optional[str] = None):
  """True int32 labels of :func:`eval_images` (None for an unconditional config)."""
  num = None if num is None or num < 0 else int(num)
  return data_lib.load_labels(config, split or config.data.eval_split, num)


def bpd_summary(result: dict) -> dict:
  """The JSON breakdown of :func:`bpd_eval` (DDPM eq. 5 and §4.3).

  ``total_bpd = L_T_prior_bpd + sum_L_t_bpd + L_0_decoder_bpd``, where
  ``sum_L_t_bpd`` is the sum over the paper's t = 1..T-1 of
  L_t = KL(q(x_t | x_{t+1}, x_0) || p(x_t | x_{t+1})) (zero-based columns 1..T-1).
  As in §4.3, ``rate_bpd = L_T + sum L_t`` and ``distortion_bpd = L_0``.
  """
  total = np.asarray(result['total_bpd'], np.float64)
  prior = float(np.mean(result['prior_bpd']))
  vb = np.asarray(result['vb'], np.float64)
  sum_lt = float(np.sum(vb[1:]))
  l0 = float(vb[0])
  n = int(total.size)
  return dict(
      num_examples=n,
      num_timesteps=int(vb.size),
      total_bpd=float(np.mean(total)),
      total_bpd_stderr=float(np.std(total, ddof=1) / np.sqrt(n)) if n > 1 else float('nan'),
      L_T_prior_bpd=prior,
      sum_L_t_bpd=sum_lt,
      L_0_decoder_bpd=l0,
      rate_bpd=prior + sum_lt,
      distortion_bpd=l0,
  )
