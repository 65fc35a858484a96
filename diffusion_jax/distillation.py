"""Progressive distillation's math (Salimans & Ho 2022): the grid, the target, the weighting, the loss.

One round trains a student to take ONE DDIM step (eta = 0) where its teacher
takes TWO. With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and
z_t = alpha_t x + sigma_t eps, the teacher goes z_t -> z_t' -> z_t'' (two DDIM
steps, DDIM eq. 12 with eta = 0) and the student's x_0 prediction must be the
x~ whose single DDIM step t -> t'' lands on z_t'' (Algorithm 2):

    x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t),

at the last step (abar_t'' = 1, sigma_t'' = 0) x~ = z_t''. The loss is the
x_0-space squared error weighted by the truncated SNR, max(alpha_t^2 / sigma_t^2, 1)
(§4, "truncated SNR weighting").

Time grid: the 2N teacher steps run on :func:`timesteps.trailing_timesteps`
(the grid that starts at T-1, where abar_{T-1} is the smallest abar the
schedule has), and the student's N steps are every other point of it, so the
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
  """The student's N steps of one round, each made of two teacher steps t -> t' -> t''.

  Entry i (i = 0 is the first, noisiest step): ``t`` and ``t_mid`` are zero-based
  timesteps (int32 [N]); ``abar``, ``abar_mid``, ``abar_end`` are abar at t, t'
  and t'' (abar_end = 1 at the last step), float [N].
  """
  t: jax.Array
  t_mid: jax.Array
  abar: jax.Array
  abar_mid: jax.Array
  abar_end: jax.Array


def round_grid(s: Schedule, student_steps: int) -> RoundGrid:
  """The grid of a round whose student takes ``student_steps`` steps (teacher: twice as many).

  The teacher's 2N-step trailing grid, descending, is tau_0 = T-1 > tau_1 > ...;
  student step i goes from tau_{2i} via tau_{2i+1} to tau_{2i+2} (to abar = 1 after
  the last point). Needs a concrete (non-traced) schedule.
  """
  n = int(student_steps)
  desc = timesteps_lib.trailing_timesteps(s.num_timesteps, 2 * n)[::-1]
  abar = np.asarray(s.alphas_cumprod, np.float64)
  abar_ext = np.append(abar[desc], 1.0)     # abar after the last teacher step: 1
  dtype = s.alphas_cumprod.dtype
  return RoundGrid(t=jnp.asarray(desc[0::2], jnp.int32), t_mid=jnp.asarray(desc[1::2], jnp.int32),
                   abar=jnp.asarray(abar_ext[0:-1:2], dtype),
                   abar_mid=jnp.asarray(abar_ext[1::2], dtype),
                   abar_end=jnp.asarray(abar_ext[2::2], dtype))


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


def teacher_two_steps(s: Schedule, teacher_fn: ModelFn, z, grid: RoundGrid, i, *,
                      mean_type: str, clip_denoised: bool):
  """z_t'' from z_t: the teacher's two DDIM steps t -> t' -> t'' of student steps ``i`` [B]."""
  z_mid = ddim_eta0(s, teacher_fn, z, grid.t[i], grid.abar[i], grid.abar_mid[i],
                    mean_type=mean_type, clip_denoised=clip_denoised)
  return ddim_eta0(s, teacher_fn, z_mid, grid.t_mid[i], grid.abar_mid[i], grid.abar_end[i],
                   mean_type=mean_type, clip_denoised=clip_denoised)


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


def student_x0(s: Schedule, student_fn: ModelFn, z, t, *, mean_type: str):
  """The student's x_0 prediction at z_t (its output read as ``mean_type``, x0 or v)."""
  return diffusion.predict_x0(s, student_fn(z, t).astype(z.dtype), z, t, mean_type=mean_type)


def student_loss(s: Schedule, student_fn: ModelFn, teacher_fn: ModelFn, x, noise, i,
                 grid: RoundGrid, *, teacher_mean_type: str, student_mean_type: str,
                 clip_denoised: bool):
  """Per-example loss [B] of one round (Algorithm 2): max(SNR_t, 1) ||x~ - x^_student(z_t)||^2 / D.

  ``x`` data [B, ...], ``noise`` eps ~ N(0, I) of x's shape, ``i`` int32 [B] the
  student steps (uniform over the N of ``grid``). The target x~ is a constant
  (no gradient flows into the teacher).

  Returns:
    dict(loss [B], mse [B] (the unweighted x_0 error), target [B, ...]).
  """
  abar = grid.abar[i]
  z = _bcast(jnp.sqrt(abar), x) * x + _bcast(jnp.sqrt(1.0 - abar), x) * noise
  z_end = teacher_two_steps(s, teacher_fn, z, grid, i, mean_type=teacher_mean_type,
                            clip_denoised=clip_denoised)
  target = jax.lax.stop_gradient(distillation_target(z, z_end, abar, grid.abar_end[i]))
  x_hat = student_x0(s, student_fn, z, grid.t[i], mean_type=student_mean_type)
  mse = diffusion.mean_flat(jnp.square(x_hat - target))
  return dict(loss=truncated_snr_weight(abar) * mse, mse=mse, target=target)


def round_step_counts(start_steps: int, final_steps: int) -> list:
  """The students' step counts: start/2, start/4, ..., final (e.g. 64, 1 -> [32, 16, 8, 4, 2, 1])."""
  out, n = [], int(start_steps)
  while n > int(final_steps):
    n //= 2
    out.append(n)
  return out
