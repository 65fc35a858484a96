"""The forward process, its posterior, the reverse-process parameterisation and the losses.

Equation numbers refer to Ho et al. 2020, "Denoising Diffusion Probabilistic
Models" (DDPM) unless marked "iDDPM" (Nichol & Dhariwal 2021, "Improved
Denoising Diffusion Probabilistic Models"). Conventions (see docs/design.md): images
in [-1, 1], NHWC; ``t`` is a zero-based int32 vector, index ``t`` being the
paper's step ``t + 1``; likelihoods in bits per dimension.
"""

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from diffusion_jax.schedule import Schedule

MEAN_TYPES = ('eps', 'x0', 'v')
VAR_TYPES = ('fixed_small', 'fixed_large', 'learned_range')
LOSS_TYPES = ('simple', 'vlb', 'hybrid')
WEIGHTINGS = (None, 'min_snr')

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def _check(name, value, allowed):
  if value not in allowed:
    raise ValueError(f'{name} must be one of {", ".join(map(repr, allowed))}; got {value!r}.')


def extract(a: jnp.ndarray, t: jnp.ndarray, x_shape) -> jnp.ndarray:
  """Gathers schedule entries ``a[t]`` and reshapes them to broadcast against ``x_shape``."""
  return a[t].reshape((t.shape[0],) + (1,) * (len(x_shape) - 1))


def mean_flat(x: jnp.ndarray) -> jnp.ndarray:
  """Mean over every axis but the batch axis."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# --- forward process ------------------------------------------------------------


def q_mean_variance(s: Schedule, x0, t):
  """Mean, variance and log-variance of q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (eq. 4)."""
  mean = extract(s.sqrt_alphas_cumprod, t, x0.shape) * x0
  variance = extract(1.0 - s.alphas_cumprod, t, x0.shape)
  log_variance = extract(s.log_one_minus_alphas_cumprod, t, x0.shape)
  return mean, variance, log_variance


def q_sample(s: Schedule, x0, t, noise):
  """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps: a sample of q(x_t | x_0) (eq. 4)."""
  return (extract(s.sqrt_alphas_cumprod, t, x0.shape) * x0
          + extract(s.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise)


def q_posterior_mean_variance(s: Schedule, x0, x_t, t):
  """The tractable posterior q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I) (eqs. 6-7).

  mu~_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0
          + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t,
  beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t.

  Returns:
    (mean, variance, log_variance_clipped), the latter two broadcastable to x.
  """
  mean = (extract(s.posterior_mean_coef1, t, x_t.shape) * x0
          + extract(s.posterior_mean_coef2, t, x_t.shape) * x_t)
  variance = extract(s.posterior_variance, t, x_t.shape)
  log_variance = extract(s.posterior_log_variance_clipped, t, x_t.shape)
  return mean, variance, log_variance


# --- parameterisations of the reverse process -----------------------------------


def split_model_output(model_output, x_t, var_type: str):
  """Splits a learned-variance output [.., 2C] into (mean part [.., C], v [.., C])."""
  _check('var_type', var_type, VAR_TYPES)
  if var_type == 'learned_range':
    c = x_t.shape[-1]
    if model_output.shape[-1] != 2 * c:
      raise ValueError(f"var_type='learned_range' needs a model output with 2*C={2 * c} "
                       f'channels, got {model_output.shape[-1]}.')
    return model_output[..., :c], model_output[..., c:]
  return model_output, None


def _mean_part(model_output, x_t):
  """The mean parameterisation's channels (the first C when the output has 2C)."""
  c = x_t.shape[-1]
  return model_output[..., :c] if model_output.shape[-1] == 2 * c else model_output


