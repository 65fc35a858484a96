"""Settings: the config read once, into validated values the library takes.

The entry points (the command line, :func:`diffusion_jax.load`) turn a
config into the settings below before any checkpoint is restored or anything
is compiled; every bad value ends there, in one sentence naming the key.
Below them, functions take the settings they need, never the whole config,
and the defaults live in one place, :func:`config_lib.base_config`.

* :func:`sampler_spec` -> :class:`samplers.SamplerSpec` (``sampling.*`` and ``diffusion.*``);
* :func:`conditioning` -> :class:`guidance.Conditioning` (``model.num_classes``, ``sampling.class_label``,
  ``sampling.guidance_scale``);
* :func:`image_shape`;
* :func:`inpaint_settings`, :func:`edit_settings` (sections ``inpaint``, ``edit``);
* :func:`eval_settings` (section ``eval``: its parts, sample sets and lists parsed).
"""

from __future__ import annotations

import dataclasses
import math
import re

from diffusion_jax import guidance
from diffusion_jax import samplers


def positive_numbers(field: str, spec, kind=int) -> tuple:
  """``'5,10,20'`` -> ``(5, 10, 20)``; ValueError naming ``field`` on anything not positive."""
  items = [s.strip() for s in str(spec or '').split(',') if s.strip()]
  try:
    values = [kind(s) for s in items]
  except ValueError:
    values = []
  if not values or any(not v > 0 for v in values):
    raise ValueError(f'{field}={spec!r} must be a comma-separated list of positive numbers, '
                     'e.g. "5,10,20,50,100".')
  return tuple(values)


def guidance_scales(field: str, spec) -> tuple:
  """``'0,0.5,1'`` -> ``(0.0, 0.5, 1.0)``; ValueError naming ``field`` unless every value is finite and >= 0."""
  items = [s.strip() for s in str(spec or '').split(',') if s.strip()]
  try:
    scales = [float(s) for s in items]
  except ValueError:
    scales = []
  if not scales or any(not (math.isfinite(w) and w >= 0) for w in scales):
    raise ValueError(f'{field}={spec!r} must be a comma-separated list of numbers >= 0, '
                     'e.g. "0,0.5,1,2,3".')
  return tuple(scales)


# --- sampling -----------------------------------------------------------------------------


def sampler_spec(config) -> samplers.SamplerSpec:
  """The sampler ``config.sampling`` asks for, with the model's ``diffusion`` parameterisation.

  The ancestral sampler's steps are ``sampling.ancestral_steps`` (0: all T);
  ``sampling.num_steps`` is the others' model calls.
  """
  sc, dc = config.sampling, config.diffusion
  samplers.check_name(sc.sampler)
  ancestral = sc.sampler == 'ancestral'
  return samplers.SamplerSpec(
      name=sc.sampler, num_steps=int(sc.ancestral_steps if ancestral else sc.num_steps),
      mean_type=dc.mean_type, var_type=dc.var_type, clip_denoised=bool(dc.clip_denoised),
      eta=float(sc.eta), skip_type=sc.skip_type, order=int(sc.solver_order),
      snr=float(sc.pc_snr), corrector_steps=int(sc.pc_corrector_steps),
      rtol=float(sc.ode_rtol), atol=float(sc.ode_atol))


def conditioning(config) -> guidance.Conditioning:
  """``model.num_classes``, ``sampling.class_label`` and ``sampling.guidance_scale``."""
  return guidance.Conditioning(num_classes=int(config.model.num_classes or 0),
                               class_label=int(config.sampling.class_label),
                               guidance_scale=float(config.sampling.guidance_scale))


def image_shape(config) -> tuple:
  """``(H, W, C)`` of the config's images."""
  d = config.data
  return (int(d.image_size), int(d.image_size), int(d.num_channels))


# --- inpainting and editing ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Inpaint:
  """Section ``inpaint``: the RePaint walk (Lugmayr et al. 2022) and the region to fill."""
  method: str
  resample: int
  jump_length: int       # capped at the walk's steps
  num_steps: int         # the walk's evenly spaced timesteps (at most T)
  eta: float | None      # None: the ancestral step; a number: DDIM steps with this eta
  missing: str
  random_fraction: float
  mask_path: str
  num_images: int
  split: str
  input: str


def inpaint_settings(config) -> Inpaint:
  """``inpaint.*``: ``num_steps`` 0 means all T; ``eta`` -1 the ancestral step."""
  ic, T = config.inpaint, int(config.diffusion.num_timesteps)
  steps = min(int(ic.num_steps or 0) or T, T)
  eta = float(ic.eta)
  return Inpaint(method=ic.method, resample=int(ic.resample),
                 jump_length=min(int(ic.jump_length), steps), num_steps=steps,
                 eta=eta if eta >= 0 else None, missing=ic.missing,
                 random_fraction=float(ic.random_fraction), mask_path=ic.mask_path,
                 num_images=int(ic.num_images), split=ic.split, input=ic.input)


