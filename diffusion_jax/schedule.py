"""Variance schedules beta_1..beta_T and the quantities derived from them.

The forward process (DDPM eq. 2) adds Gaussian noise with variances beta_t:
q(x_t | x_{t-1}) = N(x_t; sqrt(1 - beta_t) x_{t-1}, beta_t I). Everything the
closed form q(x_t | x_0) (eq. 4) and the posterior q(x_{t-1} | x_t, x_0)
(eqs. 6-7) need is precomputed here in float64 with NumPy and then cast.

Indexing is zero-based: entry ``t`` of every array belongs to the paper's step
``t + 1``, so ``alphas_cumprod[0] = 1 - beta_1`` and
``alphas_cumprod_prev[0] = 1`` (abar_0 of the paper).
"""

import math
from typing import Callable

import flax.struct
import jax.numpy as jnp
import numpy as np

SCHEDULES = ('linear', 'cosine', 'quadratic', 'sigmoid', 'constant')


@flax.struct.dataclass
class Schedule:
  """Immutable pytree of schedule arrays, each of shape [T].

  Never part of the trained parameters or the EMA: pass it next to them.
  """
  num_timesteps: int = flax.struct.field(pytree_node=False)
  betas: jnp.ndarray
  alphas_cumprod: jnp.ndarray            # abar_t = prod_{s<=t} (1 - beta_s)
  alphas_cumprod_prev: jnp.ndarray       # abar_{t-1}, with abar_0 = 1
  sqrt_alphas_cumprod: jnp.ndarray
  sqrt_one_minus_alphas_cumprod: jnp.ndarray
  log_one_minus_alphas_cumprod: jnp.ndarray
  sqrt_recip_alphas_cumprod: jnp.ndarray      # 1 / sqrt(abar_t)
  sqrt_recipm1_alphas_cumprod: jnp.ndarray    # sqrt(1 / abar_t - 1)
  posterior_variance: jnp.ndarray             # beta~_t, eq. 7
  posterior_log_variance_clipped: jnp.ndarray  # log beta~_t, entry 0 := entry 1
  posterior_mean_coef1: jnp.ndarray           # coefficient of x_0 in mu~_t, eq. 7
  posterior_mean_coef2: jnp.ndarray           # coefficient of x_t in mu~_t, eq. 7


def _linear(t, beta_start=1e-4, beta_end=0.02):
  """DDPM §4: betas increasing linearly from 1e-4 to 0.02 (for T = 1000)."""
  return np.linspace(beta_start, beta_end, t, dtype=np.float64)


def _quadratic(t, beta_start=1e-4, beta_end=0.02):
  """Linear in sqrt(beta) (the 'quad' schedule of the DDPM reference code)."""
  return np.linspace(beta_start ** 0.5, beta_end ** 0.5, t, dtype=np.float64) ** 2


def _sigmoid(t, beta_start=1e-4, beta_end=0.02):
  """Sigmoid-shaped ramp from beta_start to beta_end (DDPM reference code)."""
  x = np.linspace(-6, 6, t, dtype=np.float64)
  return 1.0 / (1.0 + np.exp(-x)) * (beta_end - beta_start) + beta_start


def _constant(t, beta=0.02):
  """A constant beta_t = beta."""
  return np.full(t, beta, dtype=np.float64)


def cosine_alpha_bar(u, s=0.008):
  """f(u) / f(0) with f(u) = cos^2(((u + s) / (1 + s)) pi / 2), u = t / T (improved DDPM eq. 17)."""
  f = lambda v: np.cos((v + s) / (1.0 + s) * math.pi / 2) ** 2
  return f(np.asarray(u, np.float64)) / f(0.0)


def _cosine(t, s=0.008, max_beta=0.999):
  """Nichol & Dhariwal eq. 17: beta_t = 1 - abar(t/T) / abar((t-1)/T), clipped at max_beta."""
  steps = np.arange(t + 1, dtype=np.float64) / t
  abar = cosine_alpha_bar(steps, s)
  return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


_BETA_FNS: dict[str, Callable[..., np.ndarray]] = {
    'linear': _linear,
    'cosine': _cosine,
    'quadratic': _quadratic,
    'sigmoid': _sigmoid,
    'constant': _constant,
}


def schedule_from_betas(betas, dtype=jnp.float32) -> Schedule:
  """Derives every schedule quantity from betas (float64 NumPy), then casts to ``dtype``."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.size < 1:
    raise ValueError(f'betas must be a non-empty 1-D array, got shape {betas.shape}.')
  if not np.all((betas > 0) & (betas < 1)):
    raise ValueError('every beta must lie in the open interval (0, 1); got min '
                     f'{betas.min():.3g}, max {betas.max():.3g}.')
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)                                      # eq. 4
  abar_prev = np.append(1.0, abar[:-1])
  post_var = betas * (1.0 - abar_prev) / (1.0 - abar)            # eq. 7, beta~_t
  # beta~_1 = 0; the reference code clips the log at entry 1 (the variance is
  # only used at t = 0 through the decoder, never the log of zero).
  post_log_var = np.log(np.append(post_var[1], post_var[1:])) if betas.size > 1 else np.log(betas)
  arrays = dict(
      betas=betas,
      alphas_cumprod=abar,
      alphas_cumprod_prev=abar_prev,
      sqrt_alphas_cumprod=np.sqrt(abar),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
      log_one_minus_alphas_cumprod=np.log(1.0 - abar),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1.0),
      posterior_variance=post_var,
      posterior_log_variance_clipped=post_log_var,
      posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
      posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
  )
  return Schedule(num_timesteps=int(betas.size),
                  **{k: jnp.asarray(v, dtype=dtype) for k, v in arrays.items()})


def make_schedule(name: str, num_timesteps: int, *, dtype=jnp.float32, **kw) -> Schedule:
  """Builds a :class:`Schedule` by name.

  Args:
    name: one of ``'linear'`` (kw beta_start=1e-4, beta_end=0.02; DDPM),
      ``'cosine'`` (kw s=0.008, max_beta=0.999; improved DDPM eq. 17),
      ``'quadratic'``, ``'sigmoid'`` (kw beta_start, beta_end) or
      ``'constant'`` (kw beta).
    num_timesteps: T >= 1.
    dtype: dtype of the arrays (computed in float64, then cast).
    **kw: schedule-specific keywords.
  """
  if name not in _BETA_FNS:
    raise ValueError(f'diffusion.schedule: unknown schedule {name!r}; allowed values: '
                     f'{", ".join(SCHEDULES)}.')
  if isinstance(num_timesteps, bool) or int(num_timesteps) != num_timesteps or num_timesteps < 1:
    raise ValueError(f'diffusion.num_timesteps must be an integer T >= 1, got {num_timesteps!r}.')
  try:
    betas = _BETA_FNS[name](int(num_timesteps), **kw)
  except TypeError as e:
    raise ValueError(f'bad keyword for schedule {name!r}: {e}') from None
  return schedule_from_betas(betas, dtype=dtype)


def schedule_from_config(config) -> Schedule:
  """The schedule named by a config's ``diffusion`` section."""
  d = config.diffusion
  kw = {}
  if d.schedule in ('linear', 'quadratic', 'sigmoid'):
    kw = dict(beta_start=d.beta_start, beta_end=d.beta_end)
  return make_schedule(d.schedule, d.num_timesteps, **kw)