def predict_x0(s: Schedule, model_output, x_t, t, *, mean_type: str):
  """The model's estimate of x_0 for each mean parameterisation.

  - ``eps``: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)  (inverse of eq. 4, as in eq. 11);
  - ``x0``:  the output itself;
  - ``v``:   x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v, with
    v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022).
  A 2C-channel (learned variance) output uses its first C channels.
  """
  _check('mean_type', mean_type, MEAN_TYPES)
  out = _mean_part(model_output, x_t)
  if mean_type == 'eps':
    return (extract(s.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract(s.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * out)
  if mean_type == 'x0':
    return out
  return (extract(s.sqrt_alphas_cumprod, t, x_t.shape) * x_t
          - extract(s.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * out)


def eps_from_x0(s: Schedule, x_t, t, x0):
  """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t) (eq. 4 solved for eps)."""
  return ((extract(s.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x0)
          / extract(s.sqrt_recipm1_alphas_cumprod, t, x_t.shape))


def predict_eps(s: Schedule, model_output, x_t, t, *, mean_type: str):
  """The model's estimate of the noise eps for each mean parameterisation (no clipping)."""
  _check('mean_type', mean_type, MEAN_TYPES)
  out = _mean_part(model_output, x_t)
  if mean_type == 'eps':
    return out
  if mean_type == 'v':  # eps = sqrt(1 - abar) x_t + sqrt(abar) v
    return (extract(s.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t
            + extract(s.sqrt_alphas_cumprod, t, x_t.shape) * out)
  return eps_from_x0(s, x_t, t, out)


def training_target(s: Schedule, x0, t, noise, *, mean_type: str):
  """What the network regresses: eps (eq. 14), x_0, or v = sqrt(abar) eps - sqrt(1-abar) x_0."""
  _check('mean_type', mean_type, MEAN_TYPES)
  if mean_type == 'eps':
    return noise
  if mean_type == 'x0':
    return x0
  return (extract(s.sqrt_alphas_cumprod, t, x0.shape) * noise
          - extract(s.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0)


def p_mean_variance(s: Schedule, model_output, x_t, t, *, mean_type: str = 'eps',
                    var_type: str = 'fixed_large', clip_denoised: bool = True):
  """The reverse step p_theta(x_{t-1} | x_t) = N(mu_theta, Sigma_theta) (eq. 1).

  The mean is the posterior mean (eq. 7) evaluated at the predicted x_0, which
  for ``eps`` equals eq. 11: mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t).
  Variances: ``fixed_small`` sigma_t^2 = beta~_t, ``fixed_large`` sigma_t^2 = beta_t
  (entry 0 replaced by beta~_1, DDPM §3.2), ``learned_range``
  log sigma_t^2 = (v+1)/2 log beta_t + (1 - (v+1)/2) log beta~_t (iDDPM eq. 15).

  Returns:
    dict(mean, variance, log_variance, pred_x0); variance arrays have x_t's shape.
  """
  _check('var_type', var_type, VAR_TYPES)
  model_output = model_output.astype(x_t.dtype)
  out, v = split_model_output(model_output, x_t, var_type)
  if var_type == 'learned_range':
    min_log = extract(s.posterior_log_variance_clipped, t, x_t.shape)
    max_log = extract(jnp.log(s.betas), t, x_t.shape)
    frac = (v + 1.0) / 2.0
    log_variance = frac * max_log + (1.0 - frac) * min_log
    variance = jnp.exp(log_variance)
  else:
    if var_type == 'fixed_small':
      var, log_var = s.posterior_variance, s.posterior_log_variance_clipped
    else:
      # fixed_large: beta_t, with the posterior variance at t = 1 in place of
      # beta_0 (Ho et al. 2020, §3.2; improved-diffusion); a one-step schedule
      # (a respaced chain of 1) has only beta_0, whose noise is never added.
      var = (jnp.concatenate([s.posterior_variance[1:2], s.betas[1:]])
             if s.betas.shape[0] > 1 else s.betas)
      log_var = jnp.log(var)
    variance = jnp.broadcast_to(extract(var, t, x_t.shape), x_t.shape)
    log_variance = jnp.broadcast_to(extract(log_var, t, x_t.shape), x_t.shape)
  pred_x0 = predict_x0(s, out, x_t, t, mean_type=mean_type)
  if clip_denoised:
    pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
  mean, _, _ = q_posterior_mean_variance(s, pred_x0, x_t, t)
  return dict(mean=mean, variance=variance, log_variance=log_variance, pred_x0=pred_x0)


def score_from_model_output(s: Schedule, model_output, x_t, t, *, mean_type: str):
  """The score estimate s_theta(x_t, t) = grad log q(x_t) ~= -eps_theta / sqrt(1 - abar_t).

  DDPM §3.2 / eq. 12: the eps-parameterised L_simple is denoising score matching,
  so the noise predictor is a scaled score (the link to Langevin dynamics).
  """
  eps = predict_eps(s, model_output, x_t, t, mean_type=mean_type)
  return -eps / extract(s.sqrt_one_minus_alphas_cumprod, t, x_t.shape)


# --- likelihood terms ----------------------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
  """The tanh approximation of the standard normal CDF used by the DDPM reference code."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
  """log p(x) of the discretized Gaussian decoder p_theta(x_0 | x_1) (eq. 13), in nats.

  Pixels x in [-1, 1] on a grid of 256 values; each bin has width 2/255, the
  edge bins extend to -inf / +inf. ``log_scales`` is the log standard deviation.
  Log-probabilities are floored at log(1e-12).
  """
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _vb_terms(s, model_output, x0, x_t, t, *, mean_type, var_type, clip_denoised):
  """L_{t-1} (t > 0) or L_0 (t == 0) in bits/dim, plus the predicted x_0."""
  true_mean, _, true_log_var = q_posterior_mean_variance(s, x0, x_t, t)
  out = p_mean_variance(s, model_output, x_t, t, mean_type=mean_type, var_type=var_type,
                        clip_denoised=clip_denoised)
  kl = mean_flat(normal_kl(true_mean, true_log_var, out['mean'], out['log_variance']))
  decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
      x0, means=out['mean'], log_scales=0.5 * out['log_variance']))
  bpd = jnp.where(t == 0, decoder_nll, kl) / math.log(2.0)
  return bpd, out['pred_x0']


def vb_terms_bpd(s: Schedule, model_output, x0, x_t, t, *, mean_type: str = 'eps',
                 var_type: str = 'fixed_large', clip_denoised: bool = True):
  """One term of the variational bound (eq. 5), in bits/dim, shape [B].

  For t > 0: L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)).
  For t == 0: L_0 = -log p_theta(x_0 | x_1), the discretized Gaussian decoder (eq. 13).
  """
  return _vb_terms(s, model_output, x0, x_t, t, mean_type=mean_type, var_type=var_type,
                   clip_denoised=clip_denoised)[0]


def prior_bpd(s: Schedule, x0):
  """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, shape [B] (eq. 5; no parameters)."""
  t = jnp.full((x0.shape[0],), s.num_timesteps - 1, dtype=jnp.int32)
  mean, _, log_var = q_mean_variance(s, x0, t)
  return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / math.log(2.0)


# --- training objective ---------------------------------------------------------------


def snr(s: Schedule, t):
  """Signal-to-noise ratio abar_t / (1 - abar_t) at zero-based steps t."""
  abar = s.alphas_cumprod[t]
  return abar / (1.0 - abar)


def loss_weight(s: Schedule, t, *, mean_type: str, weighting: Optional[str],
                min_snr_gamma: float = 5.0):
  """Per-example weight of the mean-squared error, shape [B].

  ``None``: 1 (L_simple, eq. 14). ``'min_snr'``: Hang et al. 2023, the x_0-space
  weight min(SNR, gamma) expressed for the chosen target (eps: /SNR, v: /(SNR+1)).
  """
  _check('weighting', weighting, WEIGHTINGS)
  if weighting is None:
    return jnp.ones(t.shape, jnp.float32)
  r = snr(s, t)
  w = jnp.minimum(r, min_snr_gamma)
  return {'eps': w / r, 'x0': w, 'v': w / (r + 1.0)}[mean_type]


def training_losses(s: Schedule, model_fn: ModelFn, x0, t, noise, *, mean_type: str = 'eps',
                    var_type: str = 'fixed_large', loss_type: str = 'simple',
                    hybrid_lambda: float = 0.001, weighting: Optional[str] = None,
                    min_snr_gamma: float = 5.0):
  """Per-example training losses at steps t for one noise draw.

  - ``'simple'``: L_simple = ||target - model||^2 averaged over dimensions (eq. 14),
    target = eps, x_0 or v according to ``mean_type`` (optionally weighted).
  - ``'vlb'``: T * L_{t-1} (bits/dim), an unbiased estimate of sum_t L_{t-1} (eq. 5)
    for uniform t.
  - ``'hybrid'``: L_simple + lambda * T * L_{t-1} with a stop-gradient on the mean
    part, so the bound trains only the variance (iDDPM eq. 16).

  Returns:
    dict with ``loss`` [B], ``mse`` [B] and, when the bound is computed
    (vlb, hybrid, or learned variance), ``vb`` [B] (bits/dim, unscaled).
  """
  _check('loss_type', loss_type, LOSS_TYPES)
  _check('mean_type', mean_type, MEAN_TYPES)
  x_t = q_sample(s, x0, t, noise)
  model_output = model_fn(x_t, t).astype(x0.dtype)
  out, v = split_model_output(model_output, x_t, var_type)
  target = training_target(s, x0, t, noise, mean_type=mean_type)
  mse = mean_flat((target - out) ** 2)
  terms = dict(mse=mse)
  if loss_type != 'simple' or var_type == 'learned_range':
    if loss_type == 'vlb':
      vb_out = model_output
    else:  # the bound trains only the variance: stop the gradient into the mean
      vb_out = jax.lax.stop_gradient(out)
      if v is not None:
        vb_out = jnp.concatenate([vb_out, v], axis=-1)
    terms['vb'] = vb_terms_bpd(s, vb_out, x0, x_t, t, mean_type=mean_type,
                               var_type=var_type, clip_denoised=False)
  weighted_mse = loss_weight(s, t, mean_type=mean_type, weighting=weighting,
                             min_snr_gamma=min_snr_gamma) * mse
  if loss_type == 'simple':
    terms['loss'] = weighted_mse
  elif loss_type == 'vlb':
    terms['loss'] = terms['vb'] * s.num_timesteps
  else:
    terms['loss'] = weighted_mse + hybrid_lambda * s.num_timesteps * terms['vb']
  return terms


# --- the full bound ---------------------------------------------------------------------


def calc_bpd_loop(s: Schedule, model_fn: ModelFn, x0, rng, *, mean_type: str = 'eps',
                  var_type: str = 'fixed_large', clip_denoised: bool = True):
  """The whole variational bound L = L_T + sum_{t>1} L_{t-1} + L_0 (eq. 5) in bits/dim.

  Evaluates every term with one ``lax.scan`` over t = T-1, ..., 0, each with its
  own noise draw ``fold_in(rng, t)``.

  Returns:
    dict(total_bpd [B], prior_bpd [B], vb [B, T], xstart_mse [B, T], mse [B, T]);
    column t of ``vb`` is L_t in the zero-based convention (column 0 is L_0).
  """
  batch = x0.shape[0]

  def body(carry, t_scalar):
    t = jnp.full((batch,), t_scalar, dtype=jnp.int32)
    noise = jax.random.normal(jax.random.fold_in(rng, t_scalar), x0.shape, x0.dtype)
    x_t = q_sample(s, x0, t, noise)
    model_output = model_fn(x_t, t).astype(x0.dtype)
    vb, pred_x0 = _vb_terms(s, model_output, x0, x_t, t, mean_type=mean_type,
                            var_type=var_type, clip_denoised=clip_denoised)
    eps = eps_from_x0(s, x_t, t, pred_x0)
    return carry, (vb, mean_flat((pred_x0 - x0) ** 2), mean_flat((eps - noise) ** 2))

  ts = jnp.arange(s.num_timesteps - 1, -1, -1, dtype=jnp.int32)
  _, (vb, xstart_mse, mse) = jax.lax.scan(body, None, ts)
  # rows were produced for t = T-1..0: flip to zero-based t order, then [B, T].
  vb, xstart_mse, mse = (jnp.flip(a, 0).T for a in (vb, xstart_mse, mse))
  prior = prior_bpd(s, x0)
  return dict(total_bpd=jnp.sum(vb, axis=1) + prior, prior_bpd=prior, vb=vb,
              xstart_mse=xstart_mse, mse=mse)
