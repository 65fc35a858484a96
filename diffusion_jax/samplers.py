"""The sampler table: every reverse-process sampler behind one name and one signature.

A :class:`SamplerSpec` names a sampler and carries every option any sampler
reads; :data:`SAMPLERS` maps each name to a function

    ``fn(spec, s, model_fn, rng, shape, x_T) -> (x_0, nfe)``

with ``nfe`` the number of model calls (an int32 scalar: fixed for the
scanned chains, what the adaptive solver needed for the ODE). :func:`run` is
the one entry point; the command line, the evaluation parts, the editing
walks and :class:`diffusion_jax.pipeline.Pipeline` all sample through it, so
a sampler added here is available everywhere.

| name | chain | model calls |
|---|---|---|
| ``ancestral`` | DDPM Algorithm 2 over all T steps, or respaced onto ``num_steps`` < T (Nichol & Dhariwal 2021, §4) | T or ``num_steps`` |
| ``ddim`` | DDIM (Song, Meng & Ermon 2021, eq. 12), ``eta`` | ``num_steps`` |
| ``dpm_solver`` | DPM-Solver++ multistep (Lu et al. 2022), ``order`` | ``num_steps`` |
| ``pc`` | predictor-corrector (Song et al. 2021, Algorithm 3), ``snr``, ``corrector_steps`` | ``num_steps`` (1 + ``corrector_steps``) |
| ``ode`` | the probability-flow ODE (eq. 13), adaptive, ``rtol`` / ``atol`` | adaptive |

The spec is built from a config in one place, :func:`diffusion_jax.settings.sampler_spec`;
this module never reads a config.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp

from diffusion_jax import sampling
from diffusion_jax import sde
from diffusion_jax import timesteps
from diffusion_jax.diffusion import ModelFn
from diffusion_jax.schedule import Schedule


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """A sampler and all its options (hashable: compiled functions are cached on it).

  Attributes:
    name: a key of :data:`SAMPLERS`.
    num_steps: model calls on the grid (ddim, dpm_solver, pc); ancestral: 0 or
      T runs every step, 0 < n < T the respaced chain of n steps; ode: unused.
    mean_type, var_type, clip_denoised: the model's parameterisation
      (``diffusion.*``); DPM-Solver++ and the ODE never clip.
    eta: DDIM's stochasticity (0: deterministic).
    skip_type: the grid of ddim / dpm_solver (:func:`timesteps.ddim_timesteps`).
    order: DPM-Solver++'s multistep order, 1..3 (1 is DDIM with eta 0).
    snr, corrector_steps: the Langevin corrector of pc.
    rtol, atol: the ODE solver's tolerances.
  """
  name: str
  num_steps: int
  mean_type: str
  var_type: str
  clip_denoised: bool
  eta: float
  skip_type: str
  order: int
  snr: float
  corrector_steps: int
  rtol: float
  atol: float

  def replace(self, **changes) -> 'SamplerSpec':
    return dataclasses.replace(self, **changes)

  def calls(self, num_timesteps: int) -> int | None:
    """Model calls of one chain (None for the adaptive ODE)."""
    if self.name == 'ode':
      return None
    if self.name == 'ancestral':
      return self.num_steps if 0 < self.num_steps < num_timesteps else num_timesteps
    if self.name == 'pc':
      return self.num_steps * (1 + self.corrector_steps)
    return self.num_steps

  def tag(self, num_timesteps: int) -> str:
    """The steps part of a file name: ``100``, ``10_order2`` (DPM-Solver++), ``rtol1e-05`` (ODE)."""
    if self.name == 'ode':
      return f'rtol{self.rtol:g}'
    steps = self.calls(num_timesteps) if self.name == 'ancestral' else self.num_steps
    return f'{steps}_order{self.order}' if self.name == 'dpm_solver' else str(steps)


Sampler = Callable[..., tuple]   # (spec, s, model_fn, rng, shape, x_T) -> (x_0, nfe)


def _ancestral(spec: SamplerSpec, s: Schedule, model_fn: ModelFn, rng, shape, x_T):
  n = spec.num_steps
  if 0 < n < s.num_timesteps:   # respaced (iDDPM §4): n steps, n model calls
    s, wrap = timesteps.respace_schedule(s, timesteps.uniform_timesteps(s.num_timesteps, n))
    model_fn = wrap(model_fn)
  x = sampling.p_sample_loop(s, model_fn, rng, shape, mean_type=spec.mean_type,
                             var_type=spec.var_type, clip_denoised=spec.clip_denoised, x_T=x_T)
  return x, jnp.int32(s.num_timesteps)


def _ddim(spec: SamplerSpec, s: Schedule, model_fn: ModelFn, rng, shape, x_T):
  x = sampling.ddim_sample_loop(s, model_fn, rng, shape, num_steps=spec.num_steps, eta=spec.eta,
                                skip_type=spec.skip_type, mean_type=spec.mean_type,
                                clip_denoised=spec.clip_denoised, x_T=x_T)
  return x, jnp.int32(spec.num_steps)


def _dpm_solver(spec: SamplerSpec, s: Schedule, model_fn: ModelFn, rng, shape, x_T):
  x = sampling.dpm_solver_sample_loop(s, model_fn, rng, shape, num_steps=spec.num_steps,
                                      order=spec.order, skip_type=spec.skip_type,
                                      mean_type=spec.mean_type, clip_denoised=False, x_T=x_T)
  return x, jnp.int32(spec.num_steps)


def _pc(spec: SamplerSpec, s: Schedule, model_fn: ModelFn, rng, shape, x_T):
  x = sampling.pc_sample_loop(s, model_fn, rng, shape, num_steps=spec.num_steps, snr=spec.snr,
                              num_corrector_steps=spec.corrector_steps, mean_type=spec.mean_type,
                              var_type=spec.var_type, clip_denoised=spec.clip_denoised, x_T=x_T)
  return x, jnp.int32(spec.num_steps * (1 + spec.corrector_steps))


def _ode(spec: SamplerSpec, s: Schedule, model_fn: ModelFn, rng, shape, x_T):
  """The probability-flow ODE (no clipping); nfe is what the adaptive solver needed."""
  return sde.probability_flow_sample(s, model_fn, rng, shape, rtol=spec.rtol, atol=spec.atol,
                                     mean_type=spec.mean_type, x_T=x_T)


SAMPLERS: dict[str, Sampler] = {
    'ancestral': _ancestral,
    'ddim': _ddim,
    'pc': _pc,
    'dpm_solver': _dpm_solver,
    'ode': _ode,
}
# The samplers that can run a segment [0, t0] of the chain from a given x_t0 (SDEdit).
SEGMENT_SAMPLERS = ('ancestral', 'ddim', 'pc', 'dpm_solver')


def check_name(name: str, field: str = 'sampling.sampler', allowed=tuple(SAMPLERS)) -> str:
  """``name`` if it is in ``allowed``, else ValueError naming ``field`` and the allowed values."""
  if name not in allowed:
    raise ValueError(f'{field}={name!r} is not supported; allowed values: {", ".join(allowed)}.')
  return name


def run(spec: SamplerSpec, s: Schedule, model_fn: ModelFn, rng, shape, *, x_T=None):
  """Samples x_0 of ``shape`` with ``spec``'s sampler: ``(x_0, nfe)``.

  ``x_T`` (default: drawn from ``rng`` as every sampler of
  :mod:`diffusion_jax.sampling` draws it) is x at the top of the sampler's chain.
  """
  return SAMPLERS[check_name(spec.name)](spec, s, model_fn, rng, tuple(shape), x_T)
