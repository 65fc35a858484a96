"""Sample quality per model call: the fast samplers side by side (eval part ``nfe_curve``).

Every sampler of the project reads the same trained eps-model; what differs is
how many times it calls it (the number of function evaluations, NFE) and how
well its samples match the data at that budget:

- ``ddim``: DDIM with eta = 0 (Song, Meng & Ermon 2021, eq. 12), N calls;
- ``dpm_solver2`` / ``dpm_solver3``: DPM-Solver++ multistep (Lu et al. 2022),
  N calls on the same grid;
- ``ancestral``: DDPM's Algorithm 2 on a respaced schedule of N steps
  (Nichol & Dhariwal 2021, §4: ``sampling.ancestral_steps``), N calls;
- ``ode``: the probability-flow ODE (:mod:`diffusion_jax.sde`) with an adaptive
  solver at each tolerance of ``eval.nfe_ode_rtols``; its NFE is what the
  solver needed, averaged over the chunks.

For each (sampler, budget) of ``eval.nfe_calls`` it draws
``eval.num_fid_samples`` images (the same x_T for every sampler) and scores
them with the metrics at hand: on digits the classifier distance and KID of
:mod:`classifier_metrics` (beside real digits, the floor), with
``eval.inception_path`` FID / KID / IS (:mod:`fid`). Wall times include each
sampler's compilation, as a user running it once would see.

Writes ``eval/nfe_curve.csv`` (one row per sampler and budget) and
``eval/nfe_curve.png`` (distance against model calls, log x axis).
"""

from __future__ import annotations

import time

import jax
import numpy as np

from diffusion_jax import images as image_lib
from diffusion_jax import sampling
from diffusion_jax import sde
from diffusion_jax.evaluation import guidance_sweep
from diffusion_jax.evaluation import runtime as rt
from diffusion_jax.evaluation import samples

SAMPLERS = ('ddim', 'dpm_solver2', 'dpm_solver3', 'ancestral')
COLUMNS = ('sampler', 'nfe', 'num_samples', 'wall_s', 'classifier_frechet_at_n',
           'classifier_frechet_real_at_n', 'classifier_kid', 'classifier_kid_std', 'fid', 'kid',
           'inception_score')
RNG_NFE = 0x0FE   # folded into PRNGKey(config.seed): every sampler starts from the same x_T


def parse_numbers(field: str, spec, kind=int) -> list:
  """``'5,10,20'`` -> ``[5, 10, 20]``; ValueError naming ``field`` on anything not positive."""
  items = [s.strip() for s in str(spec or '').split(',') if s.strip()]
  try:
    values = [kind(s) for s in items]
  except ValueError:
    values = []
  if not values or any(not v > 0 for v in values):
    raise ValueError(f'{field}={spec!r} must be a comma-separated list of positive numbers, '
                     'e.g. "5,10,20,50,100".')
  return values


def sampler_config(config, sampler: str, calls: int):
  """A copy of ``config`` whose ``sampling`` section runs ``sampler`` with ``calls`` model calls."""
  cfg = config.copy_and_resolve_references()
  sc = cfg.sampling
  if sampler == 'ddim':
    sc.sampler, sc.num_steps, sc.eta = 'ddim', calls, 0.0
  elif sampler.startswith('dpm_solver'):
    sc.sampler, sc.num_steps, sc.solver_order = 'dpm_solver', calls, int(sampler[-1])
  elif sampler == 'ancestral':
    sc.sampler, sc.ancestral_steps = 'ancestral', calls
  else:
    raise ValueError(f'nfe_curve: unknown sampler {sampler!r}; allowed: {", ".join(SAMPLERS)}.')
  return cfg


