"""The paper's qualitative figures: reverse chains started from an intermediate x_t.

* Fig. 6, progressive generation: the predicted x_0 along one reverse chain
  (:func:`progressive_generation`);
* Fig. 7, samples sharing x_t: reverse chains from one q_sample(x_0, t) with
  independent noise (:func:`shared_latent_samples`);
* Figs. 8-9, interpolation in latent space, coarse to fine: two images encoded
  to x_t with the same noise, mixed, and decoded, for several mixing steps t
  (:func:`interpolate`).

All chains are :func:`p_sample_loop_from`: ancestral sampling (Algorithm 2)
from a given x_t, one ``lax.scan`` whatever the starting steps. A
class-conditional model's chains use :func:`figure_labels`, guided with
``sampling.guidance_scale`` (:mod:`diffusion_jax.guidance`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion
from diffusion_jax import settings
from diffusion_jax import images as image_lib
from diffusion_jax import sampling
from diffusion_jax.evaluation import runtime as rt
from diffusion_jax.schedule import Schedule

# Figs. 7 and 9 of DDPM use these steps of T = 1000 (rescaled to other T).
SHARED_LATENT_STEPS = (1000, 750, 500, 250)
INTERPOLATION_STEPS = (125, 250, 375, 500, 625, 750, 875, 1000)


def _is_key_batch(rng) -> bool:
  rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng.ndim == 1
  return rng.ndim == 2


def p_sample_loop_from(s: Schedule, model_fn, rng, x_t, t_start, *, mean_type: str = 'eps',
                       var_type: str = 'fixed_large', clip_denoised: bool = True):
  """Ancestral sampling (DDPM Algorithm 2) from a given x_t down to x_0, as one ``lax.scan``.

  The scan runs over all zero-based steps T-1..0; example b is updated only at
  steps ``t <= t_start[b]`` (``t_start`` is a scalar or ``[B]`` int; -1 leaves
  an example unchanged), and a step where no example is active skips the model
  (``lax.cond``). So one compiled function serves every starting step:
  samples sharing x_t (Fig. 7) and decoding interpolated latents (Fig. 8).

  ``rng`` is one key, split as :func:`sampling.p_sample_loop` does: starting
  from ``t_start = T - 1`` this reproduces ``p_sample_loop(rng, x_T=x_t)``
  exactly. It may also be a batch of keys ``[B]``, one per example (e.g. the
  same key for several examples to share the reverse-process noise).
  """
  x_t = jnp.asarray(x_t)
  b = x_t.shape[0]
  t_start = jnp.broadcast_to(jnp.asarray(t_start, jnp.int32), (b,))
  per_example = _is_key_batch(rng)
  if per_example:
    chain_keys = jax.vmap(lambda k: jax.random.split(k)[1])(rng)
  else:
    chain_key = jax.random.split(rng)[1]
  bshape = (b,) + (1,) * (x_t.ndim - 1)

  def noise_at(t_scalar):
    if per_example:
      return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t_scalar), x_t.shape[1:],
                                                  x_t.dtype))(chain_keys)
    return jax.random.normal(jax.random.fold_in(chain_key, t_scalar), x_t.shape, x_t.dtype)

  def step(x, t_scalar, active):
    t = jnp.full((b,), t_scalar, jnp.int32)
    out = diffusion.p_mean_variance(s, model_fn(x, t), x, t, mean_type=mean_type,
                                    var_type=var_type, clip_denoised=clip_denoised)
    nonzero = (t_scalar > 0).astype(x.dtype)
    x_prev = out['mean'] + nonzero * jnp.exp(0.5 * out['log_variance']) * noise_at(t_scalar)
    return jnp.where(active.reshape(bshape), x_prev.astype(x.dtype), x)

  def body(x, t_scalar):
    active = t_scalar <= t_start
    x = jax.lax.cond(jnp.any(active), lambda x: step(x, t_scalar, active), lambda x: x, x)
    return x, None

  x, _ = jax.lax.scan(body, x_t, jnp.arange(s.num_timesteps - 1, -1, -1, dtype=jnp.int32))
  return x


def paper_step_to_t(step: int, num_timesteps: int, paper_T: int = 1000) -> int:
  """A paper step of T=1000 (e.g. 750) -> zero-based t for this T (750 -> 749 at T=1000)."""
  return int(np.clip(round(step / paper_T * num_timesteps) - 1, 0, num_timesteps - 1))


def figure_labels(config, rng, num: int):
  """Labels of a figure's ``num`` chains for a class-conditional model (None if unconditional).

  ``sampling.class_label`` (-1: uniform), from :meth:`guidance.Conditioning.labels`;
  the chains are guided with ``sampling.guidance_scale``.
  """
  return settings.conditioning(config).labels(rng, num)


def _chain_fn(config, schedule, apply_fn):
  """Jitted ``(params, rng, x_t, t_start, y=None) -> x_0`` (guided for a conditional model)."""
  d, cond = config.diffusion, settings.conditioning(config)
  return jax.jit(lambda params, rng, x_t, t_start, y=None: p_sample_loop_from(
      schedule, cond.model_fn(apply_fn, params, y), rng, x_t, t_start,
      mean_type=d.mean_type, var_type=d.var_type, clip_denoised=bool(d.clip_denoised)))


def progressive_generation(config, schedule, apply_fn, params, rng, *, num_samples: int = 8,
                           num_snapshots: int = 10) -> dict:
  """Predicted x_0 along the reverse chain (DDPM Fig. 6): ``pred_x0 [N, K, H, W, C]``, ``t [K]``.

  A class-conditional model samples :func:`figure_labels`, guided.
  """
  d, cond = config.diffusion, settings.conditioning(config)
  k = min(num_snapshots, schedule.num_timesteps)
  shape = (num_samples,) + settings.image_shape(config)
  fn = jax.jit(lambda params, rng, y: sampling.p_sample_loop_progressive(
      schedule, cond.model_fn(apply_fn, params, y), rng, shape,
      mean_type=d.mean_type, var_type=d.var_type, clip_denoised=bool(d.clip_denoised),
      num_snapshots=k))
  x0, snaps = fn(params, rng, figure_labels(config, rng, num_samples))
  return dict(x0=rt.to_host(x0), pred_x0=np.swapaxes(rt.to_host(snaps['pred_x0']), 0, 1),
              x_t=np.swapaxes(rt.to_host(snaps['x_t']), 0, 1), t=rt.to_host(snaps['t']))


def shared_latent_samples(config, schedule, apply_fn, params, x0, rng, *,
                          paper_steps=SHARED_LATENT_STEPS, num_samples: int = 6,
                          chain=None) -> dict:
  """Samples sharing the latent x_t (DDPM Fig. 7).

  x_t = q_sample(x_0, t, eps) with one fixed eps for each t of ``paper_steps``
  (rescaled to T), then ``num_samples`` reverse chains from that x_t with
  independent noise: ``samples [len(ts), num_samples, H, W, C]``, ``x_t [len(ts), H, W, C]``.
  """
  T = schedule.num_timesteps
  ts = np.array([paper_step_to_t(p, T) for p in paper_steps], np.int32)
  x0 = np.asarray(x0, np.float32)
  noise = jax.random.normal(jax.random.fold_in(rng, 0), x0.shape, jnp.float32)
  x_t = diffusion.q_sample(schedule, jnp.broadcast_to(x0, (len(ts),) + x0.shape),
                           jnp.asarray(ts), jnp.broadcast_to(noise, (len(ts),) + x0.shape))
  batch = jnp.repeat(x_t, num_samples, axis=0)
  t_start = np.repeat(ts, num_samples)
  chain = chain or _chain_fn(config, schedule, apply_fn)
  out = rt.to_host(chain(params, jax.random.fold_in(rng, 1), batch, t_start,
                         figure_labels(config, rng, batch.shape[0])))
  return dict(t=ts, x_t=rt.to_host(x_t), samples=out.reshape((len(ts), num_samples) + x0.shape))


def interpolate(config, schedule, apply_fn, params, x0a, x0b, rng, *,
                paper_steps=INTERPOLATION_STEPS, num_lambdas: int = 9, chain=None) -> dict:
  """Interpolation through the latent x_t, coarse to fine (DDPM §4.3, Figs. 8-9).

  Pairs (``x0a[i]``, ``x0b[i]``) are encoded with the same noise,
  x_t = q_sample(x_0, t, eps), x'_t = q_sample(x'_0, t, eps), for every
  mixing step t of ``paper_steps`` (rescaled to T); the latents
  (1 - lambda) x_t + lambda x'_t are decoded with the reverse process, its
  noise fixed across lambda and t within a pair. lambda = 0 and 1 are the
  reconstructions of the two sources: close to them for small t, more and
  more unrelated (but shared by the interpolants) as t grows, as in Fig. 9.

  Returns:
    ``decoded [P, len(ts), num_lambdas, H, W, C]``, ``lambdas`` and ``t``
    (the zero-based mixing steps, one per row).
  """
  T = schedule.num_timesteps
  ts = np.array([paper_step_to_t(p, T) for p in paper_steps], np.int32)
  x0a, x0b = np.asarray(x0a, np.float32), np.asarray(x0b, np.float32)
  pairs, rows, image_shape = x0a.shape[0], len(ts), x0a.shape[1:]
  noise = jax.random.normal(jax.random.fold_in(rng, 0), x0a.shape, jnp.float32)
  tt = jnp.asarray(np.tile(ts, pairs))                                # [P * S]
  encode = lambda x0: diffusion.q_sample(                             # noqa: E731
      schedule, jnp.repeat(jnp.asarray(x0), rows, axis=0), tt, jnp.repeat(noise, rows, axis=0))
  xa, xb = encode(x0a), encode(x0b)                                   # [P * S, H, W, C]
  lam = np.linspace(0.0, 1.0, num_lambdas, dtype=np.float32)
  lam_b = lam.reshape((1, -1) + (1,) * len(image_shape))
  latents = (1.0 - lam_b) * xa[:, None] + lam_b * xb[:, None]        # [P * S, L, H, W, C]
  batch = latents.reshape((-1,) + image_shape)
  keys = jax.random.split(jax.random.fold_in(rng, 1), pairs)
  keys = jnp.repeat(keys, rows * num_lambdas, axis=0)    # one reverse-noise stream per pair
  chain = chain or _chain_fn(config, schedule, apply_fn)
  out = rt.to_host(chain(params, keys, batch, jnp.repeat(tt, num_lambdas),
                         figure_labels(config, rng, batch.shape[0])))
  return dict(t=ts, lambdas=lam, decoded=out.reshape((pairs, rows, num_lambdas) + image_shape))


def write_figures(config, schedule, apply_fn, params, test_images: np.ndarray, rng,
                  eval_dir: str) -> dict:
  """Figs. 6-9 of DDPM as PNG grids in ``eval_dir``; returns their paths.

  - ``progressive_generation.png``: rows are samples, columns the predicted x_0
    at evenly spaced steps from T-1 (left) to 0 (right);
  - ``shared_latent.png``: one row per t in (1000, 750, 500, 250)·T/1000:
    x_0, x_t, then samples from p(x_0 | x_t);
  - ``interpolation.png``: for each of two pairs, one row per mixing step t
    in (125, 250, ..., 1000)·T/1000: x_0, the decoded latents for
    lambda = 0 (the reconstruction of x_0) .. 1 (that of x'_0), x'_0.
  """
  paths = {}
  h_w_c = test_images.shape[1:]
  prog = progressive_generation(config, schedule, apply_fn, params, jax.random.fold_in(rng, 6))
  n, k = prog['pred_x0'].shape[:2]
  chain = _chain_fn(config, schedule, apply_fn)
  shared = shared_latent_samples(config, schedule, apply_fn, params, test_images[0],
                                 jax.random.fold_in(rng, 7), chain=chain)
  rows = [np.concatenate([test_images[:1], np.clip(shared['x_t'][i:i + 1], -1, 1),
                          shared['samples'][i]]) for i in range(len(shared['t']))]
  pairs = max(1, min(2, test_images.shape[0] // 2))
  a, b = test_images[0:2 * pairs:2], test_images[1:2 * pairs:2]
  if b.shape[0] < pairs:   # a single test image: interpolate it with itself
    b = a
  interp = interpolate(config, schedule, apply_fn, params, a, b, jax.random.fold_in(rng, 8),
                       chain=chain)
  interp_rows = [np.concatenate([a[i:i + 1], row, b[i:i + 1]])
                 for i in range(pairs) for row in interp['decoded'][i]]
  for name in ('progressive_generation', 'shared_latent', 'interpolation'):
    paths[name] = rt.join(eval_dir, f'{name}.png')
  if rt.is_main():
    image_lib.save_grid(prog['pred_x0'].reshape((n * k,) + h_w_c),
                        paths['progressive_generation'], nrow=k)
    image_lib.save_grid(np.concatenate(rows), paths['shared_latent'],
                        nrow=shared['samples'].shape[1] + 2)
    image_lib.save_grid(np.concatenate(interp_rows), paths['interpolation'],
                        nrow=interp['decoded'].shape[2] + 2)
  return dict(paths=paths, progressive_t=prog['t'].tolist(), shared_latent_t=shared['t'].tolist(),
              interpolation_t=interp['t'].tolist())
