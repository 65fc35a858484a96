"""Samples of a checkpoint: ``--mode sample`` and the sample sets of FID / classifier metrics.

:func:`sample` writes ``config.sampling.num_samples`` images from the (EMA)
parameters of the latest checkpoint. Sample sets (``eval.sample_sets``, e.g.
``'ancestral,ddim50'``) have ``eval.num_fid_samples`` images each and are cached
as ``eval/samples_<set>_step<step>.npz`` (uint8 NHWC, key ``images``), so that
evaluation parts can be re-run without re-sampling. Every sampler is one of
:mod:`diffusion_jax.sampling` (DDPM Algorithm 2, DDIM, predictor-corrector).
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np
from tqdm import tqdm

from diffusion_jax import guidance
from diffusion_jax import images as image_lib
from diffusion_jax import runner
from diffusion_jax import samplers
from diffusion_jax import sampling
from diffusion_jax import settings
from diffusion_jax.evaluation import runtime as rt
from diffusion_jax.schedule import Schedule

# Distinct streams of randomness, folded into PRNGKey(config.seed).
RNG_SAMPLE, RNG_SETS = 0x5A3E, 0x5E75


def sample_rng(seed: int):
  """The key of ``--mode sample`` and :meth:`Pipeline.sample` for ``seed``."""
  return jax.random.fold_in(jax.random.PRNGKey(int(seed)), RNG_SAMPLE)


def generate_labeled_samples(spec: samplers.SamplerSpec, cond: guidance.Conditioning,
                             schedule: Schedule, apply_fn: rt.ApplyFn, params, rng, num: int, *,
                             image_shape, batch_size: int, labels=None, desc: str = 'sampling',
                             progress: bool = True, cache: Optional[dict] = None,
                             with_nfe: bool = False):
  """(uint8 images ``[num, H, W, C]``, int32 labels ``[num]`` or None[, mean nfe]).

  ``num`` samples with ``spec``'s sampler (:mod:`diffusion_jax.samplers`) in chunks of
  ``batch_size`` rounded up to a multiple of the device count (so that
  :func:`runner.make_sampler` shards them); chunk ``i`` uses ``fold_in(rng, i)``;
  the last chunk is a full one, truncated, so that one shape compiles. A
  conditional ``cond`` draws chunk ``i``'s labels from its key
  (:meth:`guidance.Conditioning.labels`) unless ``labels`` (int32 ``[num]``) are
  given, and guides with ``cond.guidance_scale``. ``cache`` (a dict) keeps the
  compiled sampler per (spec, conditioning, batch) across calls.
  """
  if num <= 0:
    raise ValueError(f'number of samples must be positive, got {num}.')
  chunk = rt.round_up(min(int(batch_size), num), jax.device_count())
  key = (spec, cond, chunk, with_nfe)
  sampler = None if cache is None else cache.get(key)
  if sampler is None:
    sampler = runner.make_sampler(spec, cond, schedule, apply_fn, (chunk,) + tuple(image_shape),
                                  with_nfe=True)
    if cache is not None:
      cache[key] = sampler
  out, out_labels, nfe = [], [], []
  for i in tqdm(range(-(-num // chunk)), desc=desc, unit='chunk',
                disable=not (progress and rt.is_main()), dynamic_ncols=True):
    key_i = jax.random.fold_in(rng, i)
    y = None
    if cond.conditional:
      if labels is None:
        y = np.asarray(cond.labels(key_i, chunk))
      else:
        y = rt.pad_batch(np.asarray(labels[i * chunk:(i + 1) * chunk], np.int32), chunk)
      out_labels.append(y)
    x, n = sampler(params, key_i, y) if cond.conditional else sampler(params, key_i)
    out.append(image_lib.to_uint8(rt.to_host(x)))
    nfe.append(int(n))
  images = np.concatenate(out, axis=0)[:num]
  result = (images, np.concatenate(out_labels)[:num] if cond.conditional else None)
  return result + (float(np.mean(nfe)),) if with_nfe else result


def generate_samples(spec: samplers.SamplerSpec, cond: guidance.Conditioning,
                     schedule: Schedule, apply_fn: rt.ApplyFn, params, rng, num: int,
                     **kwargs) -> np.ndarray:
  """The images of :func:`generate_labeled_samples`."""
  return generate_labeled_samples(spec, cond, schedule, apply_fn, params, rng, num, **kwargs)[0]


def grid_by_class(images: np.ndarray, labels: np.ndarray, num_classes: int, *,
                  per_row: int = 10) -> np.ndarray:
  """Images arranged one class per row (up to ``per_row`` each), blank cells padding short rows.

  Returns ``[num_classes * per_row, H, W, C]`` uint8 for ``images.save_grid(..., nrow=per_row)``.
  """
  cells = np.full((num_classes, per_row) + images.shape[1:], 255, np.uint8)
  for k in range(num_classes):
    of_k = images[labels == k][:per_row]
    cells[k, :len(of_k)] = of_k
  return cells.reshape((-1,) + images.shape[1:])


def save_samples_grid(cond: guidance.Conditioning, images: np.ndarray,
                      labels: Optional[np.ndarray], path) -> None:
  """The PNG grid of ``--mode sample``: one class per row for random labels, else the first 100."""
  if labels is not None and cond.class_label < 0:
    image_lib.save_grid(grid_by_class(images, labels, cond.num_classes), path, nrow=10)
  else:
    image_lib.save_grid(images[:100], path)


def sample(config, workdir: str) -> dict:
  """``--mode sample``: ``config.sampling.num_samples`` samples of the newest checkpoint.

  The images are :meth:`diffusion_jax.Pipeline.sample`'s for ``config.seed``
  (the same function draws them). Writes
  ``workdir/samples/samples_<sampler>_<steps>.npz`` (``<steps>`` is
  :meth:`samplers.SamplerSpec.tag`: ``rtol<r>`` for the ODE; uint8 NHWC, key
  ``images``; a class-conditional model adds int32 ``labels`` and
  :func:`conditioning_tag` to the name) and a PNG grid next to it (the first
  <= 100 images, or one class per row when the labels are random); prints and
  returns both paths (dict keys ``npz`` and ``png``) and the checkpoint ``step``.
  """
  from diffusion_jax import pipeline  # pylint: disable=g-import-not-at-top (it imports this module)
  workdir = rt.workdir_path(workdir)
  pipe = pipeline.Pipeline.from_workdir(workdir, config)
  spec, cond = settings.sampler_spec(config), settings.conditioning(config)
  T = int(config.diffusion.num_timesteps)
  name, tag = spec.name, spec.tag(T)
  how = f'adaptive steps, {tag}' if name == 'ode' else f'{tag} steps'
  images, labels = pipe.sample_with_labels(int(config.sampling.num_samples), seed=config.seed,
                                           desc=f'{name} sampling ({how})')
  stem = f'samples_{name}_{tag}{conditioning_tag(cond)}'
  npz = rt.join(workdir, 'samples', f'{stem}.npz')
  png = rt.join(workdir, 'samples', f'{stem}.png')
  rt.save_npz(npz, images=images, **({} if labels is None else {'labels': labels}))
  if rt.is_main():
    save_samples_grid(cond, images, labels, png)
  rt.say(f'Wrote {len(images)} samples ({name}, {how}) of checkpoint step {pipe.step}:\n'
         f'  {npz}\n  {png}')
  return dict(npz=npz, png=png, step=pipe.step)


def conditioning_tag(cond: guidance.Conditioning) -> str:
  """``''`` unconditional; else ``'_w<guidance_scale>'`` (+ ``'_y<class_label>'`` for a fixed class)."""
  if not cond.conditional:
    return ''
  return f'_w{cond.guidance_scale:g}' + (f'_y{cond.class_label}' if cond.class_label >= 0 else '')


def labeled_sample_set(config, workdir: str, schedule: Schedule, apply_fn: rt.ApplyFn, params,
                       step: int, label: str, sampler: str, steps: int, num: int):
  """(images, labels or None): ``num`` samples of one sample set, cached in ``eval/``.

  The cache is ``eval/samples_<label>_step<step>.npz``; a class-conditional
  config's name carries :func:`conditioning_tag` (``..._w<w>[_y<k>]_step<step>.npz``,
  with ``labels``).
  """
  cond = settings.conditioning(config)
  name = label + conditioning_tag(cond)
  path = rt.join(workdir, 'eval', f'samples_{name}_step{step}.npz')
  if rt.cached(path):
    cached = rt.load_npz(path)
    if cached['images'].shape[0] >= num and (not cond.conditional or 'labels' in cached):
      rt.say(f'  {name}: reusing {path}')
      return cached['images'][:num], (cached['labels'][:num] if cond.conditional else None)
  spec = settings.sampler_spec(config).replace(name=sampler, num_steps=steps)
  if sampler == 'ancestral':   # a sample set's ancestral chain runs every step
    spec = spec.replace(num_steps=0)
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), RNG_SETS),
                           sampling.SAMPLERS.index(sampler) * 100_000 + steps)
  images, labels = generate_labeled_samples(
      spec, cond, schedule, apply_fn, params, rng, num, image_shape=settings.image_shape(config),
      batch_size=config.sampling.batch_size, desc=f'  {name}')
  rt.save_npz(path, images=images, **({} if labels is None else {'labels': labels}))
  if rt.is_main():
    save_samples_grid(cond, images, labels, rt.join(workdir, 'eval', f'samples_{name}.png'))
  return images, labels
