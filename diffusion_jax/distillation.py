"""Progressive distillation's math (Salimans & Ho 2022): the grid, the target, the weighting, the loss.

One round trains a student to take ONE DDIM step (eta = 0) where its teacher
takes TWO. With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and
z_t = alpha_t x + sigma_t eps, the teacher goes z_t -> z_t' -> z_t'' (two DDIM
steps, DDIM eq. 12 with eta = 0) and the student's x_0 prediction must be the
x~ whose single DDIM step t -> t'' lands on z_t'' (Algorithm 2):

    x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t),

at the last step (abar_t'' = 1, sigma_t'' = 0) x~ = z_t''. The loss is the
x_0-space squared error weighted by the truncated SNR, max(alpha_t^2 / sigma_t^2, 1)
(§4, "truncated SNR weighting"), or by the square of the factor that carries an
x_0 error to where the student's step lands, so that the loss is the squared
distance between the student's landing point and the teacher's (``'landing'``).

The same target serves a round whose teacher takes K > 2 steps per student step
(z_t'' is then the end of K DDIM steps): K = 4 quarters the steps per round, so
64 -> 1 takes three rounds instead of six.

Time grid: the K N teacher steps run on :func:`timesteps.trailing_timesteps`
(the grid that starts at T-1, where abar_{T-1} is the smallest abar the
schedule has), and the student's N steps are every K-th point of it, so the
student samples with ``ddim_sample_loop(..., num_steps=N, skip_type='trailing')``.
No config here: every function takes arrays and plain values.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion
from diffusion_jax import timesteps as timesteps_lib
from diffusion_jax.sampling import ddim_step
from diffusion_jax.schedule import Schedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


class RoundGrid(NamedTuple):
  """The student's N steps of one round, each made of K teacher steps t -> ... -> t_end.

  Entry i (i = 0 is the first, noisiest step): ``t`` the student's zero-based
  timestep (int32 [N]); ``t_path`` the K teacher timesteps of that step (int32
  [N, K], ``t_path[:, 0] == t``); ``abar_path`` abar at those K points and at the
  step's end (float [N, K + 1], the end is 1 after the last step); ``abar`` and
  ``abar_end`` are its first and last columns. K = 2 is the paper's round.
  """
  t: jax.Array
  t_path: jax.Array
  abar_path: jax.Array

  @property
  def abar(self) -> jax.Array:
    return self.abar_path[:, 0]

  @property
  def abar_end(self) -> jax.Array:
    return self.abar_path[:, -1]

  @property
  def teacher_steps(self) -> int:
    return int(self.t_path.shape[1])


def round_grid(s: Schedule, student_steps: int, teacher_steps: int = 2) -> RoundGrid:
  """The grid of a round whose student takes ``student_steps`` steps, its teacher K times as many.

  The teacher's K N-step trailing grid, descending, is tau_0 = T-1 > tau_1 > ...;
  student step i goes from tau_{K i} through tau_{K i + 1}, ... to tau_{K i + K}
  (to abar = 1 after the last point). Needs a concrete (non-traced) schedule.
  """
  n, k = int(student_steps), int(teacher_steps)
  desc = timesteps_lib.trailing_timesteps(s.num_timesteps, k * n)[::-1]
  abar = np.asarray(s.alphas_cumprod, np.float64)
  abar_ext = np.append(abar[desc], 1.0)     # abar after the last teacher step: 1
  path = np.arange(n)[:, None] * k + np.arange(k + 1)[None, :]    # [N, K + 1] indices
  dtype = s.alphas_cumprod.dtype
  return RoundGrid(t=jnp.asarray(desc[0::k], jnp.int32),
                   t_path=jnp.asarray(desc[path[:, :k]], jnp.int32),
                   abar_path=jnp.asarray(abar_ext[path], dtype))


def _bcast(a, x):
  """A per-example vector [B] shaped to broadcast against x [B, ...]."""
  return jnp.reshape(a, (-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


def ddim_eta0(s: Schedule, model_fn: ModelFn, z, t, abar, abar_to, *, mean_type: str,
              clip_denoised: bool):
  """One deterministic DDIM step (eq. 12, eta = 0) from z at t (abar) to abar_to, per example.

  Exactly :func:`sampling.ddim_step` (so also its clipping of the x_0 prediction),
  with per-example ``abar`` [B] and ``abar_to`` [B].
  """
  zeros = jnp.zeros_like(z)
  z_to, _ = ddim_step(s, model_fn(z, t).astype(z.dtype), z, t, _bcast(abar, z),
                      _bcast(abar_to, z), 0.0, zeros, mean_type=mean_type,
                      clip_denoised=clip_denoised)
  return z_to


def teacher_steps(s: Schedule, teacher_fn: ModelFn, z, grid: RoundGrid, i, *,
                  mean_type: str, clip_denoised: bool):
  """z at the end of student steps ``i`` [B]: the teacher's K DDIM steps along ``grid.t_path[i]``."""
  for j in range(grid.teacher_steps):
    z = ddim_eta0(s, teacher_fn, z, grid.t_path[i, j], grid.abar_path[i, j],
                  grid.abar_path[i, j + 1], mean_type=mean_type, clip_denoised=clip_denoised)
  return z


