"""Controllable generation with a trained model: inpainting (RePaint) and editing (SDEdit).

Neither needs retraining: both steer the reverse chain of an (unconditionally
or class-conditionally) trained DDPM.

* :func:`inpaint` fills the missing pixels of ``x0`` so that the whole image is
  plausible. At every reverse step the known pixels are replaced by a fresh
  sample of q(x_{t-1} | x_0) (eq. 4 of DDPM) and the missing ones come from
  p_theta(x_{t-1} | x_t): Lugmayr et al. 2022, "RePaint", Algorithm 1, lines
  4-8. RePaint also *resamples*: it jumps back up the chain by ``jump_length``
  steps through q(x_{t+j} | x_t) (Algorithm 1, line 10, with the jumps of the
  paper's §4.3 / code ``get_schedule_jump``) and re-denoises, ``resample``
  times, so that the generated part can harmonise with the known part.
  ``method='replace'`` is the baseline without resampling (score_sde's
  "replacement" inpainting, the same walk with ``resample=1``).
* :func:`sdedit` (Meng et al. 2022, "SDEdit", Algorithm 1 with the VP-SDE)
  perturbs ``x0`` to the noise level t0 = strength x T with q(x_{t0} | x_0)
  and runs a sampler of :mod:`diffusion_jax.sampling` from there to x_0: small
  strengths keep the input's content, strength 1 forgets it.

Each is one ``jax.lax.scan`` (the RePaint walk, resampling and jumps included,
is a static NumPy array of moves scanned over); :mod:`diffusion_jax.runner`
jits them with the batch axis sharded, as it does the samplers.

Masks (``known``): bool, True where a pixel is kept from the original, with
the images' layout ``[B, H, W, C]`` (NHWC) or any shape that broadcasts to it
(e.g. ``[H, W, 1]``). The builders (:func:`region_mask`, :func:`random_mask`,
:func:`mask_from_image`, :func:`known_mask`) keep or drop a pixel in all its
channels together. Images are in [-1, 1]; timesteps are zero-based (index t is
the paper's step t + 1), as everywhere in the project.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import config_lib
from diffusion_jax import samplers
from diffusion_jax import sampling
from diffusion_jax import timesteps
from diffusion_jax.diffusion import ModelFn
from diffusion_jax.schedule import Schedule

MISSING = config_lib.INPAINT_MISSING   # inpaint.missing
INPAINT_METHODS = config_lib.INPAINT_METHODS
EDIT_SAMPLERS = samplers.SEGMENT_SAMPLERS

# Streams of randomness folded into the caller's key.
_RNG_START, _RNG_WALK = 0x57A, 0x3A1C

__all__ = [
    'MISSING', 'INPAINT_METHODS', 'EDIT_SAMPLERS', 'region_mask', 'random_mask',
    'mask_from_image', 'known_mask', 'repaint_walk', 'inpaint', 'segment_timesteps',
    'segment_num_steps', 'edit_start_index', 'sdedit',
]


# --- masks: True where a pixel is kept ---------------------------------------------------


def _choice(field, value, allowed):
  if value not in allowed:
    raise ValueError(f'{field}={value!r} is not supported; allowed values: '
                     f'{", ".join(map(str, allowed))}.')


def region_mask(missing: str, height: int, width: int) -> np.ndarray:
  """bool ``[H, W]``, True where kept, for a fixed missing region.

  ``bottom_half`` drops rows ``>= H // 2``, ``top_half`` rows ``< H // 2``,
  ``right_half`` / ``left_half`` the columns likewise; ``center`` drops the
  central square of half the side (rows and columns ``H // 4 .. H // 4 + H // 2``).
  """
  _choice('inpaint.missing', missing, MISSING[:5])
  known = np.ones((height, width), bool)
  h2, w2 = height // 2, width // 2
  if missing == 'bottom_half':
    known[h2:] = False
  elif missing == 'top_half':
    known[:h2] = False
  elif missing == 'right_half':
    known[:, w2:] = False
  elif missing == 'left_half':
    known[:, :w2] = False
  else:
    h4, w4 = height // 4, width // 4
    known[h4:h4 + h2, w4:w4 + w2] = False
  return known


def random_mask(rng, batch: int, height: int, width: int, fraction: float) -> np.ndarray:
  """bool ``[B, H, W, 1]``: each image misses exactly ``round(fraction * H * W)`` random pixels.

  The pixels of image b are a uniform random subset drawn with ``fold_in(rng, b)``,
  so an image's mask does not depend on the batch it is in.
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f'inpaint.random_fraction must be in (0, 1), got {fraction!r}.')
  k = int(round(fraction * height * width))

  def one(b):
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(jax.random.fold_in(rng, b),
                                                      (height * width,))))
    return (rank >= k).reshape(height, width, 1)

  return np.asarray(jax.vmap(one)(jnp.arange(batch)))


