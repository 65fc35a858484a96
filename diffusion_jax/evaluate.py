"""``--mode sample`` and ``--mode eval``: what a user does with a trained DDPM.

:func:`sample` writes ``config.sampling.num_samples`` images from the (EMA)
parameters of the latest checkpoint. :func:`evaluate` runs the experiments of
Ho et al. 2020 ("Denoising Diffusion Probabilistic Models", DDPM) on a
checkpoint and writes them to ``workdir/eval/``:

===============  ==================================================================
part             output (``config.eval.parts``, comma-separated)
===============  ==================================================================
``bpd``          ``bpd.json`` (test NLL in bits/dim and its L_T / sum L_t / L_0
                 breakdown, DDPM eq. 5 and §4.3 "Progressive coding"),
                 ``bpd_terms.npz`` (per-t means of L_t, x0-MSE, eps-MSE)
``rd``           ``rate_distortion.csv`` / ``.png`` (progressive lossy
                 decompression, DDPM §4.3, Algorithms 3-4, Fig. 5)
``figures``      ``progressive_generation.png`` (Fig. 6), ``shared_latent.png``
                 (Fig. 7), ``interpolation.png`` (Fig. 8)
``fid``          FID and Inception Score in ``metrics.json`` (needs
                 ``eval.inception_path``; skipped with a message otherwise)
``classifier``   digits only: Fréchet distance in the feature space of a small
                 digit classifier (offline), confidence and class histogram, in
                 ``metrics.json``
===============  ==================================================================

Sample sets for ``fid`` and ``classifier`` (``eval.sample_sets``, e.g.
``'ancestral,ddim50'``) have ``eval.num_fid_samples`` images each and are cached
as ``eval/samples_<set>_step<step>.npz`` (uint8 NHWC, key ``images``), so that
parts can be re-run without re-sampling.

Conventions (DESIGN.md): images in [-1, 1], NHWC; ``t`` is zero-based, index
``t`` being the paper's step ``t + 1`` (column ``t`` of ``calc_bpd_loop``'s
``vb`` is the paper's L_t; column 0 is the decoder term L_0). Only process 0
writes files; every process takes part in the (sharded) computations.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import re
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
from tqdm import tqdm

from diffusion_jax import checkpoint as ckpt
from diffusion_jax import config_lib
from diffusion_jax import data as data_lib
from diffusion_jax import diffusion
from diffusion_jax import images as image_lib
from diffusion_jax import metrics
from diffusion_jax import models
from diffusion_jax import sampling
from diffusion_jax import schedule as schedule_lib
from diffusion_jax import train
from diffusion_jax.schedule import Schedule

PARTS = ('bpd', 'rd', 'figures', 'fid', 'classifier')
ApplyFn = Callable[[Any, jnp.ndarray, jnp.ndarray], jnp.ndarray]   # (params, x_t, t) -> out

# Fig. 7 and Fig. 8 of DDPM use these steps of T = 1000 (rescaled to other T).
SHARED_LATENT_STEPS = (1000, 750, 500, 250)
INTERPOLATION_STEP = 500

# Distinct streams of randomness, folded into PRNGKey(config.seed).
_RNG_SAMPLE, _RNG_BPD, _RNG_FIGURES, _RNG_SETS = 0x5A3E, 0xB9D, 0xF16, 0x5E75


# --- small helpers -----------------------------------------------------------------


def _is_main() -> bool:
  return jax.process_index() == 0


def _say(msg: str) -> None:
  if _is_main():
    print(msg, flush=True)


to_host = train.to_host   # gathers a multi-host sharded array (process_allgather)


def apply_fn_for(model) -> ApplyFn:
  """``(params, x_t, t) -> output`` for a Flax module (eval mode, no dropout)."""
  return lambda params, x, t: model.apply({'params': params}, x, t, train=False)


def _batch_sharding(mesh: Optional[Mesh], batch: int):
  """``NamedSharding(mesh, P('data'))`` when ``batch`` divides over the mesh, else None."""
  if mesh is None or batch % mesh.size:
    return None
  return NamedSharding(mesh, P('data'))


def _put(x: np.ndarray, sharding):
  """Host array (identical on every host) -> device array, batch-sharded if ``sharding``."""
  if sharding is None:
    return jnp.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k


def _write_json(path: str, obj: dict) -> None:
  if not _is_main():
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _save_npz(path: str, **arrays) -> None:
  if not _is_main():
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def _cached(path: str) -> bool:
  """Whether a cached file may be reused: it exists and this is a single-process run.

  With several processes every one must take the same (collective) path, and
  only process 0 writes files, so caches are not reused there.
  """
  return jax.process_count() == 1 and os.path.exists(path)


def parse_parts(parts: str) -> list[str]:
  """``'bpd,rd'`` -> ``['bpd', 'rd']`` (in :data:`PARTS` order); ValueError on unknown names."""
  names = [p.strip() for p in str(parts or '').split(',') if p.strip()]
  bad = [p for p in names if p not in PARTS]
  if bad:
    raise ValueError(f'eval.parts: unknown part(s) {bad}; allowed: {", ".join(PARTS)}.')
  return [p for p in PARTS if p in names]


def restore_for_eval(config, workdir: str):
  """(model, schedule, mesh, step, params): the latest checkpoint's EMA (or raw) params.

  The checkpoint is restored onto the abstract shape of ``train.setup``'s
  initial state (``jax.eval_shape`` of ``train.create_train_state``), replicated
  over ``train.make_mesh()``, so nothing is initialised or compiled for it.

  ``config.sampling.use_ema`` picks the exponential moving average (DDPM App. B
  reports every sample and metric with the EMA parameters, decay 0.9999).
  """
  config_lib.validate_config(config)
  model = models.create_model(config)
  schedule = schedule_lib.schedule_from_config(config)
  mesh = train.make_mesh()
  # Restore onto an abstract target (shapes, dtypes, replicated shardings): the
  # same tree as train.setup's initial state without compiling its initialiser.
  abstract = jax.eval_shape(
      functools.partial(train.create_train_state, config, model, train.create_optimizer(config)),
      jax.random.PRNGKey(config.seed))
  replicated = NamedSharding(mesh, P())
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        abstract)
  step, state = ckpt.restore_params(workdir, target)
  params = state.ema_params if config.sampling.get('use_ema', True) else state.params
  return model, schedule, mesh, int(step), params


# --- samples ------------------------------------------------------------------------


def sampler_name_and_steps(config) -> tuple[str, int]:
  """(sampler, steps) of ``config.sampling``; the ancestral sampler always runs T steps."""
  sc = config.sampling
  steps = config.diffusion.num_timesteps if sc.sampler == 'ancestral' else int(sc.num_steps)
  return sc.sampler, steps


def generate_samples(config, schedule: Schedule, apply_fn: ApplyFn, params, rng, num: int, *,
                     batch_size: Optional[int] = None, desc: str = 'sampling',
                     progress: bool = True) -> np.ndarray:
  """``num`` samples with ``config.sampling``'s sampler, as uint8 ``[num, H, W, C]``.

  Chunks of ``batch_size`` (default ``sampling.batch_size``, rounded up to a
  multiple of the device count so that :func:`sampling.make_sampler` shards them);
  chunk ``i`` uses ``fold_in(rng, i)``; the last chunk is a full one, truncated,
  so that one shape compiles.
  """
  if num <= 0:
    raise ValueError(f'number of samples must be positive, got {num}.')
  bs = int(batch_size or config.sampling.batch_size)
  chunk = _round_up(min(bs, num), jax.device_count())
  sampler = sampling.make_sampler(config, schedule, apply_fn, batch_size=chunk)
  n_chunks = -(-num // chunk)
  out = []
  for i in tqdm(range(n_chunks), desc=desc, unit='chunk', disable=not (progress and _is_main()),
                dynamic_ncols=True):
    x = to_host(sampler(params, jax.random.fold_in(rng, i)))
    out.append(image_lib.to_uint8(x))
  return np.concatenate(out, axis=0)[:num]


def sample(config, workdir: str) -> dict:
  """``--mode sample``: ``config.sampling.num_samples`` samples of the latest checkpoint.

  Writes ``workdir/samples/samples_<sampler>_<steps>.npz`` (uint8 NHWC, key
  ``images``) and a PNG grid of the first <= 100 images next to it; prints and
  returns both paths (dict keys ``npz`` and ``png``) and the checkpoint ``step``.
  """
  workdir = os.path.abspath(workdir)
  model, schedule, _, step, params = restore_for_eval(config, workdir)
  name, steps = sampler_name_and_steps(config)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), _RNG_SAMPLE)
  images = generate_samples(config, schedule, apply_fn_for(model), params, rng,
                            int(config.sampling.num_samples),
                            desc=f'{name} sampling ({steps} steps)')
  out_dir = os.path.join(workdir, 'samples')
  npz = os.path.join(out_dir, f'samples_{name}_{steps}.npz')
  png = os.path.join(out_dir, f'samples_{name}_{steps}.png')
  if _is_main():
    _save_npz(npz, images=images)
    first = images[:100]
    image_lib.save_grid(first, png)
    print(f'Wrote {len(images)} samples ({name}, {steps} steps) of checkpoint step {step}:\n'
          f'  {npz}\n  {png}', flush=True)
  return dict(npz=npz, png=png, step=step)


def parse_sample_sets(spec: str, num_timesteps: int) -> list[tuple[str, str, int]]:
  """``'ancestral,ddim50,pc100'`` -> ``[(label, sampler, steps), ...]``.

  ``ancestral`` always runs T steps; ``ddim<N>`` / ``pc<N>`` run N steps (clamped
  to T, the label then names the steps actually run). ValueError on bad names.
  """
  out = []
  for item in [s.strip() for s in str(spec or '').split(',') if s.strip()]:
    m = re.fullmatch(r'(ancestral|ddim|pc)(\d*)', item)
    if not m or (m.group(1) == 'ancestral' and m.group(2)) or (m.group(1) != 'ancestral'
                                                               and not m.group(2)):
      raise ValueError(f'eval.sample_sets: bad entry {item!r}; use ancestral, ddim<steps> or '
                       'pc<steps> (e.g. "ancestral,ddim50").')
    kind = m.group(1)
    steps = num_timesteps if kind == 'ancestral' else min(int(m.group(2)), num_timesteps)
    if steps < 1:
      raise ValueError(f'eval.sample_sets: {item!r} needs at least one step.')
    label = kind if kind == 'ancestral' else f'{kind}{steps}'
    out.append((label, kind, steps))
  return out


def sample_set(config, workdir: str, schedule: Schedule, apply_fn: ApplyFn, params, step: int,
               label: str, sampler: str, steps: int, num: int) -> np.ndarray:
  """``num`` uint8 samples of one sample set, cached in ``eval/samples_<label>_step<step>.npz``."""
  path = os.path.join(workdir, 'eval', f'samples_{label}_step{step}.npz')
  if _cached(path):
    with np.load(path) as f:
      if f['images'].shape[0] >= num:
        _say(f'  {label}: reusing {path}')
        return f['images'][:num]
  cfg = config.copy_and_resolve_references()
  cfg.sampling.sampler = sampler
  cfg.sampling.num_steps = steps
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), _RNG_SETS),
                           sampling.SAMPLERS.index(sampler) * 100_000 + steps)
  images = generate_samples(cfg, schedule, apply_fn, params, rng, num, desc=f'  {label}')
  _save_npz(path, images=images)
  if _is_main():
    grid = os.path.join(workdir, 'eval', f'samples_{label}.png')
    image_lib.save_grid(images[:100], grid)
  return images


# --- bits/dim (DDPM eq. 5) ----------------------------------------------------------------


def eval_images(config, num: Optional[int] = None, split: Optional[str] = None) -> np.ndarray:
  """The evaluation split as float32 in [-1, 1], on the 8-bit grid: ``uint8 / 127.5 - 1``.

  Uses :func:`data.load_uint8` so the discretized decoder's 256 bins (DDPM eq.
  13) contain the data exactly (for digits this rounds ``x / 16 * 255``).
  """
  split = split or config.data.eval_split
  num = None if num is None or num < 0 else int(num)
  return data_lib.load_uint8(config, split, num=num).astype(np.float32) / 127.5 - 1.0


def make_bpd_fn(config, schedule: Schedule, apply_fn: ApplyFn, sharding=None) -> Callable:
  """Jitted ``(params, x0 [B], rng) -> calc_bpd_loop(...)``, batch-sharded if ``sharding``."""
  d = config.diffusion

  def fn(params, x0, rng):
    return diffusion.calc_bpd_loop(schedule, lambda x, t: apply_fn(params, x, t), x0, rng,
                                   mean_type=d.mean_type, var_type=d.var_type,
                                   clip_denoised=bool(d.get('clip_denoised', True)))

  if sharding is None:
    return jax.jit(fn)
  replicated = NamedSharding(sharding.mesh, P())
  return jax.jit(fn, in_shardings=(replicated, sharding, replicated), out_shardings=sharding)


def bpd_eval(config, schedule: Schedule, apply_fn: ApplyFn, params, images: np.ndarray, rng, *,
             batch_size: Optional[int] = None, mesh: Optional[Mesh] = None,
             progress: bool = True) -> dict:
  """The variational bound (DDPM eq. 5) of ``images`` with :func:`diffusion.calc_bpd_loop`.

  One jitted function for one batch shape: batches of ``batch_size`` (default
  ``eval.batch_size``), the last one padded by repeating its final image (the
  padding is dropped). Batch ``i`` uses ``fold_in(rng, i)``.

  Returns:
    NumPy dict: per example ``total_bpd``, ``prior_bpd`` (L_T), ``decoder_bpd``
    (L_0) ``[N]``; per zero-based t the example means ``vb`` (column t is the
    paper's L_t, column 0 is L_0), ``xstart_mse`` and ``mse`` ``[T]``.
  """
  images = np.asarray(images, np.float32)
  n = images.shape[0]
  if n == 0:
    raise ValueError('bpd_eval needs at least one image.')
  bs = min(int(batch_size or config.eval.batch_size), n)
  if mesh is not None:
    bs = _round_up(bs, mesh.size)
  sharding = _batch_sharding(mesh, bs)
  fn = make_bpd_fn(config, schedule, apply_fn, sharding)
  T = schedule.num_timesteps
  sums = {k: np.zeros(T, np.float64) for k in ('vb', 'xstart_mse', 'mse')}
  per_ex = {k: [] for k in ('total_bpd', 'prior_bpd', 'decoder_bpd')}
  n_batches = -(-n // bs)
  for i in tqdm(range(n_batches), desc='bits/dim', unit='batch',
                disable=not (progress and _is_main()), dynamic_ncols=True):
    x = images[i * bs:(i + 1) * bs]
    k = x.shape[0]
    if k < bs:
      x = np.concatenate([x, np.repeat(x[-1:], bs - k, axis=0)], axis=0)
    out = {key: to_host(v)[:k].astype(np.float64)
           for key, v in fn(params, _put(x, sharding), jax.random.fold_in(rng, i)).items()}
    for key in sums:
      sums[key] += out[key].sum(axis=0)
    per_ex['total_bpd'].append(out['total_bpd'])
    per_ex['prior_bpd'].append(out['prior_bpd'])
    per_ex['decoder_bpd'].append(out['vb'][:, 0])
  result = {k: np.concatenate(v) for k, v in per_ex.items()}
  result.update({k: v / n for k, v in sums.items()})
  return result


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


# --- progressive lossy decompression (DDPM §4.3, Fig. 5) --------------------------------


def rate_distortion(vb, xstart_mse, prior_bpd) -> dict:
  """Rate and distortion along progressive decoding (DDPM §4.3, Algorithms 3-4, Fig. 5).

  The sender transmits x_T ~ q(x_T | x_0) at a cost of L_T bits/dim, then
  x_{T-1}, ..., x_1 (paper indices), each x_s coded with p(x_s | x_{s+1}) at a
  cost of L_s (zero-based column s of ``vb``). Once the receiver holds the
  model input at zero-based step t (the paper's x_{t+1}) it has received
  ``rate(t) = L_T + sum_{s > t} vb[s]`` bits/dim and predicts x_0 from it with
  distortion ``sqrt(xstart_mse[t]) * 127.5``, the RMSE on the [0, 255] scale.
  The last point (t = 0) has rate ``total - L_0``; sending x_0 itself (L_0)
  would make it lossless.

  Args:
    vb: ``[T]`` (or ``[B, T]``, averaged over B) terms in bits/dim, column 0 = L_0.
    xstart_mse: ``[T]`` (or ``[B, T]``) mean squared error of the x_0 prediction
      in [-1, 1] units.
    prior_bpd: L_T (scalar or ``[B]``).

  Returns:
    NumPy dict with ``t`` (T-1 .. 0, the order of transmission),
    ``reverse_steps`` (T - 1 - t: steps of the reverse process run so far),
    ``rate_bpd`` (non-decreasing) and ``distortion_rmse``, all ``[T]``.
  """
  vb = np.asarray(vb, np.float64)
  mse = np.asarray(xstart_mse, np.float64)
  if vb.ndim == 2:
    vb = vb.mean(axis=0)
  if mse.ndim == 2:
    mse = mse.mean(axis=0)
  if vb.ndim != 1 or vb.shape != mse.shape:
    raise ValueError(f'vb and xstart_mse must both be [T] or [B, T]; got {vb.shape}, {mse.shape}.')
  prior = float(np.mean(prior_bpd))
  T = vb.size
  tail = np.cumsum(vb[::-1])[::-1]                # tail[t] = sum_{s >= t} vb[s]
  sent = np.append(tail[1:], 0.0)                 # sum_{s > t} vb[s]
  t = np.arange(T - 1, -1, -1)
  return dict(t=t, reverse_steps=T - 1 - t, rate_bpd=prior + sent[t],
              distortion_rmse=np.sqrt(np.maximum(mse[t], 0.0)) * 127.5)


def write_rate_distortion(rd: dict, eval_dir: str) -> tuple[str, str]:
  """Writes ``rate_distortion.csv`` (t, rate_bpd, distortion_rmse) and the Fig. 5 plot.

  The PNG has the paper's three panels: distortion and rate against reverse
  process steps (T - t), and distortion against rate.
  """
  csv_path = os.path.join(eval_dir, 'rate_distortion.csv')
  png_path = os.path.join(eval_dir, 'rate_distortion.png')
  if not _is_main():
    return csv_path, png_path
  os.makedirs(eval_dir, exist_ok=True)
  with open(csv_path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['t', 'rate_bpd', 'distortion_rmse'])
    for t, r, d in zip(rd['t'], rd['rate_bpd'], rd['distortion_rmse']):
      w.writerow([int(t), f'{r:.8g}', f'{d:.8g}'])
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  steps = rd['reverse_steps']
  axes[0].plot(steps, rd['distortion_rmse'])
  axes[0].set(xlabel='Reverse process steps (T - t)', ylabel='Distortion (RMSE [0, 255])')
  axes[1].plot(steps, rd['rate_bpd'])
  axes[1].set(xlabel='Reverse process steps (T - t)', ylabel='Rate (bits/dim)')
  axes[2].plot(rd['rate_bpd'], rd['distortion_rmse'])
  axes[2].set(xlabel='Rate (bits/dim)', ylabel='Distortion (RMSE [0, 255])')
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.suptitle('Progressive lossy decompression (DDPM §4.3, Fig. 5)')
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)
  return csv_path, png_path


# --- reverse chains from an intermediate x_t (Figs. 6-8) ----------------------------------


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


def _chain_fn(config, schedule, apply_fn):
  d = config.diffusion
  return jax.jit(lambda params, rng, x_t, t_start: p_sample_loop_from(
      schedule, lambda x, t: apply_fn(params, x, t), rng, x_t, t_start,
      mean_type=d.mean_type, var_type=d.var_type,
      clip_denoised=bool(d.get('clip_denoised', True))))


def progressive_generation(config, schedule, apply_fn, params, rng, *, num_samples: int = 8,
                           num_snapshots: int = 10) -> dict:
  """Predicted x_0 along the reverse chain (DDPM Fig. 6): ``pred_x0 [N, K, H, W, C]``, ``t [K]``."""
  d = config.diffusion
  k = min(num_snapshots, schedule.num_timesteps)
  shape = sampling.sample_shape(config, num_samples)
  fn = jax.jit(lambda params, rng: sampling.p_sample_loop_progressive(
      schedule, lambda x, t: apply_fn(params, x, t), rng, shape, mean_type=d.mean_type,
      var_type=d.var_type, clip_denoised=bool(d.get('clip_denoised', True)),
      num_snapshots=k))
  x0, snaps = fn(params, rng)
  return dict(x0=to_host(x0), pred_x0=np.swapaxes(to_host(snaps['pred_x0']), 0, 1),
              x_t=np.swapaxes(to_host(snaps['x_t']), 0, 1), t=to_host(snaps['t']))


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
  out = to_host(chain(params, jax.random.fold_in(rng, 1), batch, t_start))
  return dict(t=ts, x_t=to_host(x_t), samples=out.reshape((len(ts), num_samples) + x0.shape))


def interpolate(config, schedule, apply_fn, params, x0a, x0b, rng, *,
                paper_step: int = INTERPOLATION_STEP, num_lambdas: int = 9, chain=None) -> dict:
  """Interpolation through the latent x_t (DDPM §4.3, Fig. 8).

  Pairs (``x0a[i]``, ``x0b[i]``) are encoded with the same noise,
  x_t = q_sample(x_0, t, eps), x'_t = q_sample(x'_0, t, eps); the latents
  (1 - lambda) x_t + lambda x'_t are decoded with the reverse process, the
  reverse-process noise fixed across lambda within a pair.
  Returns ``decoded [P, num_lambdas, H, W, C]``, ``lambdas`` and ``t``.
  """
  T = schedule.num_timesteps
  t = paper_step_to_t(paper_step, T)
  x0a, x0b = np.asarray(x0a, np.float32), np.asarray(x0b, np.float32)
  pairs = x0a.shape[0]
  noise = jax.random.normal(jax.random.fold_in(rng, 0), x0a.shape, jnp.float32)
  tt = jnp.full((pairs,), t, jnp.int32)
  xa = diffusion.q_sample(schedule, jnp.asarray(x0a), tt, noise)
  xb = diffusion.q_sample(schedule, jnp.asarray(x0b), tt, noise)
  lam = np.linspace(0.0, 1.0, num_lambdas, dtype=np.float32)
  lam_b = lam.reshape((1, -1) + (1,) * (x0a.ndim - 1))
  latents = (1.0 - lam_b) * xa[:, None] + lam_b * xb[:, None]   # [P, L, H, W, C]
  batch = latents.reshape((pairs * num_lambdas,) + x0a.shape[1:])
  keys = jax.random.split(jax.random.fold_in(rng, 1), pairs)
  keys = jnp.repeat(keys, num_lambdas, axis=0)    # one reverse-noise stream per pair
  chain = chain or _chain_fn(config, schedule, apply_fn)
  out = to_host(chain(params, keys, batch, jnp.full((batch.shape[0],), t, jnp.int32)))
  return dict(t=t, lambdas=lam, decoded=out.reshape((pairs, num_lambdas) + x0a.shape[1:]))


def write_figures(config, schedule, apply_fn, params, test_images: np.ndarray, rng,
                  eval_dir: str) -> dict:
  """Figs. 6-8 of DDPM as PNG grids in ``eval_dir``; returns their paths.

  - ``progressive_generation.png``: rows are samples, columns the predicted x_0
    at evenly spaced steps from T-1 (left) to 0 (right);
  - ``shared_latent.png``: one row per t in (1000, 750, 500, 250)·T/1000:
    x_0, x_t, then samples from p(x_0 | x_t);
  - ``interpolation.png``: one row per pair: x_0, decoded latents for
    lambda = 0 .. 1, x'_0 (t = 500·T/1000).
  """
  paths = {}
  h_w_c = test_images.shape[1:]
  prog = progressive_generation(config, schedule, apply_fn, params, jax.random.fold_in(rng, 6))
  n, k = prog['pred_x0'].shape[:2]
  paths['progressive_generation'] = os.path.join(eval_dir, 'progressive_generation.png')
  chain = _chain_fn(config, schedule, apply_fn)
  shared = shared_latent_samples(config, schedule, apply_fn, params, test_images[0],
                                 jax.random.fold_in(rng, 7), chain=chain)
  rows = [np.concatenate([test_images[:1], np.clip(shared['x_t'][i:i + 1], -1, 1),
                          shared['samples'][i]]) for i in range(len(shared['t']))]
  paths['shared_latent'] = os.path.join(eval_dir, 'shared_latent.png')
  pairs = max(1, min(4, test_images.shape[0] // 2))
  a, b = test_images[0:2 * pairs:2], test_images[1:2 * pairs:2]
  if b.shape[0] < pairs:   # a single test image: interpolate it with itself
    b = a
  interp = interpolate(config, schedule, apply_fn, params, a, b, jax.random.fold_in(rng, 8),
                       chain=chain)
  interp_rows = [np.concatenate([a[i:i + 1], interp['decoded'][i], b[i:i + 1]])
                 for i in range(pairs)]
  paths['interpolation'] = os.path.join(eval_dir, 'interpolation.png')
  if _is_main():
    image_lib.save_grid(prog['pred_x0'].reshape((n * k,) + h_w_c),
                        paths['progressive_generation'], nrow=k)
    image_lib.save_grid(np.concatenate(rows), paths['shared_latent'],
                        nrow=shared['samples'].shape[1] + 2)
    image_lib.save_grid(np.concatenate(interp_rows), paths['interpolation'],
                        nrow=interp['decoded'].shape[1] + 2)
  return dict(paths=paths, progressive_t=prog['t'].tolist(), shared_latent_t=shared['t'].tolist(),
              interpolation_t=int(interp['t']))


# --- FID / Inception Score -------------------------------------------------------------------


def fid_reference_stats(config, workdir: str, inception_fn, batch_size: Optional[int] = None
                        ) -> tuple[np.ndarray, np.ndarray, str]:
  """(mu, sigma, description) of the reference Inception pool3 features.

  ``eval.fid_stats_path`` if set (a TTUR / pytorch-fid style ``.npz``), else
  computed from the first ``eval.num_fid_reference`` (-1: all) images of the
  training split (:func:`data.load_uint8`) and cached in ``workdir/eval/``.
  """
  from diffusion_jax import inception  # pylint: disable=g-import-not-at-top
  ev = config.eval
  if ev.fid_stats_path:
    mu, sigma = metrics.load_stats(ev.fid_stats_path)
    return mu, sigma, str(ev.fid_stats_path)
  num = int(ev.get('num_fid_reference', -1))
  split = config.data.train_split
  weights = os.path.splitext(os.path.basename(str(ev.inception_path)))[0]
  tag = re.sub(r'[^A-Za-z0-9_.-]+', '_', f'{config.data.name}_{split}_{num}_{weights}')
  path = os.path.join(workdir, 'eval', f'fid_stats_{tag}.npz')
  if os.path.exists(path):
    mu, sigma = metrics.load_stats(path)
    return mu, sigma, path
  images = data_lib.load_uint8(config, split, num=None if num < 0 else num)
  _say(f'  reference statistics: Inception features of {len(images)} {split} images')
  feats, _ = inception_features(inception_fn, images,
                                int(batch_size or min(ev.batch_size, len(images))))
  mu, sigma = metrics.feature_statistics(feats)
  if _is_main():
    metrics.save_stats(path, mu, sigma)
  return mu, sigma, path


def inception_features(inception_fn, images: np.ndarray, batch_size: int):
  """pool3 ``[N, 2048]`` and logits ``[N, 1008]`` of uint8 images.

  Every call of ``inception_fn`` gets exactly ``batch_size`` images (the last
  chunk is padded by repetition, the padding dropped): one compiled shape.
  """
  images = np.asarray(images)
  feats, logits = [], []
  for i in range(0, images.shape[0], batch_size):
    x = images[i:i + batch_size]
    k = x.shape[0]
    if k < batch_size:
      x = np.concatenate([x, np.repeat(x[-1:], batch_size - k, axis=0)], axis=0)
    f, l = inception_fn(x)
    feats.append(np.asarray(f, np.float64)[:k])
    logits.append(np.asarray(l, np.float64)[:k])
  return np.concatenate(feats, 0), np.concatenate(logits, 0)


def fid_metrics(config, workdir: str, sample_sets: dict) -> dict:
  """FID (Heusel et al. 2017) and Inception Score (Salimans et al. 2016) of each sample set.

  ``sample_sets`` maps a label to uint8 images ``[N, H, W, C]``. When
  ``eval.inception_path`` is None nothing is computed: a message saying which
  key to set is printed and returned (``{'skipped': message}``); a path that
  does not exist raises FileNotFoundError.
  """
  from diffusion_jax import inception  # pylint: disable=g-import-not-at-top
  ev = config.eval
  if not ev.inception_path:
    msg = ('FID / Inception Score skipped: eval.inception_path is not set. Set it to a local '
           'weights file to compute them (--config.eval.inception_path=PATH, or '
           '--default_config.eval.inception_path=PATH without --config; a .npz of '
           "pytorch-fid's weights or a .msgpack from inception.save_inception_params); "
           'nothing is downloaded. '
           f'See diffusion_jax/inception.py for how to make the file from {inception.FID_WEIGHTS_NAME}.')
    _say(f'  {msg}')
    return {'skipped': msg}
  variables = inception.load_inception_params(ev.inception_path)
  fn = inception.make_inception_fn(variables)   # uint8 [0, 255] in, resized to 299
  # One batch shape for references and samples (small sample sets: their size).
  bs = int(min(ev.batch_size, max([len(x) for x in sample_sets.values()] or [ev.batch_size])))
  mu_ref, sigma_ref, ref = fid_reference_stats(config, workdir, fn, bs)
  out = {'reference': ref, 'inception_path': str(ev.inception_path)}
  for label, images in sample_sets.items():
    feats, logits = inception_features(fn, images, bs)
    mu, sigma = metrics.feature_statistics(feats)
    is_mean, is_std = metrics.inception_score(logits, num_splits=min(10, len(images)))
    out[label] = dict(num_samples=int(len(images)),
                      fid=metrics.frechet_distance(mu, sigma, mu_ref, sigma_ref),
                      inception_score=is_mean, inception_score_std=is_std)
    _say(f'  {label}: FID {out[label]["fid"]:.3f}, IS {is_mean:.3f} ± {is_std:.3f}')
  return out


# --- the offline digits metric -------------------------------------------------------------


def digits_labels(split: str) -> np.ndarray:
  """Labels of the digits split, in :mod:`data`'s order (train: first 1500, test: last 297)."""
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  if split not in data_lib.DIGITS_SPLITS:
    raise ValueError(f'split {split!r} is not a digits split; allowed: {data_lib.DIGITS_SPLITS}.')
  target = sk_datasets.load_digits().target.astype(np.int32)
  n_test = data_lib.DIGITS_NUM_TEST
  return target[:-n_test] if split == 'train' else target[-n_test:]


def classifier_metrics(config, workdir: str, sample_sets: dict) -> dict:
  """Sample quality for the digits default with no download (see :mod:`classifier`).

  Trains (or loads from ``workdir/eval``) the small digit classifier on the
  training split and reports, for every sample set, the Fréchet distance
  between its penultimate-layer features and those of the **training split**
  (the larger split, 1500 images; as FID uses training-set statistics), the
  mean classifier confidence (max softmax) and the predicted-class histogram.
  ``frechet_test_vs_train`` (held-out test digits against the same reference)
  is the floor a perfect model would reach with 297 images.
  """
  from diffusion_jax import classifier  # pylint: disable=g-import-not-at-top
  if config.data.name != 'digits':
    raise ValueError(f'the classifier metric is for data.name=digits, got {config.data.name!r}.')
  train_split, test_split = config.data.train_split, config.data.eval_split
  x_train = data_lib.load_split(config, train_split)
  y_train = digits_labels(train_split)
  params = classifier.load_or_train_classifier(workdir, config, x_train, y_train)
  x_test = data_lib.load_split(config, test_split)
  ref = classifier.classifier_features(params, x_train)
  mu_ref, sigma_ref = metrics.feature_statistics(ref)

  def fd(images):
    return metrics.frechet_distance(
        *metrics.feature_statistics(classifier.classifier_features(params, images)),
        mu_ref, sigma_ref)

  out = dict(reference=f'{train_split} split ({len(x_train)} images)',
             classifier_steps=int(config.eval.classifier_steps),
             test_accuracy=classifier.classifier_accuracy(params, x_test,
                                                          digits_labels(test_split)),
             frechet_test_vs_train=fd(x_test), num_test=int(len(x_test)))
  for label, images in sample_sets.items():
    x = np.asarray(images, np.float32) / 127.5 - 1.0
    logits = classifier.classifier_logits(params, x)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    hist = np.bincount(np.argmax(probs, axis=1), minlength=probs.shape[1])
    out[label] = dict(num_samples=int(len(x)), frechet_distance=fd(x),
                      mean_confidence=float(np.mean(np.max(probs, axis=1))),
                      class_histogram=[int(c) for c in hist],
                      digit_score=metrics.inception_score(probs, num_splits=1,
                                                          from_logits=False)[0])
    _say(f'  {label}: classifier Fréchet distance {out[label]["frechet_distance"]:.3f} '
         f'(test digits: {out["frechet_test_vs_train"]:.3f}), '
         f'confidence {out[label]["mean_confidence"]:.3f}')
  return out


# --- evaluate() ---------------------------------------------------------------------------------


@dataclasses.dataclass
class _Context:
  config: Any
  workdir: str
  eval_dir: str
  schedule: Schedule
  apply_fn: ApplyFn
  params: Any
  step: int
  mesh: Mesh
  rng: Any
  cache: dict = dataclasses.field(default_factory=dict)

  def test_images(self) -> np.ndarray:
    if 'test' not in self.cache:
      self.cache['test'] = eval_images(self.config, self.config.eval.num_bpd_examples)
    return self.cache['test']

  def sample_sets(self) -> dict:
    if 'sets' not in self.cache:
      specs = parse_sample_sets(self.config.eval.get('sample_sets', 'ancestral,ddim50'),
                                self.schedule.num_timesteps)
      num = int(self.config.eval.num_fid_samples)
      self.cache['sets'] = {
          label: sample_set(self.config, self.workdir, self.schedule, self.apply_fn,
                            self.params, self.step, label, kind, steps, num)
          for label, kind, steps in specs}
    return self.cache['sets']


def _part_bpd(ctx: _Context) -> dict:
  images = ctx.test_images()
  result = bpd_eval(ctx.config, ctx.schedule, ctx.apply_fn, ctx.params, images,
                    jax.random.fold_in(ctx.rng, _RNG_BPD), mesh=ctx.mesh)
  ctx.cache['bpd'] = result
  summary = bpd_summary(result)
  summary.update(step=ctx.step, split=ctx.config.data.eval_split)
  _write_json(os.path.join(ctx.eval_dir, 'bpd.json'), summary)
  _save_npz(os.path.join(ctx.eval_dir, 'bpd_terms.npz'), vb=result['vb'],
            xstart_mse=result['xstart_mse'], mse=result['mse'],
            prior_bpd=np.mean(result['prior_bpd']), total_bpd=np.mean(result['total_bpd']),
            step=ctx.step)
  _say(f'  test NLL {summary["total_bpd"]:.4f} ± {summary["total_bpd_stderr"]:.4f} bits/dim '
       f'= L_T {summary["L_T_prior_bpd"]:.4f} + sum L_t {summary["sum_L_t_bpd"]:.4f} '
       f'+ L_0 {summary["L_0_decoder_bpd"]:.4f} ({summary["num_examples"]} images) '
       f'-> {os.path.join(ctx.eval_dir, "bpd.json")}')
  return summary


def _part_rd(ctx: _Context) -> dict:
  if 'bpd' in ctx.cache:
    r = ctx.cache['bpd']
    vb, mse, prior = r['vb'], r['xstart_mse'], np.mean(r['prior_bpd'])
  else:
    path = os.path.join(ctx.eval_dir, 'bpd_terms.npz')
    stale = not _cached(path)
    if not stale:
      with np.load(path) as f:
        vb, mse, prior = f['vb'], f['xstart_mse'], float(f['prior_bpd'])
        stale = int(f['step']) != ctx.step if 'step' in f.files else True
    if stale:   # no terms of this checkpoint on disk: compute them (writes bpd.json too)
      _part_bpd(ctx)
      return _part_rd(ctx)
  rd = rate_distortion(vb, mse, prior)
  csv_path, png_path = write_rate_distortion(rd, ctx.eval_dir)
  _say(f'  rate {rd["rate_bpd"][0]:.3f} -> {rd["rate_bpd"][-1]:.3f} bits/dim, distortion '
       f'{rd["distortion_rmse"][0]:.2f} -> {rd["distortion_rmse"][-1]:.2f} RMSE: {png_path}')
  return dict(csv=csv_path, png=png_path, final_rate_bpd=float(rd['rate_bpd'][-1]),
              final_distortion_rmse=float(rd['distortion_rmse'][-1]))


def _part_figures(ctx: _Context) -> dict:
  images = eval_images(ctx.config, 9)
  out = write_figures(ctx.config, ctx.schedule, ctx.apply_fn, ctx.params, images,
                      jax.random.fold_in(ctx.rng, _RNG_FIGURES), ctx.eval_dir)
  _say('  ' + ', '.join(out['paths'].values()))
  return out


def _update_metrics(ctx: _Context, key: str, value: dict) -> None:
  path = os.path.join(ctx.eval_dir, 'metrics.json')
  current = {}
  if os.path.exists(path):
    with open(path) as f:
      current = json.load(f)
    if current.get('step') != ctx.step:
      current = {}
  current.update(step=ctx.step, **{key: value})
  _write_json(path, current)


def _part_fid(ctx: _Context) -> dict:
  if not ctx.config.eval.inception_path:
    out = fid_metrics(ctx.config, ctx.workdir, {})
  else:
    out = fid_metrics(ctx.config, ctx.workdir, ctx.sample_sets())
  _update_metrics(ctx, 'fid', out)
  return out


def _part_classifier(ctx: _Context) -> dict:
  if ctx.config.data.name != 'digits':
    msg = f'classifier metric skipped: it is for data.name=digits (got {ctx.config.data.name!r}).'
    _say(f'  {msg}')
    return {'skipped': msg}
  out = classifier_metrics(ctx.config, ctx.workdir, ctx.sample_sets())
  _update_metrics(ctx, 'classifier', out)
  return out


_PART_FNS = {
    'bpd': ('test-set bits/dim (calc_bpd_loop)', _part_bpd),
    'rd': ('rate-distortion of progressive lossy decompression (Fig. 5)', _part_rd),
    'figures': ('progressive generation, shared x_t, interpolation (Figs. 6-8)', _part_figures),
    'fid': ('FID and Inception Score', _part_fid),
    'classifier': ('digit-classifier Fréchet distance', _part_classifier),
}


def evaluate(config, workdir: str) -> dict:
  """``--mode eval``: the parts named by ``config.eval.parts`` on the latest checkpoint.

  Writes into ``workdir/eval/`` (see the module docstring) and returns
  ``{part: result}`` plus ``step``; the per-part results are the JSON summaries
  (``bpd``), file paths (``rd``, ``figures``) or metric dicts (``fid``,
  ``classifier``) also written to disk.
  """
  parts = parse_parts(config.eval.get('parts', ','.join(PARTS)))
  workdir = os.path.abspath(workdir)
  model, schedule, mesh, step, params = restore_for_eval(config, workdir)
  eval_dir = os.path.join(workdir, 'eval')
  if _is_main():
    os.makedirs(eval_dir, exist_ok=True)
  ctx = _Context(config=config, workdir=workdir, eval_dir=eval_dir, schedule=schedule,
                 apply_fn=apply_fn_for(model), params=params, step=step, mesh=mesh,
                 rng=jax.random.PRNGKey(config.seed))
  _say(f'Evaluating checkpoint step {step} of {workdir} '
       f'({"EMA" if config.sampling.get("use_ema", True) else "raw"} parameters): '
       f'{", ".join(parts)}')
  results = {'step': step}
  for i, part in enumerate(parts, 1):
    desc, fn = _PART_FNS[part]
    _say(f'[eval {i}/{len(parts)}] {part}: {desc}')
    results[part] = fn(ctx)
  _say(f'Evaluation outputs in {eval_dir}')
  return results
