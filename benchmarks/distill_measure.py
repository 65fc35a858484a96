"""Few-step quality of progressive distillation against the training-free solvers on the same teacher.

    python benchmarks/distill_measure.py --teacher runs/digits_teacher \
        [--num 500] [--steps 1,2,4,8] [--solver_calls 5,10] \
        [--update docs/distillation.md] [--grid docs/images/distill_steps.png]

For every N of ``--steps`` it samples ``--num`` digits from the N-step student
``TEACHER/distilled/steps_<N>`` (its own config.json: DDIM, eta 0, trailing
grid) and from the teacher with DDIM (eta 0, the teacher's grid) and
DPM-Solver++ (orders 2 and 3) at N model calls, plus the solvers alone at
``--solver_calls``. Each set is scored with the digits metric of ``--mode eval
--config.eval.parts=classifier`` (the classifier Fréchet distance at the set's
size, next to real digits at the same size; the classifier is the one cached in
``TEACHER/eval``). Writes ``TEACHER/eval/<marker>.csv``, prints a
Markdown table and with ``--update`` replaces the text between
``<!-- distill_table -->`` and ``<!-- /distill_table -->`` (``--marker``) in that file.
``--seeds K`` draws every set K times and reports the mean ± std of the distance.
``--student_etas 0,0.3`` also samples every student with stochastic DDIM steps
(``sampling.eta``; the students are trained for eta 0), one row per eta.
``--grid`` writes one row of samples per student, all from the same x_T. Sample
sets are cached in the workdirs' ``eval/distill_measure_*.npz`` (a rerun only rescores).
"""

import argparse
import re
import time

import jax
import numpy as np

from diffusion_jax import config_lib
from diffusion_jax import convert
from diffusion_jax import settings
from diffusion_jax import images as image_lib
from diffusion_jax.evaluation import guidance_sweep
from diffusion_jax.evaluation import nfe_curve
from diffusion_jax.evaluation import runtime as rt
from diffusion_jax.evaluation import samples

SEED = 0x5EED
COLUMNS = ('method', 'calls', 'num_samples', 'seeds', 'classifier_frechet_at_n',
           'classifier_frechet_std', 'classifier_frechet_real_at_n', 'classifier_kid', 'wall_s')


def draw(config, workdir, num, cache, seed=SEED):
  """(uint8 samples, wall seconds) of ``config``'s sampler on ``workdir``'s EMA parameters.

  Cached in the .npz file ``cache`` (with the wall time measured when sampling).
  """
  if rt.cached(cache):
    got = rt.load_npz(cache)
    if got['images'].shape[0] >= num:
      return got['images'][:num], float(got['wall_s'])
  model, schedule, _, _, params = rt.restore_for_eval(config, workdir)
  start = time.perf_counter()
  images = samples.generate_samples(
      settings.sampler_spec(config), settings.conditioning(config), schedule,
      rt.apply_fn_for(model), params, jax.random.PRNGKey(seed), num,
      image_shape=settings.image_shape(config), batch_size=config.sampling.batch_size,
      progress=False)
  wall = round(time.perf_counter() - start, 1)
  rt.save_npz(cache, images=images, wall_s=np.float64(wall))
  return images, wall


def solver_config(config, sampler: str, calls: int):
  """``config`` sampling with ``sampler`` (ddim, dpm_solver2, dpm_solver3) in ``calls`` model calls."""
  spec = nfe_curve.nfe_spec(settings.sampler_spec(config), sampler, calls)
  return config_lib.apply_overrides(config, {
      'sampling.sampler': spec.name, 'sampling.num_steps': spec.num_steps,
      'sampling.eta': spec.eta, 'sampling.solver_order': spec.order}, trained=True)


def quality_over_draws(tconfig, teacher: str, name: str, config, workdir: str, num: int,
                       seeds: int, cache_of):
  """``quality_row`` of ``seeds`` draws of ``num`` samples: x_T from SEED + k, cached at ``cache_of(k)``.

  Returns (the rows, the first draw's images, its sampling wall time).
  """
  draws = []
  for k in range(seeds):
    images, wall = draw(config, workdir, num, cache_of(k), SEED + k)
    draws.append(guidance_sweep.quality_row(tconfig, teacher, name, images))
    if k == 0:
      first, wall0 = images, wall
  return draws, first, wall0


def frechet_mean_std(draws: list) -> tuple:
  """Mean and standard deviation (ddof 1; 0 for one draw) of the draws' classifier Fréchet."""
  fd = [d['classifier_frechet_at_n'] for d in draws]
  return float(np.mean(fd)), float(np.std(fd, ddof=1)) if len(fd) > 1 else 0.0


def student_method(eta: float) -> str:
  """The table's method name of the students sampled with DDIM at ``eta`` (``distilled`` at 0)."""
  return 'distilled' if eta == 0 else f'distilled_eta{eta:g}'


