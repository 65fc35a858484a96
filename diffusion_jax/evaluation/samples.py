"""Samples of a checkpoint: ``--mode sample`` and the sample sets of FID / classifier metrics.

:func:`sample` writes ``config.sampling.num_samples`` images from the (EMA)
parameters of the latest checkpoint. Sample sets (``eval.sample_sets``, e.g.
``'ancestral,ddim50'``) have ``eval.num_fid_samples`` images each and are cached
as ``eval/samples_<set>_step<step>.npz`` (uint8 NHWC, key ``images``), so that
evaluation parts can be re-run without re-sampling. Every sampler is one of
:mod:`diffusion_jax.sampling` (DDPM Algorithm 2, DDIM, predictor-corrector).
"""

from __future__ import annotations

import re
from typing import Optional

import jax
import numpy as np
from tqdm import tqdm

from diffusion_jax import guidance
from diffusion_jax import images as image_lib
from diffusion_jax import sampling
from diffusion_jax.evaluation import runtime as rt
from diffusion_jax.schedule import Schedule

# Distinct streams of randomness, folded into PRNGKey(config.seed).
RNG_SAMPLE, RNG_SETS = 0x5A3E, 0x5E75


def sampler_name_and_steps(config) -> tuple[str, int]:
  """(sampler, steps) of ``config.sampling``; ancestral: T steps, or ``sampling.ancestral_steps``."""
  sc = config.sampling
  if sc.sampler == 'ancestral':
    return sc.sampler, int(sc.get('ancestral_steps', 0)) or config.diffusion.num_timesteps
  steps = int(sc.num_steps)
  return sc.sampler, steps


def run_tag(config) -> str:
  """Names a ``--mode sample`` run after its sampler: the steps (and DPM-Solver++'s order), or ``rtol<r>`` for the ODE.

  The probability-flow ODE (``sampling.sampler='ode'``) takes as many adaptive
  steps as its tolerance needs, so its files are named by ``sampling.ode_rtol``.
  """
  name, steps = sampler_name_and_steps(config)
  if name == 'dpm_solver':
    return f'{steps}_order{int(config.sampling.get("solver_order", 2))}'
  return f'rtol{float(config.sampling.ode_rtol):g}' if name == 'ode' else str(steps)


def generate_samples(config, schedule: Schedule, apply_fn: rt.ApplyFn, params, rng, num: int, *,
                     batch_size: Optional[int] = None, desc: str = 'sampling',
                     progress: bool = True) -> np.ndarray:
  """``num`` samples with ``config.sampling``'s sampler, as uint8 ``[num, H, W, C]``.

  Chunks of ``batch_size`` (default ``sampling.batch_size``, rounded up to a
  multiple of the device count so that :func:`sampling.make_sampler` shards them);
  chunk ``i`` uses ``fold_in(rng, i)``; the last chunk is a full one, truncated,
  so that one shape compiles. See :func:`generate_labeled_samples` for the labels.
  """
  return generate_labeled_samples(config, schedule, apply_fn, params, rng, num,
                                  batch_size=batch_size, desc=desc, progress=progress)[0]


