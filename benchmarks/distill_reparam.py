r"""What a student loses by changing parameterisation alone: an eps teacher re-trained as v.

    python benchmarks/distill_reparam.py --teacher runs/digits_teacher \
        [--steps_per_round 400] [--lrs 1e-4,5e-4,1e-3] [--student_mean_type v|x0] \
        [--seeds 3] [--num 500]

The first round of ``--mode distill`` on an eps-prediction teacher (the project
default) has two jobs: take one step where its teacher takes K, and change what
the network outputs (``distill.student_mean_type``, v by default, because eps
cannot give x_0 at the first step). This script isolates the second job. It runs
one round with K = 1 (:func:`distill.run_round`): the student takes the
teacher's own ``distill.start_steps`` DDIM steps, so its target x~ is the
teacher's (clipped) x_0 prediction at each grid point, and a perfect student
samples exactly what its teacher samples. The round is trained for
``--steps_per_round`` optimiser steps at each of ``--lrs`` (the round's
cosine-annealed Adam rate), from the teacher's EMA parameters; every student is
then sampled with DDIM in ``start_steps`` steps on its trailing grid and scored
with the digits metric of ``distill_measure.py`` (``--seeds`` draws of
``--num`` samples, the same x_T for every row), beside the teacher's own DDIM
at the same steps. Students are written to
``TEACHER/distilled_reparam/<mean type>_lr_<lr>_steps_<S>/``
(complete workdirs; a rerun reuses a finished one) and the table is printed.
"""

import argparse
import functools

from diffusion_jax import checkpoint as ckpt
from diffusion_jax import config_lib
from diffusion_jax import convert
from diffusion_jax import distill
from diffusion_jax import host
from diffusion_jax import models
from diffusion_jax import train
from diffusion_jax import train_state
from diffusion_jax import workdir as workdir_lib
from diffusion_jax.evaluation import runtime as rt

import distill_measure   # benchmarks/ is on sys.path when run as a script


def reparam_round(tconfig, teacher: str, teacher_params, steps_per_round: int, lr: float,
                  mean_type: str):
  """(student config, its workdir): a K = 1 round at ``lr``, trained unless already finished.

  ``teacher_params()`` gives the teacher's EMA parameters (restored once, when first needed).
  """
  config = tconfig.copy_and_resolve_references()
  config.distill.steps_per_round, config.distill.lr = steps_per_round, lr
  config.distill.student_mean_type = mean_type
  cfg = distill.student_config(config, int(config.distill.start_steps))
  cfg.distill.teacher_steps = 1   # one teacher step per student step: only the output changes
  name = f'{mean_type}_lr_{lr:g}_steps_{steps_per_round}'
  out = workdir_lib.as_path(teacher) / 'distilled_reparam' / name
  done = ckpt.latest_step(out)
  if done is None or done < steps_per_round:
    _, timing = distill.run_round(tconfig, cfg, teacher_params(), out,
                                  label=f'reparameterise, lr {lr:g}')
    print(f'lr {lr:g}: {timing["steps"]} steps in {timing["wall_s"]} s -> {out}', flush=True)
  return cfg, str(out)


def score(tconfig, teacher, name, config, workdir, num, seeds):
  """(mean, std) of the classifier Fréchet distance over ``seeds`` draws of ``num`` samples."""
  draws, _, _ = distill_measure.quality_over_draws(
      tconfig, teacher, name, config, workdir, num, seeds,
      lambda k: rt.join(workdir, 'eval', f'reparam_{name}_{num}_s{k}.npz'))
  mean, std = distill_measure.frechet_mean_std(draws)
  print(f'{name}: Fréchet {mean:.2f} ± {std:.2f} over {seeds} draws', flush=True)
  return mean, std


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--teacher', required=True)
  parser.add_argument('--steps_per_round', type=int, default=400)
  parser.add_argument('--lrs', default='1e-4,5e-4,1e-3')
  parser.add_argument('--student_mean_type', default=None,
                      help='v or x0 (default: the config\'s distill.student_mean_type)')
  parser.add_argument('--num', type=int, default=500)
  parser.add_argument('--seeds', type=int, default=3)
  args = parser.parse_args()
  tconfig = convert.read_config(args.teacher)
  host.configure_cpu_devices(tconfig)
  tconfig.eval.num_fid_samples = args.num
  n = int(tconfig.distill.start_steps)
  ddim = config_lib.apply_overrides(distill_measure.solver_config(tconfig, 'ddim', n),
                                    {'sampling.skip_type': 'trailing'}, trained=True)
  rows = [(f'teacher ({tconfig.diffusion.mean_type}), DDIM',
           score(tconfig, args.teacher, 'teacher', ddim, args.teacher, args.num, args.seeds))]
  teacher_params = functools.cache(lambda: train_state.restore_params(
      tconfig, models.create_model(tconfig), args.teacher, train.make_mesh())[1])
  for lr in [float(x) for x in args.lrs.split(',') if x.strip()]:
    cfg, out = reparam_round(tconfig, args.teacher, teacher_params, args.steps_per_round, lr,
                             args.student_mean_type or tconfig.distill.student_mean_type)
    rows.append((f'{cfg.diffusion.mean_type}-student, lr {lr:g}, {args.steps_per_round} steps',
                 score(tconfig, args.teacher, 'student', cfg, out, args.num, args.seeds)))
  print(f'\n| model ({n} DDIM steps) | classifier Fréchet distance |\n|---|---|')
  for name, (mean, std) in rows:
    print(f'| {name} | {mean:.1f} ± {std:.1f} |')
  print(f'\n({args.seeds} draws of {args.num} samples, x_T from seeds {distill_measure.SEED}.., '
        'the same for every row.)')


if __name__ == '__main__':
  main()