def measure(teacher: str, num: int, steps: list, solver_calls: list, seeds: int = 1,
            solvers=('ddim', 'dpm_solver2', 'dpm_solver3'), solvers_at_steps: bool = True,
            student_etas=(0.0,)):
  """The rows of the table and the student sample sets (of the first seed).

  With ``seeds`` > 1 every set is drawn ``seeds`` times (x_T from seeds
  SEED, SEED + 1, ...; the same x_T for every method) and a row holds the mean
  distance and its standard deviation over the draws. The ``solvers`` run at
  ``solver_calls`` and (``solvers_at_steps``) at the students' ``steps``. Every
  student is sampled with DDIM at each of ``student_etas`` (its own config's
  sampler with ``sampling.eta`` replaced); the sets returned are those of the first.
  """
  tconfig = convert.read_config(teacher)
  tconfig.eval.num_fid_samples = num
  rows, student_sets = [], {}

  def score(method, calls, config, workdir, cache):
    draws, first, wall0 = quality_over_draws(
        tconfig, teacher, f'{method}_{calls}', config, workdir, num, seeds,
        lambda k: cache.replace('.npz', f'_s{k}.npz' if k else '.npz'))
    row = dict(draws[0], method=method, calls=calls, num_samples=len(first), wall_s=wall0,
               seeds=seeds)
    row['classifier_frechet_at_n'], row['classifier_frechet_std'] = frechet_mean_std(draws)
    rows.append(row)
    print(f'{method:14s} {calls:3d} calls: Fréchet {row["classifier_frechet_at_n"]:.2f} '
          f'± {row["classifier_frechet_std"]:.2f} over {seeds} draws (real digits '
          f'{row["classifier_frechet_real_at_n"]:.2f}), {wall0} s', flush=True)

    return first

  for eta in student_etas:
    for n in steps:
      student = f'{teacher}/distilled/steps_{n}'
      config = config_lib.apply_overrides(convert.read_config(student), {'sampling.eta': eta},
                                          trained=True)
      suffix = f'_eta{eta:g}' if eta else ''
      first = score(student_method(eta), n, config, student,
                    rt.join(student, 'eval', f'distill_measure_{num}{suffix}.npz'))
      student_sets.setdefault(n, first)
  for sampler in solvers:
    for n in sorted((set(steps) if solvers_at_steps else set()) | set(solver_calls)):
      score(sampler, n, solver_config(tconfig, sampler, n), teacher,
            rt.join(teacher, 'eval', f'distill_measure_{sampler}_{n}_{num}.npz'))
  return rows, student_sets


def markdown(rows: list) -> str:
  """Methods as rows, model calls as columns; Fréchet distance (wall seconds) per cell.

  Several draws: the mean ± the standard deviation over the draws (no wall time).
  """
  seeds = rows[0]['seeds']
  cell = ((lambda r: f'{r["classifier_frechet_at_n"]:.1f} ± {r["classifier_frechet_std"]:.1f}')
          if seeds > 1 else
          (lambda r: f'{r["classifier_frechet_at_n"]:.1f} ({r["wall_s"]:.0f} s)'))
  calls = sorted({r['calls'] for r in rows})
  lines = ['| method | ' + ' | '.join(f'{c} calls' for c in calls) + ' |',
           '|---|' + '---|' * len(calls)]
  names = {'distilled': 'distilled student (DDIM, trailing)', 'ddim': 'DDIM on the teacher',
           'dpm_solver2': 'DPM-Solver++ (2M) on the teacher',
           'dpm_solver3': 'DPM-Solver++ (3M) on the teacher'}
  for method in dict.fromkeys(r['method'] for r in rows):
    cells = {r['calls']: r for r in rows if r['method'] == method}
    if method.startswith('distilled_eta'):
      names[method] = f'distilled student (DDIM eta {method[len("distilled_eta"):]}, trailing)'
    lines.append(f'| {names.get(method, method)} | ' + ' | '.join(
        cell(cells[c]) if c in cells else '' for c in calls) + ' |')
  real = min(r['classifier_frechet_real_at_n'] for r in rows)
  n = rows[0]['num_samples']
  what = (f'the mean ± standard deviation over {seeds} draws of {n} samples (x_T from seeds '
          f'{SEED}..{SEED + seeds - 1}, the same for every method)' if seeds > 1 else
          f'{n} samples per cell, sampling wall time in brackets, compilation included')
  return ('\n'.join(lines) + f'\n\n(classifier Fréchet distance, {what}; real digits at {n}: '
          f'{real:.1f}.)')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--teacher', required=True)
  parser.add_argument('--num', type=int, default=500)
  parser.add_argument('--steps', default='1,2,4,8')
  parser.add_argument('--solver_calls', default='5,10')
  parser.add_argument('--solvers', default='ddim,dpm_solver2,dpm_solver3')
  parser.add_argument('--no_solvers_at_steps', action='store_true',
                      help='run the solvers at --solver_calls only')
  parser.add_argument('--seeds', type=int, default=1, help='draws per set (mean ± std)')
  parser.add_argument('--student_etas', default='0',
                      help='DDIM eta values to sample the students with (comma-separated)')
  parser.add_argument('--marker', default='distill_table',
                      help='--update replaces the text between <!-- MARKER --> and <!-- /MARKER -->')
  parser.add_argument('--update', default=None)
  parser.add_argument('--grid', default=None)
  args = parser.parse_args()
  parse = lambda s: [int(x) for x in s.split(',') if x.strip()]  # noqa: E731
  rows, sets = measure(args.teacher, args.num, parse(args.steps), parse(args.solver_calls),
                       args.seeds, [x for x in args.solvers.split(',') if x],
                       not args.no_solvers_at_steps,
                       [float(x) for x in args.student_etas.split(',') if x.strip()])
  rt.write_csv(rt.join(args.teacher, 'eval', f'{args.marker}.csv'), COLUMNS, rows)
  table = markdown(rows)
  print(table)
  if args.update:
    with open(args.update) as f:
      text = f.read()
    begin, end = f'<!-- {args.marker} -->', f'<!-- /{args.marker} -->'
    text = re.sub(re.escape(begin) + '.*?' + re.escape(end),
                  lambda _: f'{begin}\n{table}\n{end}', text, flags=re.S)
    with open(args.update, 'w') as f:
      f.write(text)
  if args.grid:
    per_row = 16
    grid = np.concatenate([sets[n][:per_row] for n in sorted(sets)])
    image_lib.save_grid(grid, args.grid, nrow=per_row)
    print(f'rows of {args.grid}: {", ".join(f"{n}-step" for n in sorted(sets))} students')


if __name__ == '__main__':
  main()
