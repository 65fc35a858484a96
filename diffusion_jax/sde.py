"""The continuous-time view of a trained DDPM: the VP-SDE, its probability-flow ODE, likelihoods.

Song et al. 2021, "Score-Based Generative Modeling through Stochastic
Differential Equations" (score SDE): DDPM is a discretisation of the
variance-preserving SDE dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw (eq. 11),
whose marginals are q(x_t | x_0) = N(sqrt(abar(t)) x_0, (1 - abar(t)) I) when
beta(t) = -d log abar / dt. The same marginals are transported by the
probability-flow ODE (eq. 13)

    dx/dt = -1/2 beta(t) [x + grad_x log q_t(x)]
          = -1/2 beta(t) [x - eps_hat(x, t) / sqrt(1 - abar(t))],

the score being -eps_hat / sqrt(1 - abar) (DDPM eq. 12 / §3.2;
:func:`diffusion.score_from_model_output`). Solving it backwards samples
(:func:`probability_flow_sample`), forwards encodes (:func:`ode_encode`), and
the instantaneous change of variables (Chen et al. 2018; score SDE
Appendix D.2) gives exact log-likelihoods (:func:`ode_log_likelihood`).

Time is the trained model's own index: a real t in [0, T-1] with log abar
linear between the integer indices of the discrete schedule, so abar(t) equals
``alphas_cumprod[t]`` at integer t and beta(t) = -log(1 - beta_{i+1}) on
[i, i+1) (zero-based ``betas``) is piecewise constant. The model is called with
float32 t in index units (the U-Net's sinusoidal embedding takes real t).
The ODE is solved with diffrax (Tsit5, adaptive steps from a PID controller)
inside whatever ``jit`` the caller uses; every solver returns its number of
model calls.
"""

from __future__ import annotations

import math
from typing import Optional

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import MEAN_TYPES, ModelFn
from diffusion_jax.schedule import Schedule

__all__ = [
    'log_alpha_bar', 'alpha_bar', 'beta', 'eps_from_output', 'probability_flow_drift',
    'probability_flow_sample', 'ode_encode', 'ode_log_likelihood', 'dequantize',
    'bpd_from_log_p',
]

# Tsit5 is a 7-stage first-same-as-last Runge-Kutta pair: every step (accepted
# or rejected) costs 6 new evaluations, and the solve one more at its start.
_EVALS_PER_STEP = 6
DEFAULT_MAX_STEPS = 4096


# --- the schedule in continuous time ---------------------------------------------------


def _log_abar_table(s: Schedule) -> jnp.ndarray:
  """log abar_i = sum_{j <= i} log(1 - beta_j), [T] (log1p keeps 1 - abar accurate near t = 0)."""
  return jnp.cumsum(jnp.log1p(-s.betas.astype(jnp.float32)))


def _interval(s: Schedule, t):
  """(i, f) with t = i + f, i in [0, T-2] the interval of t, f in [0, 1] (t clipped to [0, T-1])."""
  T = s.num_timesteps
  if T < 2:
    raise ValueError(f'the continuous-time view needs T >= 2 timesteps, got {T}.')
  t = jnp.clip(jnp.asarray(t, jnp.float32), 0.0, T - 1.0)
  i = jnp.clip(jnp.floor(t).astype(jnp.int32), 0, T - 2)
  return i, t - i.astype(jnp.float32)


def log_alpha_bar(s: Schedule, t) -> jnp.ndarray:
  """log abar(t), linear in t between the integer indices of ``alphas_cumprod`` (any shape)."""
  table = _log_abar_table(s)
  i, f = _interval(s, t)
  return table[i] + f * (table[i + 1] - table[i])


def alpha_bar(s: Schedule, t) -> jnp.ndarray:
  """abar(t) = exp(log abar(t)); equals ``alphas_cumprod[t]`` at integer t."""
  return jnp.exp(log_alpha_bar(s, t))


