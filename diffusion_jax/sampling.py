"""The reverse process: ancestral (DDPM), DDIM and predictor-corrector samplers.

Every sampler runs its whole chain inside ONE ``jax.lax.scan``, so the model is
traced once per sampler call, a jitted sampler compiles once per shape, and no
step ever recompiles. Noise for the step at (zero-based) timestep ``t`` is
``jax.random.normal(fold_in(chain_key, t))`` and ``x_T`` is drawn from the other
half of ``jax.random.split(rng)``, so the ancestral sampler, its progressive
variant and full-length DDIM with ``eta=1`` see the same random numbers.

Conventions (docs/design.md): images in [-1, 1], NHWC; ``t`` is a zero-based int32
vector ``[B]``, index ``t`` being the paper's step ``t + 1``; a model is a plain
``model_fn(x_t, t) -> output`` (2C channels for ``var_type='learned_range'``).

References: Ho et al. 2020 (DDPM, Algorithm 2); Song, Meng & Ermon 2021 (DDIM,
eq. 12); Song et al. 2021, "Score-Based Generative Modeling through SDEs"
(Algorithm 3, the ``LangevinCorrector`` of yang-song/score_sde); Nichol &
Dhariwal 2021 (respacing a schedule onto a sub-sequence of timesteps).

The timestep grids and respacing live in :mod:`diffusion_jax.timesteps`, the
DPM-Solver++ update in :mod:`diffusion_jax.dpm_solver`; their public names are
re-exported here.
"""


import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion
from diffusion_jax.diffusion import ModelFn
from diffusion_jax.dpm_solver import dpm_solver_chain, dpm_solver_orders, dpm_solver_update
from diffusion_jax.schedule import Schedule
from diffusion_jax.timesteps import (SKIP_TYPES, batch_t, check_int, ddim_timesteps,
                                     respace_schedule, snapshot_steps, uniform_timesteps)

SAMPLERS = ('ancestral', 'ddim', 'pc', 'dpm_solver', 'ode')

__all__ = [
    'SAMPLERS', 'SKIP_TYPES', 'p_sample', 'p_sample_loop', 'p_sample_loop_progressive',
    'snapshot_steps', 'ddim_timesteps', 'ddim_step', 'ddim_sample_loop', 'dpm_solver_orders',
    'dpm_solver_update', 'dpm_solver_chain', 'dpm_solver_sample_loop', 'langevin_correct',
    'pc_sample_loop', 'respace_schedule', 'uniform_timesteps',
]


# --- helpers -----------------------------------------------------------------------


def _init(rng, shape, x_T, dtype=jnp.float32):
  """(x_T, chain_key): x_T ~ N(0, I) from one half of ``rng`` unless given."""
  rng_T, chain_key = jax.random.split(rng)
  shape = tuple(shape)
  if x_T is None:
    x_T = jax.random.normal(rng_T, shape, dtype)
  else:
    x_T = jnp.asarray(x_T)
    if x_T.shape != shape:
      raise ValueError(f'x_T has shape {x_T.shape}, but shape={shape}.')
  return x_T, chain_key


# --- ancestral sampling (DDPM Algorithm 2) --------------------------------------------


def p_sample(s: Schedule, model_fn: ModelFn, x_t, t_scalar, key, *, mean_type='eps',
             var_type='fixed_large', clip_denoised=True):
  """One ancestral step x_t -> x_{t-1} ~ p_theta(x_{t-1} | x_t) (DDPM Algorithm 2, line 4).

  x_{t-1} = mu_theta(x_t, t) + sigma_t z, z ~ N(0, I), with no noise at t == 0
  (the last step returns the mean: the decoder's noiseless output).

  Returns:
    (x_{t-1}, pred_x0), both of x_t's shape.
  """
  t = batch_t(t_scalar, x_t)
  out = diffusion.p_mean_variance(s, model_fn(x_t, t), x_t, t, mean_type=mean_type,
                                  var_type=var_type, clip_denoised=clip_denoised)
  noise = jax.random.normal(key, x_t.shape, x_t.dtype)
  nonzero = (t_scalar > 0).astype(x_t.dtype)
  x_prev = out['mean'] + nonzero * jnp.exp(0.5 * out['log_variance']) * noise
  return x_prev.astype(x_t.dtype), out['pred_x0'].astype(x_t.dtype)


