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
  solver needed, averaged over the chunks;
- ``distilled``: every student of ``--mode distill`` found in
  ``DIR/distilled/steps_<N>/`` (its own EMA parameters and config: DDIM in N
  steps on the trailing grid), N calls, from the same x_T.

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

from diffusion_jax import checkpoint as ckpt
from diffusion_jax import samplers
from diffusion_jax import settings
from diffusion_jax import workdir as workdir_lib
from diffusion_jax.evaluation import guidance_sweep
from diffusion_jax.evaluation import runtime as rt
from diffusion_jax.evaluation import samples

SAMPLERS = ('ddim', 'dpm_solver2', 'dpm_solver3', 'ancestral')
COLUMNS = ('sampler', 'nfe', 'num_samples', 'wall_s', 'classifier_frechet_at_n',
           'classifier_frechet_real_at_n', 'classifier_kid', 'classifier_kid_std', 'fid', 'kid',
           'inception_score')
RNG_NFE = 0x0FE   # folded into PRNGKey(config.seed): every sampler starts from the same x_T
STUDENT = 'distilled'   # the sampler name of the distilled students' rows


def nfe_spec(spec: samplers.SamplerSpec, sampler: str, calls: int) -> samplers.SamplerSpec:
  """``spec`` running ``sampler`` (a name of :data:`SAMPLERS`) with ``calls`` model calls."""
  if sampler == 'ddim':
    return spec.replace(name='ddim', num_steps=calls, eta=0.0)
  if sampler in ('dpm_solver2', 'dpm_solver3'):
    return spec.replace(name='dpm_solver', num_steps=calls, order=int(sampler[-1]))
  if sampler == 'ancestral':
    return spec.replace(name='ancestral', num_steps=calls)
  raise ValueError(f'nfe_curve: unknown sampler {sampler!r}; allowed: {", ".join(SAMPLERS)}.')


def distilled_students(workdir: str) -> list[tuple[int, str, int]]:
  """(N, path, checkpoint step) of the N-step students ``DIR/distilled/steps_<N>``, by N.

  Only students with a finished checkpoint (a round stopped before its first
  save has none).
  """
  root = workdir_lib.as_path(workdir) / 'distilled'
  found = []
  if root.exists():
    for path in root.iterdir():
      name = path.name
      if name.startswith('steps_') and name[6:].isdigit():
        step = ckpt.latest_step(path)
        if step is not None:
          found.append((int(name[6:]), str(path), int(step)))
  return sorted(found)


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
  if config.model.num_classes:
    raise ValueError('the nfe_curve part is for unconditional models (model.num_classes=0); '
                     'use part guidance for class-conditional ones.')
  ev = settings.eval_settings(config)
  spec, cond = settings.sampler_spec(config), settings.conditioning(config)
  num = int(config.eval.num_fid_samples)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), RNG_NFE)

  def draw(run_spec, desc):
    images, _, nfe = samples.generate_labeled_samples(
        run_spec, cond, schedule, apply_fn, params, rng, num,
        image_shape=settings.image_shape(config), batch_size=config.sampling.batch_size,
        desc=desc, progress=False, with_nfe=True)
    return images, nfe

  runs = [(f'{sampler}_{n}', sampler,
           lambda sampler=sampler, n=n: draw(nfe_spec(spec, sampler, n), f'  {sampler} {n}'))
          for sampler in SAMPLERS for n in ev.nfe_calls if n <= schedule.num_timesteps]
  runs += [(f'ode_rtol{rtol:g}', f'ode_rtol{rtol:g}',
            lambda rtol=rtol: draw(spec.replace(name='ode', rtol=rtol, atol=rtol),
                                   f'  ode {rtol:g}'))
           for rtol in ev.nfe_ode_rtols]
  for n, path, student_step in distilled_students(workdir):
    # The cache name holds the student's own checkpoint step: a retrained student draws again.
    draw_student = lambda n=n, path=path: _draw_student(  # noqa: E731
        path, rng, num, settings.image_shape(config), config.sampling.batch_size, n)
    runs.append((f'{STUDENT}_{n}_at{student_step}', STUDENT, draw_student))
  rows = []
  for name, sampler, draw_set in runs:
    images, nfe, wall = _cached_set(workdir, step, name, num, draw_set)
    row = dict(sampler=sampler, nfe=nfe, num_samples=int(len(images)), wall_s=wall)
    row.update(guidance_sweep.quality_row(config, workdir, name, images))
    rows.append(row)
    shown = row.get('classifier_frechet_at_n', row.get('fid'))
    rt.say(f'  {sampler:12s} {nfe:6.1f} model calls: {wall:7.1f} s'
           + ('' if shown is None else f', distance {shown:.3f}'))
  return rows


def _draw_student(path: str, rng, num: int, image_shape, batch_size: int, n: int):
  """(images, calls) of the student in ``path`` with its own sampler (its config.json)."""
  config = workdir_lib.read_config(path)
  model, schedule, _, _, params = rt.restore_for_eval(config, path)
  images, _, nfe = samples.generate_labeled_samples(
      settings.sampler_spec(config), settings.conditioning(config), schedule,
      rt.apply_fn_for(model), params, rng, num, image_shape=image_shape,
      batch_size=batch_size, desc=f'  {STUDENT} {n}', progress=False, with_nfe=True)
  return images, nfe


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
