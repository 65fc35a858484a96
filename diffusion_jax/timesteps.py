"""The timesteps a reverse chain visits: DDIM's grids, respacing, snapshots, and a step's batch vector.

A shortened chain visits an ascending sub-sequence tau of the T zero-based
timesteps: DDIM's ``uniform`` and ``quadratic`` grids (Song, Meng & Ermon 2021,
§4.2 and App. D.2; :func:`ddim_timesteps`), evenly spaced steps with both ends
(:func:`uniform_timesteps`), and the Markov chain that only visits tau
(Nichol & Dhariwal 2021 §4, :func:`respace_schedule`). Every sampler of
:mod:`diffusion_jax.sampling` and :mod:`diffusion_jax.dpm_solver` takes its grid
from here; ``sampling`` re-exports the public names.
"""

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import ModelFn
from diffusion_jax.schedule import Schedule, schedule_from_betas

SKIP_TYPES = ('uniform', 'quadratic', 'trailing')


def batch_t(t_scalar, x):
  """A scalar timestep broadcast to the int32 batch vector ``[B]`` a model expects."""
  return jnp.full((x.shape[0],), t_scalar, dtype=jnp.int32)


def check_int(name, value, lo, hi):
  """``value`` as an int, or a ValueError naming ``name`` and the range [lo, hi]."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
    raise ValueError(f'{name} must be an integer in [{lo}, {hi}]; got {value!r}.')
  return int(value)


def ddim_timesteps(num_timesteps: int, num_steps: int, skip_type: str = 'uniform') -> np.ndarray:
  """The ascending sub-sequence tau of zero-based timesteps DDIM visits (NumPy int array).

  ``'uniform'``: ``i * (T // num_steps)`` for i = 0..num_steps-1;
  ``'quadratic'``: ``(linspace(0, sqrt(0.8 T), num_steps) ** 2).astype(int)`` as in
  the DDIM paper's code (it may repeat small timesteps when num_steps is close to
  T; a repeated step is an exact no-op of eq. 12);
  ``'trailing'``: ``round(T - i T / num_steps) - 1`` for i = 0..num_steps-1 (diffusers'
  ``timestep_spacing='trailing'``, Lin et al. 2024), which starts at T-1 as
  progressive distillation needs (Salimans & Ho 2022); see :func:`trailing_timesteps`.
  """
  T = int(num_timesteps)
  n = check_int('num_steps', num_steps, 1, T)
  if skip_type == 'uniform':
    return np.arange(n, dtype=np.int64) * (T // n)
  if skip_type == 'quadratic':
    return (np.linspace(0, np.sqrt(T * 0.8), n) ** 2).astype(np.int64)
  if skip_type == 'trailing':
    return trailing_timesteps(T, n)
  raise ValueError(f'skip_type must be one of {", ".join(map(repr, SKIP_TYPES))}; '
                   f'got {skip_type!r}.')


def trailing_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """Ascending ``round(T (1 - i / n)) - 1``, i = n-1..0: the grid that ends at T-1.

  diffusers' ``np.round(np.arange(T, 0, -T / n)) - 1``, computed in exact integer
  arithmetic (round half to even, as ``np.round``). Because the values are exact
  rationals T (n - i) / n, the n-step grid is every other point of the 2n-step grid
  (point i of n is point 2i of 2n, counted from T-1) for every T and n: the grids
  of progressive distillation's rounds nest.
  """
  T = int(num_timesteps)
  n = check_int('num_steps', num_steps, 1, T)
  out = []
  for i in range(n):
    q, r = divmod(T * (n - i), n)
    if 2 * r > n or (2 * r == n and q % 2):
      q += 1
    out.append(q - 1)
  return np.asarray(out[::-1], np.int64)


def uniform_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """``num_steps`` ascending timesteps evenly spaced over [0, T-1], both ends included."""
  n = check_int('num_steps', num_steps, 1, num_timesteps)
  if n == 1:
    return np.array([num_timesteps - 1], np.int64)
  return np.round(np.linspace(0, num_timesteps - 1, n)).astype(np.int64)


def respace_schedule(s: Schedule, timesteps: Sequence[int]):
  """The Markov chain that only visits ``timesteps`` (iDDPM §4, ``space_timesteps``).

  beta'_i = 1 - abar_{tau_i} / abar_{tau_{i-1}} (abar_{tau_{-1}} = 1) keeps every
  marginal q(x_{tau_i} | x_0). Needs a concrete (non-traced) schedule.

  Returns:
    (respaced Schedule, wrap) where ``wrap(model_fn)`` maps the new zero-based
    steps back to the original timesteps the model was trained on.
  """
  tau = np.asarray(timesteps, np.int64)
  if tau.ndim != 1 or tau.size < 1 or np.any(np.diff(tau) <= 0):
    raise ValueError(f'timesteps must be strictly increasing; got {tau}.')
  abar = np.cumprod(1.0 - np.asarray(s.betas, np.float64))[tau]
  betas = 1.0 - abar / np.append(1.0, abar[:-1])
  new = schedule_from_betas(betas, dtype=s.betas.dtype)
  tau_j = jnp.asarray(tau, jnp.int32)

  def wrap(model_fn: ModelFn) -> ModelFn:
    return lambda x, t: model_fn(x, tau_j[t])

  return new, wrap


def snapshot_steps(num_timesteps: int, num_snapshots: int) -> np.ndarray:
  """Zero-based timesteps of K snapshots evenly spaced along the chain, descending.

  They include the first step T-1 and the last step 0 (K == 1: only the last).
  """
  T = num_timesteps
  k = check_int('num_snapshots', num_snapshots, 1, T)
  if k == 1:
    return np.zeros(1, np.int64)
  pos = np.round(np.linspace(0, T - 1, k)).astype(np.int64)   # positions along the chain
  assert np.unique(pos).size == k, pos
  return (T - 1) - pos