def mask_from_image(image, height: int, width: int) -> np.ndarray:
  """bool ``[H, W]`` from a mask image (uint8 ``[H, W]`` or ``[H, W, C]``): white (>= 128) = known.

  A bool image is taken as it is. Raises ValueError when its size is not the
  images' ``H x W``.
  """
  image = np.asarray(image)
  if image.dtype == bool:
    image = np.where(image, 255, 0)
  if image.ndim == 3:
    image = image.mean(axis=-1)
  if image.ndim != 2 or image.shape != (height, width):
    got = 'x'.join(map(str, image.shape[:2])) if image.ndim >= 2 else str(image.shape)
    raise ValueError(f'inpaint.mask_path: the mask is {got} pixels, but the images are '
                     f'{height}x{width} (data.image_size); give a mask of {height}x{width} '
                     'pixels (white = known).')
  return image >= 128


def known_mask(missing: str, shape, *, rng=None, fraction: float = 0.5,
               mask: Optional[np.ndarray] = None) -> np.ndarray:
  """The mask of ``--mode inpaint`` as bool ``[B, H, W, C]`` (``shape``), True where kept.

  ``missing``: a region of :func:`region_mask`, ``'random'`` (:func:`random_mask`
  with ``rng`` and ``fraction``) or ``'mask'`` (``mask``, an image for
  :func:`mask_from_image`).
  """
  _choice('inpaint.missing', missing, MISSING)
  b, h, w, c = shape
  if missing == 'random':
    if rng is None:
      raise ValueError("missing='random' needs rng.")
    known = random_mask(rng, b, h, w, fraction)
  elif missing == 'mask':
    if mask is None:
      raise ValueError("missing='mask' needs the mask image (inpaint.mask_path).")
    known = mask_from_image(mask, h, w)[None, :, :, None]
  else:
    known = region_mask(missing, h, w)[None, :, :, None]
  return np.broadcast_to(known, (b, h, w, c)).copy()


# --- RePaint (Lugmayr et al. 2022, Algorithm 1) --------------------------------------------


def repaint_walk(num_steps: int, resample: int, jump_length: int) -> np.ndarray:
  """RePaint's time walk: int ``[L, 2]`` moves ``(t, t_next)`` over zero-based timesteps.

  ``t_next == t - 1`` is a reverse (denoising) step from x at timestep t
  (``t_next == -1``: to x_0); ``t_next > t`` a jump back up the chain by
  ``jump_length`` steps. This is the schedule of RePaint's code
  (``get_schedule_jump``): going down from T-1, every ``jump_length``-th
  timestep j (``j = 0, jump_length, ...`` below ``T - jump_length``) is
  revisited ``resample - 1`` more times by jumping from j to j + jump_length
  and denoising again. ``resample=1`` is plain reverse sampling (T moves);
  ``jump_length=1`` is Algorithm 1's resampling at every step.
  """
  t_max = int(num_steps)
  u = timesteps.check_int('inpaint.resample', resample, 1, 10**6)
  j = timesteps.check_int('inpaint.jump_length', jump_length, 1, max(t_max, 1))
  jumps = {k: u - 1 for k in range(0, t_max - j, j)}
  moves, t = [], t_max - 1
  while t >= 0:
    moves.append((t, t - 1))
    t -= 1
    if jumps.get(t, 0) > 0:
      jumps[t] -= 1
      moves.append((t, t + j))
      t += j
  return np.asarray(moves, np.int64).reshape(-1, 2)


