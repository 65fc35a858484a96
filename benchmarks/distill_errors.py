"""Where a distilled student's sample error comes from, step by step.

    python benchmarks/distill_errors.py --teacher runs/digits_teacher \
        --student runs/digits_teacher/distilled/steps_4 [--num 1024] [--start_steps 64]

The reference is the teacher's own path: DDIM (eta 0) in ``--start_steps``
steps on the trailing grid from ``--num`` fresh x_T, z_0 = x_T, z_1, ..., z_N
at the N-step student's grid points (z_N the sample). For each student step i
it prints

- the *local* error: the mean squared distance between the student's one DDIM
  step from the teacher's z_i and the teacher's z_{i+1};
- the *final* error of the student's rollout that starts from the teacher's
  z_i: steps i..N-1 by the student, against the teacher's sample z_N.

The final error from z_0 is the student's whole sampling error; the increase
from z_{i+1} to z_i is what step i adds to it, its own local error as the
later steps carry it on. Set against the loss weight of each step
(``distillation.step_weight``), it shows which steps a weighting teaches.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import convert
from diffusion_jax import distill
from diffusion_jax import distillation as dl
from diffusion_jax import models
from diffusion_jax import schedule as schedule_lib
from diffusion_jax import train
from diffusion_jax import train_state

SEED = 0xE770


def step_fn(config, model, params, grid):
  """``(z, i) -> z'``: one DDIM step (eta 0) of a model along ``grid``'s student step i."""
  s = schedule_lib.schedule_from_config(config)
  fn = distill.teacher_model_fn(config, model, params, None)

  def step(z, i):
    full = lambda a: jnp.full((z.shape[0],), a[i])
    return dl.ddim_eta0(s, fn, z, full(grid.t), full(grid.abar), full(grid.abar_end),
                        mean_type=config.diffusion.mean_type,
                        clip_denoised=bool(config.diffusion.clip_denoised))
  jitted = jax.jit(step)
  return lambda z, i: jitted(z, jnp.int32(i))


def teacher_path(config, model, params, steps: int, start_steps: int, x_T):
  """The teacher's DDIM states at the N-step grid's points: [N + 1, B, ...] (z_0 = x_T)."""
  s = schedule_lib.schedule_from_config(config)
  k = start_steps // steps
  one = step_fn(config, model, params, dl.round_grid(s, start_steps, 1))
  states, z = [x_T], x_T
  for j in range(start_steps):
    z = one(z, j)
    if (j + 1) % k == 0:
      states.append(z)
  return states


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--teacher', required=True, help='the teacher workdir')
  p.add_argument('--student', required=True, help='a student workdir (DIR/distilled/steps_<N>)')
  p.add_argument('--num', type=int, default=1024, help='paths (fresh x_T)')
  p.add_argument('--start_steps', type=int, default=64, help="the teacher's DDIM steps")
  args = p.parse_args()
  mesh = train.make_mesh()
  tconfig = convert.read_config(args.teacher)
  sconfig = convert.read_config(args.student)
  model = models.create_model(tconfig)
  _, tparams = train_state.restore_params(tconfig, model, args.teacher, mesh)
  _, sparams = train_state.restore_params(sconfig, model, args.student, mesh)
  n = int(sconfig.sampling.num_steps)
  shape = (args.num,) + train.image_shape(tconfig)
  x_T = jax.random.normal(jax.random.PRNGKey(SEED), shape)
  ref = teacher_path(tconfig, model, tparams, n, args.start_steps, x_T)
  s = schedule_lib.schedule_from_config(sconfig)
  grid = dl.round_grid(s, n, args.start_steps // n)
  student = step_fn(sconfig, model, sparams, grid)
  mse = lambda a, b: float(jnp.mean(jnp.square(a - b)))
  local, final = [], []
  for i in range(n):
    z = ref[i]
    for j in range(i, n):
      z = student(z, j)
      if j == i:   # the rollout's first step is the local one
        local.append(mse(z, ref[i + 1]))
    final.append(mse(z, ref[n]))
  weights = {w: np.asarray(dl.step_weight(w, grid.abar, grid.abar_end))
             for w in dl.LOSS_WEIGHTINGS}
  print(f'{args.student}: {n} steps, {args.num} paths of the teacher\'s {args.start_steps} '
        'DDIM steps')
  print('| step | t | local error | final error from the teacher\'s z_i | added by the step | '
        + ' | '.join(f'weight `{w}`' for w in weights) + ' |')
  print('|---' * (5 + len(weights)) + '|')
  for i in range(n):
    added = final[i] - (final[i + 1] if i + 1 < n else 0.0)
    print(f'| {i} | {int(grid.t[i])} | {local[i]:.5f} | {final[i]:.5f} | {added:.5f} | '
          + ' | '.join(f'{w[i]:.4f}' for w in weights.values()) + ' |')


if __name__ == '__main__':
  main()