def beta(s: Schedule, t) -> jnp.ndarray:
  """beta(t) = -d log abar / dt = -log(1 - beta_{i+1}) on [i, i+1) (piecewise constant)."""
  i, _ = _interval(s, t)
  return -jnp.log1p(-s.betas.astype(jnp.float32)[i + 1])


# --- the probability-flow ODE (score SDE eq. 13) --------------------------------------------


def eps_from_output(model_output, x, log_abar, *, mean_type: str = 'eps'):
  """The noise estimate eps_hat at noise level abar = exp(log_abar) for each parameterisation.

  ``eps``: the output; ``x0``: eps = (x - sqrt(abar) x0) / sqrt(1 - abar)
  (DDPM eq. 4 solved for eps); ``v``: eps = sqrt(1 - abar) x + sqrt(abar) v
  (Salimans & Ho 2022). The continuous-time forms of
  :func:`diffusion.predict_eps`; a 2C-channel (learned variance) output uses
  its first C channels.
  """
  if mean_type not in MEAN_TYPES:
    raise ValueError(f'mean_type must be one of {", ".join(map(repr, MEAN_TYPES))}; '
                     f'got {mean_type!r}.')
  c = x.shape[-1]
  out = model_output[..., :c] if model_output.shape[-1] == 2 * c else model_output
  out = out.astype(x.dtype)
  if mean_type == 'eps':
    return out
  sqrt_abar = jnp.exp(0.5 * log_abar)
  sqrt_1m = jnp.sqrt(-jnp.expm1(log_abar))
  if mean_type == 'x0':
    return (x - sqrt_abar * out) / sqrt_1m
  return sqrt_1m * x + sqrt_abar * out


def probability_flow_drift(s: Schedule, model_fn: ModelFn, x, t, *, mean_type: str = 'eps'):
  """dx/dt = -1/2 beta(t) (x - eps_hat(x, t) / sqrt(1 - abar(t))) at scalar real t (eq. 13).

  One model call, with t broadcast to a float32 batch vector ``[B]`` in index units.
  """
  t = jnp.asarray(t, jnp.float32)
  return beta(s, t) * _flow_in_u(s, model_fn, x, -log_alpha_bar(s, t), t, mean_type=mean_type)


def t_of_u(s: Schedule, u) -> jnp.ndarray:
  """The index t with -log abar(t) = u (the inverse of the piecewise-linear interpolation)."""
  table = -_log_abar_table(s)
  u = jnp.asarray(u, jnp.float32)
  i = jnp.clip(jnp.searchsorted(table, u, side='right') - 1, 0, s.num_timesteps - 2)
  return jnp.clip(i + (u - table[i]) / (table[i + 1] - table[i]), 0.0, s.num_timesteps - 1.0)


def _flow_in_u(s: Schedule, model_fn: ModelFn, x, u, t, *, mean_type: str):
  """dx/du = -1/2 (x - eps_hat(x, t) / sqrt(1 - e^-u)) with u = -log abar(t), t = :func:`t_of_u`."""
  t_batch = jnp.full((x.shape[0],), t, jnp.float32)
  eps = eps_from_output(model_fn(x, t_batch), x, -u, mean_type=mean_type)
  return -0.5 * (x - eps / jnp.sqrt(-jnp.expm1(-u)))