def generate_labeled_samples(config, schedule: Schedule, apply_fn: rt.ApplyFn, params, rng,
                             num: int, *, batch_size: Optional[int] = None,
                             desc: str = 'sampling', progress: bool = True):
  """(uint8 images ``[num, H, W, C]``, int32 labels ``[num]`` or None), as :func:`generate_samples`.

  A class-conditional config's chunk ``i`` has the labels
  :func:`guidance.labels_from_config` of its key (``sampling.class_label``),
  guided with ``sampling.guidance_scale``; an unconditional one has None.
  """
  if num <= 0:
    raise ValueError(f'number of samples must be positive, got {num}.')
  bs = int(batch_size or config.sampling.batch_size)
  chunk = rt.round_up(min(bs, num), jax.device_count())
  sampler = sampling.make_sampler(config, schedule, apply_fn, batch_size=chunk)
  conditional = guidance.num_classes(config) > 0
  n_chunks = -(-num // chunk)
  out, labels = [], []
  for i in tqdm(range(n_chunks), desc=desc, unit='chunk',
                disable=not (progress and rt.is_main()), dynamic_ncols=True):
    key = jax.random.fold_in(rng, i)
    if conditional:
      y = guidance.labels_from_config(config, key, chunk)
      labels.append(np.asarray(y))
      x = sampler(params, key, y)
    else:
      x = sampler(params, key)
    out.append(image_lib.to_uint8(rt.to_host(x)))
  images = np.concatenate(out, axis=0)[:num]
  return images, (np.concatenate(labels)[:num] if conditional else None)


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


def save_samples_grid(config, images: np.ndarray, labels: Optional[np.ndarray], path) -> None:
  """The PNG grid of ``--mode sample``: one class per row for random labels, else the first 100."""
  k = guidance.num_classes(config)
  if labels is not None and int(config.sampling.get('class_label', -1)) < 0:
    image_lib.save_grid(grid_by_class(images, labels, k), path, nrow=10)
  else:
    image_lib.save_grid(images[:100], path)


def sample(config, workdir: str) -> dict:
  """``--mode sample``: ``config.sampling.num_samples`` samples of the latest checkpoint.

  Writes ``workdir/samples/samples_<sampler>_<steps>.npz`` (``<steps>`` is
  :func:`run_tag`: ``rtol<r>`` for the ODE; uint8 NHWC, key
  ``images``; a class-conditional model adds int32 ``labels`` and
  :func:`conditioning_tag` to the name) and a PNG grid
  next to it (the first <= 100 images, or one class per row when the labels
  are random, :func:`save_samples_grid`); prints and
  returns both paths (dict keys ``npz`` and ``png``) and the checkpoint ``step``.
  """
  workdir = rt.workdir_path(workdir)
  model, schedule, _, step, params = rt.restore_for_eval(config, workdir)
  name, tag = sampler_name_and_steps(config)[0], run_tag(config)
  how = f'adaptive steps, {tag}' if name == 'ode' else f'{tag} steps'
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), RNG_SAMPLE)
  images, labels = generate_labeled_samples(config, schedule, rt.apply_fn_for(model), params,
                                            rng, int(config.sampling.num_samples),
                                            desc=f'{name} sampling ({how})')
  stem = f'samples_{name}_{tag}{conditioning_tag(config)}'
  npz = rt.join(workdir, 'samples', f'{stem}.npz')
  png = rt.join(workdir, 'samples', f'{stem}.png')
  rt.save_npz(npz, images=images, **({} if labels is None else {'labels': labels}))
  if rt.is_main():
    save_samples_grid(config, images, labels, png)
  rt.say(f'Wrote {len(images)} samples ({name}, {how}) of checkpoint step {step}:\n'
         f'  {npz}\n  {png}')
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


def conditioning_tag(config) -> str:
  """``''`` unconditional; else ``'_w<guidance_scale>'`` (+ ``'_y<class_label>'`` for a fixed class)."""
  if not guidance.num_classes(config):
    return ''
  label = int(config.sampling.get('class_label', -1))
  w = float(config.sampling.get('guidance_scale', 0.0))
  return f'_w{w:g}' + (f'_y{label}' if label >= 0 else '')


def sample_set(config, workdir: str, schedule: Schedule, apply_fn: rt.ApplyFn, params, step: int,
               label: str, sampler: str, steps: int, num: int) -> np.ndarray:
  """``num`` uint8 samples of one sample set, cached in ``eval/samples_<label>_step<step>.npz``."""
  return labeled_sample_set(config, workdir, schedule, apply_fn, params, step, label, sampler,
                            steps, num)[0]


def labeled_sample_set(config, workdir: str, schedule: Schedule, apply_fn: rt.ApplyFn, params,
                       step: int, label: str, sampler: str, steps: int, num: int):
  """(images, labels or None) of :func:`sample_set`.

  A class-conditional config's cache name carries :func:`conditioning_tag`
  (``eval/samples_<label>_w<w>[_y<k>]_step<step>.npz``, with ``labels``).
  """
  name = label + conditioning_tag(config)
  path = rt.join(workdir, 'eval', f'samples_{name}_step{step}.npz')
  conditional = guidance.num_classes(config) > 0
  if rt.cached(path):
    cached = rt.load_npz(path)
    if cached['images'].shape[0] >= num and (not conditional or 'labels' in cached):
      rt.say(f'  {name}: reusing {path}')
      return cached['images'][:num], (cached['labels'][:num] if conditional else None)
  cfg = config.copy_and_resolve_references()
  cfg.sampling.sampler = sampler
  cfg.sampling.num_steps = steps
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), RNG_SETS),
                           sampling.SAMPLERS.index(sampler) * 100_000 + steps)
  images, labels = generate_labeled_samples(cfg, schedule, apply_fn, params, rng, num,
                                            desc=f'  {name}')
  rt.save_npz(path, images=images, **({} if labels is None else {'labels': labels}))
  if rt.is_main():
    save_samples_grid(config, images, labels, rt.join(workdir, 'eval', f'samples_{name}.png'))
  return images, labels