def ode_samples(config, schedule, apply_fn, params, rng, num: int, rtol: float):
  """(uint8 images ``[num, H, W, C]``, mean NFE): the probability-flow ODE at ``rtol`` (= atol).

  Chunk ``i`` of ``sampling.batch_size`` draws x_T from ``fold_in(rng, i)``,
  as :func:`samples.generate_labeled_samples` does for the other samplers.
  """
  chunk = min(int(config.sampling.batch_size), num)
  shape = sampling.sample_shape(config, chunk)
  solve = jax.jit(lambda p, r: sde.probability_flow_sample(
      schedule, lambda x, t: apply_fn(p, x, t), r, shape, rtol=rtol, atol=rtol,
      mean_type=config.diffusion.mean_type))
  out, nfe = [], []
  for i in range(-(-num // chunk)):
    x, n = solve(params, jax.random.fold_in(rng, i))
    out.append(image_lib.to_uint8(np.asarray(x)))
    nfe.append(int(n))
  return np.concatenate(out)[:num], float(np.mean(nfe))


def _cached_set(workdir: str, step: int, name: str, num: int, draw):
  """(images, nfe, wall_s) of one sample set: ``draw()`` once, then ``eval/nfe_<name>_step<step>.npz``.

  The metrics can then be recomputed (another classifier, Inception weights)
  without sampling again; the wall time is the one measured when sampling.
  """
  path = rt.join(workdir, 'eval', f'nfe_{name}_step{step}.npz')
  if rt.cached(path):
    cached = rt.load_npz(path)
    if cached['images'].shape[0] >= num:
      return cached['images'][:num], float(cached['nfe']), float(cached['wall_s'])
  start = time.perf_counter()
  images, nfe = draw()
  wall = round(time.perf_counter() - start, 2)
  rt.save_npz(path, images=images, nfe=np.float64(nfe), wall_s=np.float64(wall))
  return images, float(nfe), wall


def nfe_curve(config, workdir: str, schedule, apply_fn, params, step: int = 0) -> list[dict]:
  """One row per (sampler, budget) of ``eval.nfe_calls`` and per ODE tolerance (module docstring).

  Sample sets are cached per checkpoint ``step`` (:func:`_cached_set`).
  """
  if config.model.get('num_classes', 0):
    raise ValueError('the nfe_curve part is for unconditional models (model.num_classes=0); '
                     'use part guidance for class-conditional ones.')
  calls = parse_numbers('eval.nfe_calls', config.eval.get('nfe_calls', '5,10,20,50,100'))
  rtols = parse_numbers('eval.nfe_ode_rtols', config.eval.get('nfe_ode_rtols', '1e-3,1e-5'),
                        float)
  num = int(config.eval.num_fid_samples)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), RNG_NFE)
  runs = [(f'{sampler}_{n}', sampler,
           lambda sampler=sampler, n=n: (samples.generate_samples(
               sampler_config(config, sampler, n), schedule, apply_fn, params, rng, num,
               desc=f'  {sampler} {n}', progress=False), n))
          for sampler in SAMPLERS for n in calls if n <= schedule.num_timesteps]
  runs += [(f'ode_rtol{rtol:g}', f'ode_rtol{rtol:g}',
            lambda rtol=rtol: ode_samples(config, schedule, apply_fn, params, rng, num, rtol))
           for rtol in rtols]
  rows = []
  for name, sampler, draw in runs:
    images, nfe, wall = _cached_set(workdir, step, name, num, draw)
    row = dict(sampler=sampler, nfe=nfe, num_samples=int(len(images)), wall_s=wall)
    row.update(guidance_sweep.quality_row(config, workdir, name, images))
    rows.append(row)
    shown = row.get('classifier_frechet_at_n', row.get('fid'))
    rt.say(f'  {sampler:12s} {nfe:6.1f} model calls: {wall:7.1f} s'
           + ('' if shown is None else f', distance {shown:.3f}'))
  return rows


def write_nfe_curve(rows: list[dict], eval_dir: str) -> tuple[str, str]:
  """``nfe_curve.csv`` (:data:`COLUMNS`) and ``nfe_curve.png`` (distance vs model calls, log x)."""
  csv_path, png_path, plt = rt.csv_and_pyplot(eval_dir, 'nfe_curve', COLUMNS, rows)
  if plt is None:
    return csv_path, png_path
  metric = next((c for c in ('classifier_frechet_at_n', 'fid') if any(c in r for r in rows)), None)
  fig, ax = plt.subplots(figsize=(5.5, 4))
  if metric is not None:
    for name in dict.fromkeys(r['sampler'] for r in rows):
      pts = [(r['nfe'], r[metric]) for r in rows if r['sampler'] == name]
      ax.plot(*zip(*pts), 'o-' if len(pts) > 1 else 's', label=name)
    real = [r['classifier_frechet_real_at_n'] for r in rows if 'classifier_frechet_real_at_n' in r]
    if real:
      ax.axhline(real[0], color='gray', ls='--', label='real digits (floor)')
    ax.set(xscale='log', xlabel='model calls (NFE)', ylabel=metric)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which='both')
  rt.save_titled_figure(fig, png_path, 'Sample quality per model call')
  return csv_path, png_path