def _walk_schedule(s: Schedule, model_fn: ModelFn, num_steps: Optional[int]):
  """The (schedule, model_fn) of a walk on ``num_steps`` evenly spaced timesteps (None: all T)."""
  T = s.num_timesteps
  if num_steps is None or int(num_steps) == T:
    return s, model_fn
  n = timesteps.check_int('num_steps', num_steps, 1, T)
  s, wrap = sampling.respace_schedule(s, sampling.uniform_timesteps(T, n))
  return s, wrap(model_fn)


def inpaint(s: Schedule, model_fn: ModelFn, rng, x0, known, *, method: str = 'repaint',
            resample: int = 10, jump_length: int = 10, num_steps: Optional[int] = None,
            eta: Optional[float] = None, mean_type: str = 'eps', var_type: str = 'fixed_large',
            clip_denoised: bool = True):
  """Fills the pixels of ``x0`` where ``known`` is False (RePaint, Algorithm 1), as one scan.

  Args:
    s: the diffusion schedule (concrete when ``num_steps`` respaces it).
    model_fn: ``model_fn(x_t, t) -> output`` (:mod:`diffusion_jax.sampling`).
    rng: a PRNG key; the start x_T and every move's noise are folded from it.
    x0: the images, ``[B, H, W, C]`` in [-1, 1] (their missing pixels are ignored).
    known: bool, True where kept, broadcastable to ``x0`` (module docstring).
    method: ``'repaint'`` (resampling with ``resample`` and ``jump_length``,
      :func:`repaint_walk`) or ``'replace'`` (no resampling: the score_sde
      baseline).
    num_steps: run the walk on this many evenly spaced timesteps of a
      respaced schedule (:func:`sampling.respace_schedule`; RePaint uses 250
      of 1000); None: all T.
    eta: None: each reverse move is the ancestral step (Algorithm 1);
      a number: a DDIM step (Song et al. 2021, eq. 12) with this eta, from
      abar_t to abar_{t-1} of the walk's schedule (``eta=0`` is deterministic:
      the jumps alone add noise).

  Each reverse move t -> t-1 is (Algorithm 1, lines 4-8)
    x_known = sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1}) eps   (x0 itself at t = 0),
    x_unknown ~ p_theta(x_{t-1} | x_t)                          (:func:`sampling.p_sample`),
    x_{t-1} = known * x_known + (1 - known) * x_unknown;
  each jump t -> t + j draws x_{t+j} ~ q(x_{t+j} | x_t)
  = N(sqrt(abar_{t+j} / abar_t) x_t, (1 - abar_{t+j} / abar_t) I), which is
  the j one-step diffusions of line 10 composed.

  Returns:
    x_0, ``x0``'s shape; equal to ``x0`` where ``known`` (in float, exactly).
  """
  _choice('inpaint.method', method, INPAINT_METHODS)
  x0 = jnp.asarray(x0)
  known = jnp.broadcast_to(jnp.asarray(known, bool), x0.shape)
  s, model_fn = _walk_schedule(s, model_fn, num_steps)
  walk = repaint_walk(s.num_timesteps, resample if method == 'repaint' else 1, jump_length)
  abar = s.alphas_cumprod

  def abar_at(t):   # abar_t, with abar_{-1} = 1 (x_0)
    return jnp.where(t >= 0, abar[jnp.maximum(t, 0)], 1.0)

  def reverse(x, t, t_next, key):
    step_key, known_key = jax.random.split(key)
    a = abar_at(t_next)
    if eta is None:
      x_unknown, _ = sampling.p_sample(s, model_fn, x, t, step_key, mean_type=mean_type,
                                       var_type=var_type, clip_denoised=clip_denoised)
    else:
      t_vec = timesteps.batch_t(t, x)
      x_unknown, _ = sampling.ddim_step(
          s, model_fn(x, t_vec).astype(x.dtype), x, t_vec, abar[t], a, eta,
          jax.random.normal(step_key, x.shape, x.dtype), mean_type=mean_type,
          clip_denoised=clip_denoised)
    x_known = (jnp.sqrt(a) * x0
               + jnp.sqrt(1.0 - a) * jax.random.normal(known_key, x0.shape, x0.dtype))
    return jnp.where(known, x_known.astype(x.dtype), x_unknown)

  def jump(x, t, t_next, key):
    ratio = abar[t_next] / abar[t]
    noise = jax.random.normal(key, x.shape, x.dtype)
    return (jnp.sqrt(ratio) * x + jnp.sqrt(1.0 - ratio) * noise).astype(x.dtype)

  walk_key = jax.random.fold_in(rng, _RNG_WALK)

  def body(x, move):
    i, t, t_next = move
    key = jax.random.fold_in(walk_key, i)
    return jax.lax.cond(t_next > t, jump, reverse, x, t, t_next, key), None

  x_T = jax.random.normal(jax.random.fold_in(rng, _RNG_START), x0.shape, x0.dtype)
  moves = (jnp.arange(len(walk), dtype=jnp.int32), jnp.asarray(walk[:, 0], jnp.int32),
           jnp.asarray(walk[:, 1], jnp.int32))
  x, _ = jax.lax.scan(body, x_T, moves)
  return jnp.where(known, x0, x)