def _reverse_ts(s: Schedule):
  return jnp.arange(s.num_timesteps - 1, -1, -1, dtype=jnp.int32)


def p_sample_loop(s: Schedule, model_fn: ModelFn, rng, shape, *, mean_type: str = 'eps',
                  var_type: str = 'fixed_large', clip_denoised: bool = True, x_T=None):
  """Ancestral sampling over all T steps (DDPM Algorithm 2) as one ``lax.scan``.

  x_T ~ N(0, I); for t = T-1, ..., 0 (zero-based): x_{t-1} = mu_theta(x_t, t) + sigma_t z
  with z = 0 at t == 0. Returns x_0 with ``shape``.
  """
  x, chain_key = _init(rng, shape, x_T)

  def body(x, t_scalar):
    x, _ = p_sample(s, model_fn, x, t_scalar, jax.random.fold_in(chain_key, t_scalar),
                    mean_type=mean_type, var_type=var_type, clip_denoised=clip_denoised)
    return x, None

  x, _ = jax.lax.scan(body, x, _reverse_ts(s))
  return x


def p_sample_loop_progressive(s: Schedule, model_fn: ModelFn, rng, shape, *,
                              mean_type: str = 'eps', var_type: str = 'fixed_large',
                              clip_denoised: bool = True, x_T=None,
                              num_snapshots: Optional[int] = None):
  """:func:`p_sample_loop` that also records K snapshots of the chain (DDPM Fig. 6).

  Still a single scan: the carry holds a ``[K + 1, *shape]`` buffer written with
  ``lax.dynamic_update_index_in_dim`` (slot K is a scratch slot for the steps that
  are not recorded). ``num_snapshots`` K is in [1, T], default min(10, T).
  Snapshot k holds the chain's input x_t at step ``t[k]`` and the model's
  prediction of x_0 from it; ``t`` runs from T-1 down to 0 (see
  :func:`snapshot_steps`).

  Returns:
    (x_0, dict(x_t=[K, *shape], pred_x0=[K, *shape], t=[K] int32)); x_0 equals
    ``p_sample_loop``'s for the same arguments.
  """
  T = s.num_timesteps
  snap_t = snapshot_steps(T, min(10, T) if num_snapshots is None else num_snapshots)
  k = snap_t.size
  slot_of_t = np.full(T, k, np.int32)
  slot_of_t[snap_t] = np.arange(k, dtype=np.int32)
  x, chain_key = _init(rng, shape, x_T)
  buf = jnp.zeros((k + 1,) + x.shape, x.dtype)

  def body(carry, t_scalar):
    x, xs_buf, x0_buf = carry
    x_prev, pred_x0 = p_sample(s, model_fn, x, t_scalar, jax.random.fold_in(chain_key, t_scalar),
                               mean_type=mean_type, var_type=var_type,
                               clip_denoised=clip_denoised)
    slot = jnp.asarray(slot_of_t)[t_scalar]
    xs_buf = jax.lax.dynamic_update_index_in_dim(xs_buf, x, slot, 0)
    x0_buf = jax.lax.dynamic_update_index_in_dim(x0_buf, pred_x0, slot, 0)
    return (x_prev, xs_buf, x0_buf), None

  (x, xs_buf, x0_buf), _ = jax.lax.scan(body, (x, buf, buf), _reverse_ts(s))
  return x, dict(x_t=xs_buf[:k], pred_x0=x0_buf[:k], t=jnp.asarray(snap_t, jnp.int32))


# --- DDIM (Song, Meng & Ermon 2021) ----------------------------------------------------


