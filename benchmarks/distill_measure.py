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
``TEACHER/eval``). Writes ``TEACHER/eval/distill_measure.csv``, prints a
Markdown table and with ``--update`` replaces the text between
``<!-- distill_table -->`` and ``<!-- /distill_table -->`` in that file.
``--grid`` writes one row of samples per student, all from the same x_T. Sample
sets are cached in the workdirs' ``eval/distill_measure_*.npz`` (a rerun only rescores).
"""

import argparse
import re
import time

import jax
import numpy as np

from diffusion_jax import convert
from diffusion_jax import images as image_lib
from diffusion_jax.evaluation import guidance_sweep
from diffusion_jax.evaluation import nfe_curve
from diffusion_jax.evaluation import runtime as rt
from diffusion_jax.evaluation import samples

BEGIN, END = '<!-- distill_table -->', '<!-- /distill_table -->'
SEED = 0x5EED
COLUMNS = ('method', 'calls', 'num_samples', 'classifier_frechet_at_n',
           'classifier_frechet_real_at_n', 'classifier_kid', 'wall_s')


def draw(config, workdir, num, cache):
  """(uint8 samples, wall seconds) of ``config``'s sampler on ``workdir``'s EMA parameters.

  Cached in the .npz file ``cache`` (with the wall time measured when sampling).
  """
  if rt.cached(cache):
    got = rt.load_npz(cache)
    if got['images'].shape[0] >= num:
      return got['images'][:num], float(got['wall_s'])
  model, schedule, _, _, params = rt.restore_for_eval(config, workdir)
  start = time.perf_counter()
  images = samples.generate_samples(config, schedule, rt.apply_fn_for(model), params,
                                    jax.random.PRNGKey(SEED), num, progress=False)
  wall = round(time.perf_counter() - start, 1)
  rt.save_npz(cache, images=images, wall_s=np.float64(wall))
  return images, wall


def measure(teacher: str, num: int, steps: list, solver_calls: list):
  """The rows of the table and the student sample sets."""
  tconfig = convert.read_config(teacher)
  tconfig.eval.num_fid_samples = num
  rows, student_sets = [], {}

  def score(method, calls, images, wall):
    row = dict(method=method, calls=calls, num_samples=len(images), wall_s=wall,
               **guidance_sweep.quality_row(tconfig, teacher, f'{method}_{calls}', images))
    rows.append(row)
    print(f'{method:14s} {calls:3d} calls: Fréchet {row["classifier_frechet_at_n"]:.2f} '
          f'(real digits {row["classifier_frechet_real_at_n"]:.2f}), {wall} s', flush=True)

  for n in steps:
    student = f'{teacher}/distilled/steps_{n}'
    images, wall = draw(convert.read_config(student), student, num,
                        rt.join(student, 'eval', f'distill_measure_{num}.npz'))
    student_sets[n] = images
    score('distilled', n, images, wall)
  for sampler in ('ddim', 'dpm_solver2', 'dpm_solver3'):
    for n in sorted(set(steps) | set(solver_calls)):
      images, wall = draw(nfe_curve.sampler_config(tconfig, sampler, n), teacher, num,
                          rt.join(teacher, 'eval', f'distill_measure_{sampler}_{n}_{num}.npz'))
      score(sampler, n, images, wall)
  return rows, student_sets


def markdown(rows: list) -> str:
  """Methods as rows, model calls as columns; Fréchet distance (wall seconds) per cell."""
  calls = sorted({r['calls'] for r in rows})
  lines = ['| method | ' + ' | '.join(f'{c} calls' for c in calls) + ' |',
           '|---|' + '---|' * len(calls)]
  names = {'distilled': 'distilled student (DDIM, trailing)', 'ddim': 'DDIM on the teacher',
           'dpm_solver2': 'DPM-Solver++ (2M) on the teacher',
           'dpm_solver3': 'DPM-Solver++ (3M) on the teacher'}
  for method in dict.fromkeys(r['method'] for r in rows):
    cells = {r['calls']: r for r in rows if r['method'] == method}
    lines.append(f'| {names.get(method, method)} | ' + ' | '.join(
        f'{cells[c]["classifier_frechet_at_n"]:.1f} ({cells[c]["wall_s"]:.0f} s)'
        if c in cells else '' for c in calls) + ' |')
  real = min(r['classifier_frechet_real_at_n'] for r in rows)
  n = rows[0]['num_samples']
  return ('\n'.join(lines) + f'\n\n(classifier Fréchet distance of {n} samples per cell, '
          f'sampling wall time in brackets, compilation included; real digits at {n}: '
          f'{real:.1f}.)')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--teacher', required=True)
  parser.add_argument('--num', type=int, default=500)
  parser.add_argument('--steps', default='1,2,4,8')
  parser.add_argument('--solver_calls', default='5,10')
  parser.add_argument('--update', default=None)
  parser.add_argument('--grid', default=None)
  args = parser.parse_args()
  parse = lambda s: [int(x) for x in s.split(',') if x.strip()]  # noqa: E731
  rows, sets = measure(args.teacher, args.num, parse(args.steps), parse(args.solver_calls))
  rt.write_csv(rt.join(args.teacher, 'eval', 'distill_measure.csv'), COLUMNS, rows)
  table = markdown(rows)
  print(table)
  if args.update:
    with open(args.update) as f:
      text = f.read()
    text = re.sub(re.escape(BEGIN) + '.*?' + re.escape(END),
                  lambda _: f'{BEGIN}\n{table}\n{END}', text, flags=re.S)
    with open(args.update, 'w') as f:
      f.write(text)
  if args.grid:
    per_row = 16
    grid = np.concatenate([sets[n][:per_row] for n in sorted(sets)])
    image_lib.save_grid(grid, args.grid, nrow=per_row)
    print(f'rows of {args.grid}: {", ".join(f"{n}-step" for n in sorted(sets))} students')


if __name__ == '__main__':
  main()
