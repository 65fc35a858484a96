"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models").

The probability-flow ODE of a DDPM (:mod:`diffusion_jax.sde`), written for the
model's x_0 prediction (data prediction) in the log-SNR lambda = log(alpha /
sigma), has an exact linear part; the multistep solver integrates it exactly
and approximates the data prediction by a polynomial through the last one, two
or three model outputs (orders 1-3). Order 1 is DDIM with eta = 0.
:func:`sampling.dpm_solver_sample_loop` runs the chain from x_T on the DDIM grid.
"""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion
from diffusion_jax.diffusion import ModelFn
from diffusion_jax.schedule import Schedule
from diffusion_jax.timesteps import batch_t, check_int


def dpm_solver_orders(num_steps: int, order: int, lower_order_final: bool = True) -> np.ndarray:
  """The order used at each of the ``num_steps`` updates (first update first; NumPy int array).

  Multistep warm-up: update j can use at most j + 1 model outputs, so
  ``min(order, j + 1)``. The last update goes to abar = 1, where the
  log-SNR lambda is infinite and only the first-order (exponential-integrator)
  update stays finite: it is always 1. With ``lower_order_final`` (Lu et al.
  2022's reference code and diffusers drop the order at the final steps when
  steps are few) every update into the last two grid points has order 1 and
  each earlier one at most the number of updates left minus one: the step in
  lambda into the smallest timestep is the largest of the chain (on the
  uniform 10-step grid of the linear schedule, 3.5 against 0.75 for the
  step before it), and extrapolating the data prediction across it is worse
  than not (measured: docs/fast_sampling.md).
  """
  n = check_int('num_steps', num_steps, 1, 1 << 30)
  k = check_int('order', order, 1, 3)
  j = np.arange(n)
  orders = np.minimum(k, j + 1)
  if lower_order_final:
    orders = np.minimum(orders, np.maximum(n - 1 - j, 1))
  orders[-1] = 1
  return orders.astype(np.int32)


def _lambda_table(s: Schedule, seq):
  """alpha, sigma and lambda = log(alpha / sigma) at ``seq`` (descending) and at the final abar = 1.

  Returns ``(alpha_next, sigma_ratio, h, h_prev, h_prev2)`` per update (float32,
  the update from seq[i] to seq[i+1], the last one to abar = 1): h the step in
  lambda (1 where infinite: the last update only uses ``sigma_ratio`` = 0 and
  alpha_next = 1), h_prev / h_prev2 those of the one and two updates before (1
  where undefined; the orders never use them there).
  """
  abar = s.alphas_cumprod[jnp.asarray(seq, jnp.int32)]
  alpha, sigma = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
  lam = jnp.log(alpha) - jnp.log(sigma)
  one = jnp.ones((1,), abar.dtype)
  alpha_next = jnp.concatenate([alpha[1:], one])
  sigma_ratio = jnp.concatenate([sigma[1:] / sigma[:-1], 0.0 * one])
  h = jnp.concatenate([lam[1:] - lam[:-1], one])
  h_prev = jnp.concatenate([one, h[:-1]])
  h_prev2 = jnp.concatenate([one, h_prev[:-1]])
  return alpha_next, sigma_ratio, h, h_prev, h_prev2


def dpm_solver_update(x, m0, m1, m2, order, alpha_next, sigma_ratio, h, h_prev, h_prev2):
  """One DPM-Solver++ multistep update (Lu et al. 2022, "DPM-Solver++", Algorithm 2 and App. B).

  With the data predictions m0, m1, m2 at the current and the two previous
  grid points, phi_1 = expm1(-h), r0 = h_prev / h and r1 = h_prev2 / h:

  - order 1 (DDIM, eta = 0): x' = (sigma'/sigma) x - alpha' phi_1 m0;
  - order 2 (2M): D1 = (m0 - m1) / r0, x' = order-1 update - alpha' phi_1 D1 / 2;
  - order 3 (3M): D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1,
    D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1),
    x' = (sigma'/sigma) x - alpha' phi_1 m0 + alpha' phi_2 D1 - alpha' phi_3 D2,
    phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 1/2.

  The update to abar = 1 (sigma' = 0, h infinite) is order 1 and returns m0.
  A repeated grid point (h = 0, e.g. the quadratic grid's first entries) is an
  exact no-op, and the update after it lowers its order so as never to divide
  by a zero step.
  """
  order = jnp.where(h_prev == 0, 1, jnp.where(h_prev2 == 0, jnp.minimum(order, 2), order))
  h = jnp.where(h == 0, 1.0, h)   # the no-op's h: any finite value (selected away below)
  phi1 = jnp.where(sigma_ratio == 0, -1.0, jnp.expm1(-h))
  first = sigma_ratio * x - alpha_next * phi1 * m0
  r0, r1 = h_prev / h, h_prev2 / h
  d1_0 = (m0 - m1) / r0
  second = first - 0.5 * alpha_next * phi1 * d1_0
  d1_1 = (m1 - m2) / r1
  d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
  d2 = (d1_0 - d1_1) / (r0 + r1)
  phi2 = phi1 / h + 1.0
  phi3 = phi2 / h - 0.5
  third = first + alpha_next * phi2 * d1 - alpha_next * phi3 * d2
  new = jnp.where(order == 1, first, jnp.where(order == 2, second, third))
  return jnp.where(sigma_ratio == 1, x, new).astype(x.dtype)


def dpm_solver_chain(s: Schedule, model_fn: ModelFn, x, timesteps, *, order: int = 2,
                     mean_type: str = 'eps', clip_denoised: bool = False,
                     lower_order_final: bool = True, return_path: bool = False):
  """DPM-Solver++ from x at ``max(timesteps)`` down the ascending ``timesteps`` to abar = 1.

  One ``lax.scan``; exactly ``len(timesteps)`` model calls, one per grid
  point. ``timesteps`` is a concrete ascending sequence of zero-based indices
  (e.g. :func:`timesteps.ddim_timesteps`, or a prefix of it for SDEdit).
  With ``return_path`` it returns the state after every update instead,
  [len(timesteps), ...] (the last one the sample).
  """
  seq = np.asarray(timesteps, np.int64)[::-1]
  orders = jnp.asarray(dpm_solver_orders(len(seq), order, lower_order_final))
  table = _lambda_table(s, seq)

  def body(carry, inp):
    x, m1, m2 = carry
    t_scalar, step_order, *coefs = inp
    t = batch_t(t_scalar, x)
    m0 = diffusion.predict_x0(s, model_fn(x, t).astype(x.dtype), x, t, mean_type=mean_type)
    if clip_denoised:
      m0 = jnp.clip(m0, -1.0, 1.0)
    x = dpm_solver_update(x, m0, m1, m2, step_order, *coefs)
    return (x, m0, m1), (x if return_path else None)

  zeros = jnp.zeros_like(x)
  (x, _, _), path = jax.lax.scan(body, (x, zeros, zeros),
                                 (jnp.asarray(seq, jnp.int32), orders) + tuple(table))
  return path if return_path else x