def ddim_step(s: Schedule, model_output, x_t, t, abar, abar_prev, eta, noise, *,
              mean_type='eps', clip_denoised=True):
  """One DDIM update x_t -> x_prev (DDIM eq. 12), ``abar``/``abar_prev`` scalars.

  x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,
  sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev) (eq. 16).
  With clipping, eps_hat is recomputed from the clipped x0_hat (as improved-diffusion).

  Returns:
    (x_prev, x0_hat).
  """
  pred_x0 = diffusion.predict_x0(s, model_output, x_t, t, mean_type=mean_type)
  if clip_denoised:
    pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    eps = diffusion.eps_from_x0(s, x_t, t, pred_x0)
  else:
    eps = diffusion.predict_eps(s, model_output, x_t, t, mean_type=mean_type)
  sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar)) * jnp.sqrt(1.0 - abar / abar_prev)
  dir_xt = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma ** 2, 0.0)) * eps
  x_prev = jnp.sqrt(abar_prev) * pred_x0 + dir_xt + sigma * noise
  return x_prev.astype(x_t.dtype), pred_x0


def ddim_sample_loop(s: Schedule, model_fn: ModelFn, rng, shape, *, num_steps: int,
                     eta: float = 0.0, skip_type: str = 'uniform', mean_type: str = 'eps',
                     clip_denoised: bool = True, x_T=None):
  """DDIM sampling (Song, Meng & Ermon 2021, eq. 12) on a sub-sequence, as one scan.

  Visits tau = :func:`ddim_timesteps` in reverse; the update from tau_i goes to
  abar_{tau_{i-1}}, and the last one (from tau_0) to abar = 1, i.e. to x_0.
  ``eta=0`` is deterministic given x_T; ``eta=1`` is DDPM-like (sigma^2 = beta~
  on the sub-sequence; with ``num_steps=T`` it matches ancestral ``fixed_small``).
  A learned-variance (2C-channel) output only contributes its mean part.
  """
  T = s.num_timesteps
  if isinstance(eta, (int, float, np.number)) and not eta >= 0:
    raise ValueError(f'eta must be >= 0; got {eta!r}.')
  seq = ddim_timesteps(T, num_steps, skip_type)
  x, chain_key = _init(rng, shape, x_T)
  ts = jnp.asarray(seq, jnp.int32)
  abar = s.alphas_cumprod[ts]
  abar_prev = jnp.concatenate([jnp.ones((1,), abar.dtype), abar[:-1]])

  def body(x, inp):
    t_scalar, a, a_prev = inp
    t = batch_t(t_scalar, x)
    noise = jax.random.normal(jax.random.fold_in(chain_key, t_scalar), x.shape, x.dtype)
    x, _ = ddim_step(s, model_fn(x, t).astype(x.dtype), x, t, a, a_prev, eta, noise,
                     mean_type=mean_type, clip_denoised=clip_denoised)
    return x, None

  x, _ = jax.lax.scan(body, x, (ts, abar, abar_prev), reverse=True)
  return x


# --- DPM-Solver++ (Lu et al. 2022; the solver is diffusion_jax.dpm_solver) ----------------


def dpm_solver_sample_loop(s: Schedule, model_fn: ModelFn, rng, shape, *, num_steps: int,
                           order: int = 2, skip_type: str = 'uniform', mean_type: str = 'eps',
                           clip_denoised: bool = False, x_T=None,
                           lower_order_final: bool = True):
  """DPM-Solver++ multistep sampling (Lu et al. 2022) on the DDIM grid, as one scan.

  Solves the diffusion ODE in its exponential-integrator form with the model's
  x_0 prediction (data prediction; eps, x0 and v outputs are all converted by
  :func:`diffusion.predict_x0`) on tau = :func:`ddim_timesteps`, from x_T at
  tau_{N-1} to abar = 1, with exactly ``num_steps`` model calls. ``order=1`` is
  DDIM with eta = 0 (:func:`ddim_sample_loop`, to float32 rounding); orders 2
  and 3 reuse the previous model outputs (:func:`dpm_solver_update`), and the
  final updates drop to first order (:func:`dpm_solver_orders`). x_T is drawn
  as the other samplers draw it.
  """
  seq = ddim_timesteps(s.num_timesteps, num_steps, skip_type)
  x, _ = _init(rng, shape, x_T)
  return dpm_solver_chain(s, model_fn, x, seq, order=order, mean_type=mean_type,
                          clip_denoised=clip_denoised, lower_order_final=lower_order_final)