def _solve(s: Schedule, model_fn: ModelFn, y0, forward: bool, *, rtol: float, atol: float,
           mean_type: str, max_steps: Optional[int], divergence=None):
  """(y at the other end, nfe): the ODE between index 0 and T-1 with Tsit5 and a PID controller.

  The solver's variable is u = -log abar(t), dx/du = (dx/dt) / beta(t), the
  same ODE reparameterised: in t, beta(t) jumps at every integer index and an
  adaptive Runge-Kutta step spanning several of them cannot see the jumps
  (its error estimate stays small while x drifts by ~1e-3 against the closed
  form, whatever the tolerance); in u the vector field has no beta at all.
  The whole batch is one ODE (one step-size sequence, the error norm over all
  of it), as in score_sde's ``get_ode_sampler`` / ``get_likelihood_fn``. A
  solve that needs more than ``max_steps`` steps returns NaN.

  ``divergence(drift, x) -> (f, div)`` adds a per-example log-density state
  (``y0 = (x, delta)``, d delta / du = div).
  """
  table = -_log_abar_table(s)
  u0, u1 = table[0], table[-1]

  def field(u, y, args):
    del args
    t = t_of_u(s, u)
    drift = lambda x: _flow_in_u(s, model_fn, x, u, t, mean_type=mean_type)
    if divergence is None:
      return drift(y)
    return divergence(drift, y[0])

  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(field), diffrax.Tsit5(), t0=u0 if forward else u1,
      t1=u1 if forward else u0, dt0=None, y0=y0,
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
      saveat=diffrax.SaveAt(t1=True), max_steps=max_steps, throw=False)
  # throw=False: no host callback inside the solve (it would gather a batch-sharded
  # state onto one device); a failed solve (max_steps reached) returns NaN instead.
  ok = sol.result == diffrax.RESULTS.successful
  y1 = jax.tree_util.tree_map(lambda a: jnp.where(ok, a[-1], jnp.nan), sol.ys)
  return y1, _EVALS_PER_STEP * sol.stats['num_steps'] + 1


def probability_flow_sample(s: Schedule, model_fn: ModelFn, rng, shape, *, rtol: float = 1e-5,
                            atol: float = 1e-5, mean_type: str = 'eps', x_T=None,
                            max_steps: Optional[int] = DEFAULT_MAX_STEPS):
  """Samples x_0 by solving the probability-flow ODE (eq. 13) from index T-1 down to 0.

  x_T ~ N(0, I) is drawn from the first half of ``jax.random.split(rng)`` (the
  x_T of :mod:`diffusion_jax.sampling`'s samplers) unless given. The map
  x_T -> x_0 is deterministic and invertible (:func:`ode_encode`).

  Returns:
    (x_0 of ``shape``, nfe): nfe is the number of model calls (int32 scalar).
  """
  shape = tuple(shape)
  if x_T is None:
    x_T = jax.random.normal(jax.random.split(rng)[0], shape, jnp.float32)
  elif tuple(x_T.shape) != shape:
    raise ValueError(f'x_T has shape {tuple(x_T.shape)}, but shape={shape}.')
  return _solve(s, model_fn, jnp.asarray(x_T, jnp.float32), False, rtol=rtol, atol=atol,
                mean_type=mean_type, max_steps=max_steps)


def ode_encode(s: Schedule, model_fn: ModelFn, x0, *, rtol: float = 1e-5, atol: float = 1e-5,
               mean_type: str = 'eps', max_steps: Optional[int] = DEFAULT_MAX_STEPS):
  """The deterministic latent x_T of x0: the probability-flow ODE (eq. 13) from index 0 to T-1.

  ``probability_flow_sample(..., x_T=ode_encode(...)[0])`` returns x0 up to the
  solver tolerances (score SDE §4.3, "uniquely identifiable encoding").

  Returns:
    (x_T of x0's shape, nfe).
  """
  return _solve(s, model_fn, jnp.asarray(x0, jnp.float32), True, rtol=rtol, atol=atol,
                mean_type=mean_type, max_steps=max_steps)


# --- exact likelihoods (instantaneous change of variables, Appendix D.2) --------------------


def _flat_sum(a):
  return jnp.sum(a.reshape((a.shape[0], -1)), axis=-1)


def _divergence_hutchinson(drift, x, probe):
  """(f(x), v^T (df/dx) v) per example: one JVP (Skilling 1989; Hutchinson 1990)."""
  f, jv = jax.jvp(drift, (x,), (probe,))
  return f, _flat_sum(probe * jv)