@dataclasses.dataclass(frozen=True)
class Edit:
  """Section ``edit``: SDEdit's strength (t0 = strength x T) and its images."""
  strength: float
  num_images: int
  split: str
  input: str


def edit_settings(config) -> Edit:
  ec = config.edit
  return Edit(strength=float(ec.strength), num_images=int(ec.num_images), split=ec.split,
              input=ec.input)


# --- evaluation ---------------------------------------------------------------------------

# --mode eval's parts, in the order they run (diffusion_jax/evaluation/evaluate.py).
EVAL_PARTS = ('bpd', 'rd', 'figures', 'fid', 'classifier', 'guidance', 'ode_bpd', 'nfe_curve')


@dataclasses.dataclass(frozen=True)
class Eval:
  """Section ``eval``, parsed: the parts to run and the lists they iterate over."""
  parts: tuple
  sample_sets: tuple        # ((label, sampler, steps), ...)
  nfe_calls: tuple
  nfe_ode_rtols: tuple
  guidance_scales: tuple


def parse_parts(spec) -> tuple:
  """``'bpd,rd'`` -> ``('bpd', 'rd')`` in :data:`EVAL_PARTS` order; ValueError on unknown names."""
  names = [p.strip() for p in str(spec or '').split(',') if p.strip()]
  bad = [p for p in names if p not in EVAL_PARTS]
  if bad:
    raise ValueError(f'eval.parts: unknown part(s) {bad}; allowed: {", ".join(EVAL_PARTS)}.')
  return tuple(p for p in EVAL_PARTS if p in names)


def parse_sample_sets(spec, num_timesteps: int) -> tuple:
  """``'ancestral,ddim50,pc100'`` -> ``(('ancestral', 'ancestral', T), ('ddim50', 'ddim', 50), ...)``.

  ``ancestral`` always runs T steps; ``ddim<N>`` / ``pc<N>`` run N steps (clamped
  to T, the label then names the steps actually run). ValueError on bad names.
  """
  out = []
  for item in [s.strip() for s in str(spec or '').split(',') if s.strip()]:
    m = re.fullmatch(r'(ancestral|ddim|pc)(\d*)', item)
    if not m or (m.group(1) == 'ancestral') == bool(m.group(2)):
      raise ValueError(f'eval.sample_sets: bad entry {item!r}; use ancestral, ddim<steps> or '
                       'pc<steps> (e.g. "ancestral,ddim50").')
    kind = m.group(1)
    steps = num_timesteps if kind == 'ancestral' else min(int(m.group(2)), num_timesteps)
    if steps < 1:
      raise ValueError(f'eval.sample_sets: {item!r} needs at least one step.')
    out.append((kind if kind == 'ancestral' else f'{kind}{steps}', kind, steps))
  return tuple(out)


def eval_settings(config) -> Eval:
  """``eval.*`` parsed and checked: parts, sample sets, ``nfe_calls``, ``nfe_ode_rtols``, ``guidance_scales``."""
  ev = config.eval
  return Eval(parts=parse_parts(ev.parts),
              sample_sets=parse_sample_sets(ev.sample_sets, int(config.diffusion.num_timesteps)),
              nfe_calls=positive_numbers('eval.nfe_calls', ev.nfe_calls),
              nfe_ode_rtols=positive_numbers('eval.nfe_ode_rtols', ev.nfe_ode_rtols, float),
              guidance_scales=guidance_scales('eval.guidance_scales', ev.guidance_scales))


def check(config, mode: str) -> None:
  """Every setting ``mode`` reads, parsed once so that a bad value ends before any work."""
  sampler_spec(config)
  conditioning(config)
  if mode == 'eval':
    eval_settings(config)
  elif mode == 'inpaint':
    inpaint_settings(config)
  elif mode == 'edit':
    edit_settings(config)


def make_sampler(config, s, apply_fn, *, batch_size=None, devices=None, with_nfe: bool = False):
  """:func:`runner.make_sampler` for the sampler, conditioning and image shape ``config`` asks for.

  ``batch_size`` defaults to ``sampling.batch_size``.
  """
  from diffusion_jax import runner  # pylint: disable=g-import-not-at-top
  batch = int(batch_size if batch_size is not None else config.sampling.batch_size)
  return runner.make_sampler(sampler_spec(config), conditioning(config), s, apply_fn,
                             (batch,) + image_shape(config), devices=devices, with_nfe=with_nfe)