# --- predictor-corrector (score SDE Algorithm 3, VP-SDE) ---------------------------------


def langevin_correct(s: Schedule, model_fn: ModelFn, x_t, t_scalar, key, *, snr: float,
                     mean_type: str = 'eps'):
  """One Langevin MCMC step at noise level t (score_sde ``LangevinCorrector``).

  Unadjusted Langevin dynamics x <- x + eps grad log q_t(x) + sqrt(2 eps) z targets
  q_t, the noisy marginal at level t. DDPM's eps-prediction is denoising score
  matching (DDPM §3.2, eq. 12), so the score is s_theta = -eps_theta / sqrt(1 - abar_t)
  (:func:`diffusion.score_from_model_output`). Step size as in score_sde:
  eps = 2 alpha_t (snr ||z|| / ||s_theta||)^2 with alpha_t = 1 - beta_t and the
  norms per example, averaged over the batch.
  """
  t = batch_t(t_scalar, x_t)
  score = diffusion.score_from_model_output(s, model_fn(x_t, t).astype(x_t.dtype), x_t, t,
                                            mean_type=mean_type)
  noise = jax.random.normal(key, x_t.shape, x_t.dtype)
  flat = lambda a: a.reshape((a.shape[0], -1))
  grad_norm = jnp.mean(jnp.linalg.norm(flat(score), axis=-1))
  noise_norm = jnp.mean(jnp.linalg.norm(flat(noise), axis=-1))
  alpha = 1.0 - s.betas[t_scalar]
  step = 2.0 * alpha * (snr * noise_norm / jnp.maximum(grad_norm, 1e-12)) ** 2
  return (x_t + step * score + jnp.sqrt(2.0 * step) * noise).astype(x_t.dtype)


def pc_sample_loop(s: Schedule, model_fn: ModelFn, rng, shape, *, num_steps: Optional[int] = None,
                   snr: float = 0.16, num_corrector_steps: int = 1, mean_type: str = 'eps',
                   var_type: str = 'fixed_large', clip_denoised: bool = True, x_T=None):
  """Predictor-corrector sampling (Song et al. 2021, Algorithm 3, VP-SDE = DDPM).

  For each level t = T-1..0: ``num_corrector_steps`` Langevin steps at level t
  (:func:`langevin_correct`), then the ancestral predictor x_t -> x_{t-1}
  (:func:`p_sample`; no noise at t == 0). This is the loop of score_sde's
  ``pc_sampler`` (corrector before predictor, so every corrector step acts on a
  noisy level with a defined score, and x_0 is the denoised predictor mean).
  ``num_corrector_steps=0`` is plain ancestral sampling.

  ``num_steps`` < T runs on ``uniform_timesteps(T, num_steps)`` with the schedule
  respaced (:func:`respace_schedule`; needs a concrete schedule), as the
  ``N``-step discretisation of the same VP-SDE. ``None`` means T.
  """
  T = s.num_timesteps
  n = T if num_steps is None else check_int('num_steps', num_steps, 1, T)
  m = check_int('num_corrector_steps', num_corrector_steps, 0, 10**6)
  if n < T:
    s, wrap = respace_schedule(s, uniform_timesteps(T, n))
    model_fn = wrap(model_fn)
  x, chain_key = _init(rng, shape, x_T)

  def correct(x, key, t_scalar):
    return langevin_correct(s, model_fn, x, t_scalar, key, snr=snr, mean_type=mean_type), None

  def body(x, t_scalar):
    pred_key = jax.random.fold_in(chain_key, t_scalar)   # the ancestral sampler's key
    if m:
      corr_keys = jax.random.split(jax.random.fold_in(pred_key, 1), m)
      x, _ = jax.lax.scan(functools.partial(correct, t_scalar=t_scalar), x, corr_keys)
    x, _ = p_sample(s, model_fn, x, t_scalar, pred_key, mean_type=mean_type,
                    var_type=var_type, clip_denoised=clip_denoised)
    return x, None

  x, _ = jax.lax.scan(body, x, _reverse_ts(s))
  return x