def _divergence_exact(drift, x):
  """(f(x), tr(df/dx)) per example: D JVPs, one per basis vector, batched with vmap.

  The model treats examples independently, so a basis vector repeated over
  the batch gives every example's Jacobian column at once.
  """
  dims = int(np.prod(x.shape[1:]))
  basis = jnp.eye(dims, dtype=x.dtype).reshape((dims, 1) + x.shape[1:])
  f, cols = jax.vmap(lambda e: jax.jvp(drift, (x,), (jnp.broadcast_to(e, x.shape),)),
                     out_axes=(None, 0))(basis)
  cols = cols.reshape((dims, x.shape[0], dims))     # [j, b, i] = d f_i / d x_j of example b
  return f, jnp.einsum('jbj->b', cols)


def standard_normal_log_prob(x):
  """log N(x; 0, I) per example, in nats."""
  dims = int(np.prod(x.shape[1:]))
  return -0.5 * _flat_sum(x ** 2) - 0.5 * dims * math.log(2.0 * math.pi)


def ode_log_likelihood(s: Schedule, model_fn: ModelFn, x0, rng, *, rtol: float = 1e-5,
                       atol: float = 1e-5, mean_type: str = 'eps', exact_trace: bool = False,
                       max_steps: Optional[int] = DEFAULT_MAX_STEPS):
  """log p_0(x0) in nats per example under the probability-flow ODE (score SDE Appendix D.2).

  The instantaneous change of variables (Chen et al. 2018, Theorem 1; score
  SDE Appendix D.2): d log p_t(x(t)) / dt = -div f(x(t), t) along the ODE, so with
  f the drift of eq. 13,

      log p_0(x(0)) = log N(x(T-1); 0, I) + int_0^{T-1} div f(x(t), t) dt,

  solved jointly with x(t) from index 0 to T-1. ``x0`` is in [-1, 1]^D, not
  dequantised (see :func:`dequantize`). The divergence is the
  Skilling-Hutchinson estimate v^T (df/dx) v with one Rademacher probe v per
  example, fixed for the whole solve and drawn from ``rng`` (one JVP per
  model call; unbiased, so log p is unbiased too), or with ``exact_trace``
  the trace of the Jacobian (D JVPs per call; small images and tests).

  Returns:
    (log_p [B] float32, nfe): nfe counts evaluations of the drift, each one
    (batched) model call with its JVP(s).
  """
  x0 = jnp.asarray(x0, jnp.float32)
  probe = None if exact_trace else jax.random.rademacher(rng, x0.shape, jnp.float32)

  divergence = (_divergence_exact if exact_trace
                else lambda drift, x: _divergence_hutchinson(drift, x, probe))
  state0 = (x0, jnp.zeros((x0.shape[0],), jnp.float32))
  (x_T, delta), nfe = _solve(s, model_fn, state0, True, rtol=rtol, atol=atol,
                             mean_type=mean_type, max_steps=max_steps, divergence=divergence)
  return standard_normal_log_prob(x_T) + delta, nfe


# --- bits/dim with uniform dequantisation (score_sde ``run_lib.evaluate``) ------------------


def dequantize(rng, images_uint8):
  """y = (x + u) / 256 * 2 - 1, u ~ U[0, 1)^D: 8-bit images as continuous data in [-1, 1).

  Uniform dequantisation (Theis et al. 2016; score_sde's ``eval_batch * 255 +
  uniform``, then the [-1, 1] scaler). E_u[log p(y)] + D log(2 / 256) lower-bounds
  the log-probability of the discrete image (see :func:`bpd_from_log_p`).
  """
  x = jnp.asarray(images_uint8, jnp.float32)
  u = jax.random.uniform(rng, x.shape, jnp.float32)
  return (x + u) / 128.0 - 1.0


def bpd_from_log_p(log_p, num_dims: int):
  """Bits/dim of the discrete 8-bit image from log p(y) of its dequantised y (nats).

  The map from [0, 256)^D (unit bins, one per 8-bit value) to y in [-1, 1)^D
  has Jacobian (2 / 256)^D, so -log2 P(x) <= -log2 p(y) - D log2(2 / 256):
  bpd = -log p(y) / (D ln 2) + 7 (score_sde's offset ``7 - inverse_scaler(-1)``).
  """
  return -jnp.asarray(log_p) / (num_dims * math.log(2.0)) + math.log2(128.0)