def distillation_target(z, z_end, abar, abar_end):
  """x~ of Algorithm 2: the x_0 whose one DDIM step z_t -> abar_end lands on z_end.

  x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t);
  with abar_end = 1 (sigma_t'' = 0) this is z_t'' itself. ``abar``, ``abar_end`` [B].
  """
  abar, abar_end = _bcast(abar, z), _bcast(abar_end, z)
  ratio = jnp.sqrt(1.0 - abar_end) / jnp.sqrt(1.0 - abar)
  return (z_end - ratio * z) / (jnp.sqrt(abar_end) - ratio * jnp.sqrt(abar))


def truncated_snr_weight(abar):
  """max(SNR, 1) = max(abar / (1 - abar), 1): the x_0-space weight of §4 (per example)."""
  return jnp.maximum(abar / (1.0 - abar), 1.0)


def landing_weight(abar, abar_end):
  """(alpha_t'' - (sigma_t'' / sigma_t) alpha_t)^2: the x_0-space weight of the landing error.

  A student whose x_0 prediction misses x~ by d lands its DDIM step at
  z_t'' + (alpha_t'' - (sigma_t''/sigma_t) alpha_t) d, so this weight makes the
  loss ||z_t''(student) - z_t''(teacher)||^2, the error where the step lands.
  It is 1 at the last step (abar_t'' = 1) and small at the noisiest ones,
  whose x_0 errors are damped on the way to the sample. Per example, [B].
  """
  ratio = jnp.sqrt(1.0 - abar_end) / jnp.sqrt(1.0 - abar)
  return jnp.square(jnp.sqrt(abar_end) - ratio * jnp.sqrt(abar))


LOSS_WEIGHTINGS = ('landing', 'truncated_snr')


def step_weight(weighting: str, abar, abar_end):
  """The per-example x_0-space loss weight of ``weighting`` (:data:`LOSS_WEIGHTINGS`)."""
  if weighting == 'truncated_snr':
    return truncated_snr_weight(abar)
  if weighting == 'landing':
    return landing_weight(abar, abar_end)
  raise ValueError(f'weighting must be one of {", ".join(LOSS_WEIGHTINGS)}, got {weighting!r}.')


def student_x0(s: Schedule, student_fn: ModelFn, z, t, *, mean_type: str):
  """The student's x_0 prediction at z_t (its output read as ``mean_type``, x0 or v)."""
  return diffusion.predict_x0(s, student_fn(z, t).astype(z.dtype), z, t, mean_type=mean_type)


def student_loss(s: Schedule, student_fn: ModelFn, teacher_fn: ModelFn, x, noise, i,
                 grid: RoundGrid, *, teacher_mean_type: str, student_mean_type: str,
                 clip_denoised: bool, weighting: str = 'truncated_snr'):
  """Per-example loss [B] of one round (Algorithm 2): w ||x~ - x^_student(z_t)||^2 / D.

  w is :func:`step_weight` of ``weighting``: the paper's max(SNR_t, 1)
  (``'truncated_snr'``) or :func:`landing_weight` (``'landing'``).

  ``x`` data [B, ...], ``noise`` eps ~ N(0, I) of x's shape, ``i`` int32 [B] the
  student steps (uniform over the N of ``grid``). The target x~ is a constant
  (no gradient flows into the teacher).

  Returns:
    dict(loss [B], mse [B] (the unweighted x_0 error), target [B, ...]).
  """
  abar = grid.abar[i]
  z = _bcast(jnp.sqrt(abar), x) * x + _bcast(jnp.sqrt(1.0 - abar), x) * noise
  z_end = teacher_steps(s, teacher_fn, z, grid, i, mean_type=teacher_mean_type,
                        clip_denoised=clip_denoised)
  return step_loss(s, student_fn, z, z_end, i, grid, student_mean_type=student_mean_type,
                   weighting=weighting)


def step_loss(s: Schedule, student_fn: ModelFn, z, z_end, i, grid: RoundGrid, *,
              student_mean_type: str, weighting: str = 'truncated_snr'):
  """Per-example loss [B] of student steps ``i`` from z_t [B, ...] whose target lands on z_end.

  Algorithm 2's regression given the teacher's end point z_t'' = ``z_end``:
  w ||x~ - x^_student(z_t)||^2 / D with x~ = :func:`distillation_target` (a
  constant: no gradient flows into z_end) and w = :func:`step_weight`.
  Returns dict(loss [B], mse [B] (the unweighted x_0 error), target [B, ...]).
  """
  abar, abar_end = grid.abar[i], grid.abar_end[i]
  target = jax.lax.stop_gradient(distillation_target(z, z_end, abar, abar_end))
  x_hat = student_x0(s, student_fn, z, grid.t[i], mean_type=student_mean_type)
  mse = diffusion.mean_flat(jnp.square(x_hat - target))
  return dict(loss=step_weight(weighting, abar, abar_end) * mse, mse=mse, target=target)


def round_step_counts(start_steps: int, final_steps: int, teacher_steps: int = 2) -> list:
  """The students' step counts: start/K, start/K^2, ..., final.

  K = 2: 64, 1 -> [32, 16, 8, 4, 2, 1]; K = 4: 64, 1 -> [16, 4, 1].
  """
  out, n = [], int(start_steps)
  while n > int(final_steps):
    n //= int(teacher_steps)
    out.append(n)
  return out
