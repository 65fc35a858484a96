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

from diffusion_jax import eval_runtime as rt
from diffusion_jax import images as image_lib
from diffusion_jax import sampling
from diffusion_jax.schedule import Schedule

# Distinct streams of randomness, folded into PRNGKey(config.seed).
RNG_SAMPLE, RNG_SETS = 0x5A3E, 0x5E75


def sampler_name_and_steps(config) -> tuple[str, int]:
  """(sampler, steps) of ``config.sampling``; the ancestral sampler always runs T steps."""
  sc = config.sampling
  steps = config.diffusion.num_timesteps if sc.sampler == 'ancestral' else int(sc.num_steps)
  return sc.sampler, steps


def generate_samples(config, schedule: Schedule, apply_fn: rt.ApplyFn, params, rng, num: int, *,
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
  chunk = rt.round_up(min(bs, num), jax.device_count())
  sampler = sampling.make_sampler(config, schedule, apply_fn, batch_size=chunk)
  n_chunks = -(-num // chunk)
  out = []
  for i in tqdm(range(n_chunks), desc=desc, unit='chunk',
                disable=not (progress and rt.is_main()), dynamic_ncols=True):
    x = rt.to_host(sampler(params, jax.random.fold_in(rng, i)))
    out.append(image_lib.to_uint8(x))
  return np.concatenate(out, axis=0)[:num]


def sample(config, workdir: str) -> dict:
  """``--mode sample``: ``config.sampling.num_samples`` samples of the latest checkpoint.

  Writes ``workdir/samples/samples_<sampler>_<steps>.npz`` (uint8 NHWC, key
  ``images``) and a PNG grid of the first <= 100 images next to it; prints and
  returns both paths (dict keys ``npz`` and ``png``) and the checkpoint ``step``.
  """
  workdir = rt.workdir_path(workdir)
  model, schedule, _, step, params = rt.restore_for_eval(config, workdir)
  name, steps = sampler_name_and_steps(config)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), RNG_SAMPLE)
  images = generate_samples(config, schedule, rt.apply_fn_for(model), params, rng,
                            int(config.sampling.num_samples),
                            desc=f'{name} sampling ({steps} steps)')
  npz = rt.join(workdir, 'samples', f'samples_{name}_{steps}.npz')
  png = rt.join(workdir, 'samples', f'samples_{name}_{steps}.png')
  rt.save_npz(npz, images=images)
  if rt.is_main():
    image_lib.save_grid(images[:100], png)
  rt.say(f'Wrote {len(images)} samples ({name}, {steps} steps) of checkpoint step {step}:\n'
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


def sample_set(config, workdir: str, schedule: Schedule, apply_fn: rt.ApplyFn, params, step: int,
               label: str, sampler: str, steps: int, num: int) -> np.ndarray:
  """``num`` uint8 samples of one sample set, cached in ``eval/samples_<label>_step<step>.npz``."""
  path = rt.join(workdir, 'eval', f'samples_{label}_step{step}.npz')
  if rt.cached(path):
    images = rt.load_npz(path)['images']
    if images.shape[0] >= num:
      rt.say(f'  {label}: reusing {path}')
      return images[:num]
  cfg = config.copy_and_resolve_references()
  cfg.sampling.sampler = sampler
  cfg.sampling.num_steps = steps
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), RNG_SETS),
                           sampling.SAMPLERS.index(sampler) * 100_000 + steps)
  images = generate_samples(cfg, schedule, apply_fn, params, rng, num, desc=f'  {label}')
  rt.save_npz(path, images=images)
  if rt.is_main():
    image_lib.save_grid(images[:100], rt.join(workdir, 'eval', f'samples_{label}.png'))
  return images