# --- SDEdit (Meng et al. 2022) -----------------------------------------------------------


def edit_start_index(num_timesteps: int, strength: float) -> int:
  """The zero-based timestep t0 the edit starts from: ``round(strength * T) - 1``, at least 0.

  ``strength=1`` is T-1, the top of the chain.
  """
  if isinstance(strength, bool) or not 0.0 < strength <= 1.0:
    raise ValueError(f'edit.strength must be in (0, 1] (t0 = strength x T), got {strength!r}.')
  return max(int(round(float(strength) * num_timesteps)) - 1, 0)


def segment_num_steps(num_steps: int, num_timesteps: int, t0: int) -> int:
  """``sampling.num_steps`` scaled to the segment [0, t0]: ``max(1, round(num_steps (t0+1) / T))``."""
  return max(1, min(t0 + 1, int(round(num_steps * (t0 + 1) / num_timesteps))))


def segment_timesteps(t0: int, num_steps: Optional[int] = None,
                      skip_type: str = 'uniform') -> np.ndarray:
  """Ascending zero-based timesteps from 0 to ``t0`` (both included) that an edit visits.

  None: every timestep (the ancestral chain). Otherwise ``num_steps`` of them
  spaced as :func:`sampling.ddim_timesteps` spaces the full chain: ``uniform``
  evenly, ``quadratic`` as ``linspace(0, sqrt(t0), n) ** 2`` (dense near 0);
  repeats after rounding are dropped. One step is ``[t0]``.
  """
  t0 = int(t0)
  if num_steps is None or int(num_steps) >= t0 + 1:
    return np.arange(t0 + 1, dtype=np.int64)
  n = timesteps.check_int('num_steps', num_steps, 1, t0 + 1)
  if n == 1:
    return np.array([t0], np.int64)
  _choice('sampling.skip_type', skip_type, sampling.SKIP_TYPES)
  if skip_type == 'uniform':
    tau = np.round(np.linspace(0, t0, n))
  else:
    tau = np.round(np.linspace(0, np.sqrt(t0), n) ** 2)
  return np.unique(tau.astype(np.int64))


def sdedit(s: Schedule, model_fn: ModelFn, rng, x0, *, strength: float,
           sampler: str = 'ancestral', num_steps: Optional[int] = None, mean_type: str = 'eps',
           clip_denoised: bool = True, skip_type: str = 'uniform', var_type: str = 'fixed_large',
           eta: float = 0.0, order: int = 2, snr: float = 0.16, num_corrector_steps: int = 1,
           spec: Optional[samplers.SamplerSpec] = None):
  """SDEdit (Meng et al. 2022, Algorithm 1): perturb ``x0`` to t0 = strength x T, then denoise.

  x_{t0} = sqrt(abar_{t0}) x0 + sqrt(1 - abar_{t0}) z (eq. 4 of DDPM; the
  VP-SDE's perturbation kernel), then the reverse chain from t0 to x_0 with
  ``sampler`` (``ancestral``, ``ddim``, ``pc`` or ``dpm_solver``) on the
  timesteps :func:`segment_timesteps` ``(t0, num_steps, skip_type)``: the
  schedule is respaced onto them (:func:`sampling.respace_schedule`, which
  keeps every marginal), and the sampler's own loop runs every step of the
  respaced chain with ``x_T = x_{t0}``. ``strength=1`` starts from x_T = z,
  exactly the sampler's prior N(0, I), so the output does not depend on ``x0``
  (it equals the plain sampler's output for that x_T).

  Args:
    s: the schedule (concrete: it is respaced in NumPy).
    model_fn: ``model_fn(x_t, t) -> output``.
    rng: PRNG key; z from ``fold_in(rng, 0x57A)``, the chain's noise from ``rng``
      as in the samplers.
    x0: ``[B, H, W, C]`` in [-1, 1].
    strength: in (0, 1]; t0 = :func:`edit_start_index`.
    num_steps: model calls on [0, t0] for ddim / pc / dpm_solver (None: every
      timestep); the ancestral sampler visits every timestep.
    var_type, eta, order, snr, num_corrector_steps: the sampler's options:
      ``var_type`` (ancestral, pc), ``eta`` (ddim), ``order`` (dpm_solver),
      ``snr`` and ``num_corrector_steps`` (pc).
    spec: instead of ``sampler`` and its options, a :class:`samplers.SamplerSpec`
      of the table (its ``num_steps`` are the model calls on [0, t0]; 0: every
      timestep).

  Returns:
    The edited images, ``x0``'s shape.
  """
  if spec is None:
    spec = samplers.SamplerSpec(
        name=sampler, num_steps=0, mean_type=mean_type, var_type=var_type,
        clip_denoised=clip_denoised, eta=eta, skip_type=skip_type, order=order, snr=snr,
        corrector_steps=num_corrector_steps, rtol=1e-5, atol=1e-5)
    if num_steps is not None:
      spec = spec.replace(num_steps=int(num_steps))
  samplers.check_name(spec.name, 'sampling.sampler', samplers.SEGMENT_SAMPLERS)
  T = s.num_timesteps
  t0 = edit_start_index(T, strength)
  steps = None if spec.name == 'ancestral' or not spec.num_steps else spec.num_steps
  tau = segment_timesteps(t0, steps, spec.skip_type)
  x0 = jnp.asarray(x0)
  z = jax.random.normal(jax.random.fold_in(rng, _RNG_START), x0.shape, x0.dtype)
  if t0 == T - 1 and float(strength) == 1.0:
    x_t0 = z
  else:
    a = s.alphas_cumprod[t0]
    x_t0 = (jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * z).astype(x0.dtype)
  seg, wrap = sampling.respace_schedule(s, tau)
  n = len(tau)
  # The sampler runs every step of the respaced segment; one step (t0 = 0) adds no
  # noise, so its variance is unused ('fixed_large' needs T >= 2).
  spec = spec.replace(num_steps=n, skip_type='uniform',
                      var_type='fixed_small' if n == 1 else spec.var_type)
  return samplers.run(spec, seg, wrap(model_fn), rng, x0.shape, x_T=x_t0)[0]
