"""The Python API: load a trained model and call it (``diffusion_jax.load``, :class:`Pipeline`).

    import diffusion_jax
    pipe = diffusion_jax.load('runs/digits')          # a workdir, or a diffusers UNet2DModel folder
    images = pipe.sample(64, sampler='dpm_solver', num_steps=10, seed=0)   # uint8 [64, H, W, C]

A workdir brings its own config (``DIR/config.json``, the one it was trained
with) and its newest finished checkpoint (or ``step``); keyword overrides
(``load(path, **{'sampling.num_steps': 10})`` or ``load(path, sampling=dict(num_steps=10))``)
apply on top of it, as ``--config.section.key=value`` does on the command
line, and a change of the network or the schedule is refused.

Every method calls the functions the command-line modes call
(``--mode sample`` draws its images with :meth:`Pipeline.sample_with_labels`;
``--mode inpaint`` / ``--mode edit`` complete and edit with
:meth:`Pipeline.inpaint_float` / :meth:`Pipeline.edit_float`), so the two cannot
disagree. Computations run sharded over the local devices with the compiled
functions cached per sampler, steps and batch: a second call of the same
shape does not compile again. Bad arguments raise ``ValueError`` with one sentence.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from etils import epath
import jax
import ml_collections
import numpy as np

from diffusion_jax import config_lib
from diffusion_jax import editing
from diffusion_jax import images as image_lib
from diffusion_jax import models
from diffusion_jax import runner
from diffusion_jax import schedule as schedule_lib
from diffusion_jax import sde
from diffusion_jax import settings
from diffusion_jax import workdir as workdir_lib
from diffusion_jax.evaluation import bits_per_dim
from diffusion_jax.evaluation import ode_bpd
from diffusion_jax.evaluation import runtime as rt
from diffusion_jax.evaluation import samples

# Streams of randomness folded into PRNGKey(seed) (the command line's modes use the same).
RNG_INPAINT, RNG_EDIT, RNG_BPD = 0x1E9A, 0xED17, 0xB9D
BPD_METHODS = ('bound', 'ode')
INPAINT_OPTIONS = ('resample', 'jump_length', 'num_steps', 'eta')
# The ODE tolerances of encode / decode: tight enough that a round trip gives 8-bit images back.
ROUND_TRIP_TOL = 1e-6


def flatten_overrides(overrides: Mapping[str, Any]) -> dict:
  """``{'sampling.num_steps': 10}`` and ``{'sampling': {'num_steps': 10}}`` -> ``{'sampling.num_steps': 10}``."""
  flat = {}
  for key, value in overrides.items():
    if isinstance(value, Mapping):
      flat.update({f'{key}.{k}': v for k, v in flatten_overrides(value).items()})
    else:
      flat[key.replace('__', '.')] = value
  return flat


def load(path, *, step: Optional[int] = None, use_ema: bool = True, **overrides) -> 'Pipeline':
  """A :class:`Pipeline` of a workdir or a diffusers ``UNet2DModel`` folder.

  Args:
    path: a workdir (its ``config.json`` and a checkpoint; local or ``gs://``),
      or a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``,
      read as ``python -m diffusion_jax.convert from-diffusers`` reads it).
    step: the checkpoint to load (default: the newest finished one).
    use_ema: the exponential moving average of the parameters (DDPM App. B) or
      the raw ones.
    **overrides: config keys set on top of the saved config, dotted
      (``**{'sampling.num_steps': 10}``), nested (``sampling=dict(num_steps=10)``)
      or with ``__`` (``sampling__num_steps=10``).
  """
  flat = flatten_overrides(overrides)
  path = workdir_lib.as_path(path)
  if _is_diffusers_folder(path):
    from diffusion_jax import interop  # pylint: disable=g-import-not-at-top
    config, params = interop.load_diffusers_unet(path, config_lib.digits_config())
    config = config_lib.apply_overrides(config_lib.complete(config), flat, trained=True)
    config_lib.validate_config(config)
    params = jax.device_put(params, runner.replicated(runner.make_mesh()))
    return Pipeline(config, params, step=None, source=str(path))
  config = config_lib.apply_overrides(workdir_lib.read_config(path), flat, trained=True)
  return Pipeline.from_workdir(path, config, step=step, use_ema=use_ema)


def _is_diffusers_folder(path: epath.Path) -> bool:
  from diffusion_jax import interop  # pylint: disable=g-import-not-at-top
  return (path / interop.WEIGHTS_NAME).exists() and not (path / 'checkpoints').exists()


def _check_images(images, shape, field: str = 'images') -> np.ndarray:
  """uint8 ``[N, H, W, C]`` of the model's ``(H, W, C)``; ValueError in one sentence otherwise."""
  x = np.asarray(images)
  if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape) or not len(x):
    raise ValueError(f'{field} must be uint8 [N, {", ".join(map(str, shape))}] (NHWC) with N >= 1; '
                     f'got {x.dtype} {list(x.shape)}.')
  return x


def to_float(images_uint8: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1] on the 8-bit grid (``x / 127.5 - 1``)."""
  return np.asarray(images_uint8, np.float32) / 127.5 - 1.0


class Pipeline:
  """A trained model with its config, schedule and parameters, ready to call.

  Attributes:
    config: the config it runs with (the workdir's, with the overrides).
    params: the (EMA) parameters, replicated over the local devices.
    step: the checkpoint's step (None for a diffusers folder).
  """

  def __init__(self, config: ml_collections.ConfigDict, params, *, step: Optional[int] = None,
               source: str = '', module=None, schedule=None):
    settings.check(config, 'sample')
    self.config = config
    self.params = params
    self.step = step
    self.source = source
    self.module = models.create_model(config) if module is None else module
    self.schedule = schedule_lib.schedule_from_config(config) if schedule is None else schedule
    self.image_shape = settings.image_shape(config)
    self._apply_fn = runner.apply_fn_for(self.module)
    self._cache: dict = {}

  @classmethod
  def from_workdir(cls, workdir, config, *, step: Optional[int] = None,
                   use_ema: Optional[bool] = None) -> 'Pipeline':
    """The pipeline of ``workdir``'s checkpoint with ``config`` (the command line's modes use this)."""
    module, schedule, _, step, params = rt.restore_for_eval(
        config, rt.workdir_path(workdir), step=step, use_ema=use_ema)
    return cls(config, params, step=step, source=rt.workdir_path(workdir), module=module,
               schedule=schedule)

  def __repr__(self) -> str:
    return (f'Pipeline({self.source or "in memory"}, step={self.step}, '
            f'image_shape={self.image_shape}, sampler={self.config.sampling.sampler!r})')

  # --- configs of one call -----------------------------------------------------------------

  def _with(self, section: str, options: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """``self.config`` with ``section.key = value`` for every option not None, checked."""
    flat = {f'{section}.{k}': v for k, v in options.items() if v is not None}
    if not flat:
      return self.config
    config = config_lib.apply_overrides(self.config, flat, trained=True)
    config_lib.validate_config(config)
    return config

  def _sampling_config(self, sampler, num_steps, guidance_scale, options):
    name = sampler if sampler is not None else self.config.sampling.sampler
    key = 'ancestral_steps' if name == 'ancestral' else 'num_steps'
    return self._with('sampling', dict(options, sampler=sampler, guidance_scale=guidance_scale,
                                       **{key: num_steps}))

  # --- sampling ------------------------------------------------------------------------------

  def sample(self, num: int, *, seed: int = 0, sampler: Optional[str] = None,
             num_steps: Optional[int] = None, labels=None, guidance_scale: Optional[float] = None,
             **sampling_options) -> np.ndarray:
    """``num`` samples as uint8 ``[num, H, W, C]`` (NumPy).

    Args:
      num: the number of images.
      seed: ``--mode sample --config.seed=seed`` gives the same images.
      sampler: a name of :data:`samplers.SAMPLERS` (default ``sampling.sampler``).
      num_steps: model calls (``sampling.num_steps``; for ``ancestral``,
        ``sampling.ancestral_steps``: fewer than T respaces the chain).
      labels: int32 ``[num]`` classes of a class-conditional model (default:
        ``sampling.class_label``, -1 drawing them uniformly).
      guidance_scale: classifier-free guidance w (``sampling.guidance_scale``).
      **sampling_options: any other key of the ``sampling`` section
        (``eta``, ``skip_type``, ``solver_order``, ``ode_rtol``, ``batch_size``, ...).
    """
    return self.sample_with_labels(num, seed=seed, sampler=sampler, num_steps=num_steps,
                                   labels=labels, guidance_scale=guidance_scale,
                                   **sampling_options)[0]

  def sample_with_labels(self, num: int, *, seed: int = 0, sampler: Optional[str] = None,
                         num_steps: Optional[int] = None, labels=None,
                         guidance_scale: Optional[float] = None, desc: str = 'sampling',
                         **sampling_options):
    """(uint8 images, int32 labels or None) of :meth:`sample`."""
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
      raise ValueError(f'num must be a positive integer, got {num!r}.')
    config = self._sampling_config(sampler, num_steps, guidance_scale, sampling_options)
    cond = settings.conditioning(config)
    if labels is not None:
      labels = self._check_labels(labels, num, cond)
    return samples.generate_labeled_samples(
        settings.sampler_spec(config), cond, self.schedule, self._apply_fn, self.params,
        samples.sample_rng(seed), int(num), image_shape=self.image_shape,
        batch_size=config.sampling.batch_size, labels=labels, desc=desc, cache=self._cache)

  @staticmethod
  def _check_labels(labels, num: int, cond) -> np.ndarray:
    if not cond.conditional:
      raise ValueError('labels are for a class-conditional model (model.num_classes > 0); '
                       'this model is unconditional.')
    y = np.asarray(labels)
    if y.shape != (num,) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or (
        y.max() >= cond.num_classes):
      raise ValueError(f'labels must be integers in [0, {cond.num_classes - 1}] of shape '
                       f'[{num}]; got {y.dtype} {list(y.shape)}.')
    return y.astype(np.int32)

  # --- inpainting and editing ----------------------------------------------------------------

  def _chunk(self, config, n: int) -> int:
    return runner.round_up(min(int(config.sampling.batch_size), n), jax.device_count())

  def _cached(self, key, make):
    if key not in self._cache:
      self._cache[key] = make()
    return self._cache[key]

  def inpaint(self, images, known, *, method: str = 'repaint', seed: int = 0,
              **options) -> np.ndarray:
    """Fills the pixels where ``known`` is False (RePaint, or ``method='replace'``).

    Args:
      images: uint8 ``[N, H, W, C]``.
      known: bool ``[N, H, W]`` or ``[H, W]``, True where a pixel is kept.
      method: ``'repaint'`` or ``'replace'``.
      seed: the key of the walk.
      **options: keys of the ``inpaint`` section (``resample``, ``jump_length``,
        ``num_steps``, ``eta``).

    Returns:
      uint8 ``[N, H, W, C]``, equal to ``images`` where ``known``.
    """
    x = _check_images(images, self.image_shape)
    k = np.asarray(known)
    if k.dtype != np.bool_ or k.shape not in (x.shape[:3], x.shape[1:3]):
      raise ValueError(f'known must be bool [N, H, W] = {list(x.shape[:3])} or [H, W] = '
                       f'{list(x.shape[1:3])}; got {k.dtype} {list(k.shape)}.')
    bad = sorted(set(options) - set(INPAINT_OPTIONS))
    if bad:
      raise ValueError(f'unknown inpaint option(s) {bad}; allowed: {", ".join(INPAINT_OPTIONS)}.')
    config = self._with('inpaint', dict(options, method=method))
    known_nhwc = np.broadcast_to(k[..., None] if k.ndim == 3 else k[None, :, :, None], x.shape)
    out = self.inpaint_float(config, to_float(x), np.ascontiguousarray(known_nhwc), seed=seed)
    return np.where(known_nhwc, x, out)

  def inpaint_float(self, config, x0: np.ndarray, known: np.ndarray, *, seed: int,
                    desc: str = 'inpainting') -> np.ndarray:
    """uint8 completions of float images ``x0`` in [-1, 1] (``known`` bool NHWC), ``config``'s walk."""
    ip, spec = settings.inpaint_settings(config), settings.sampler_spec(config)
    cond, chunk = settings.conditioning(config), self._chunk(config, len(x0))
    fn = self._cached(('inpaint', ip, spec, cond, chunk), lambda: runner.make_inpaint_fn(
        ip, spec, cond, self.schedule, self._apply_fn, batch_size=chunk))
    key = jax.random.fold_in(jax.random.PRNGKey(int(seed)), RNG_INPAINT)
    return run_in_chunks(fn, self.params, key, [x0, known], chunk, desc)

  def edit(self, images, *, strength: float, seed: int = 0, **options) -> np.ndarray:
    """SDEdit (Meng et al. 2022): perturb to t0 = strength x T, then denoise; uint8 ``[N, H, W, C]``.

    ``strength`` in (0, 1]; ``options`` are keys of the ``sampling`` section
    (``sampler``, ``num_steps``, ``eta``, ...), the sampler running the segment [0, t0].
    """
    x = _check_images(images, self.image_shape)
    editing.edit_start_index(self.schedule.num_timesteps, strength)   # (0, 1], or ValueError
    config = self._with('sampling', options)
    return self.edit_float(config, to_float(x), strength=float(strength), seed=seed)

  def edit_float(self, config, x0: np.ndarray, *, strength: float, seed: int,
                 desc: str = 'editing') -> np.ndarray:
    """uint8 SDEdit of float images ``x0`` in [-1, 1] with ``config``'s sampler."""
    spec, cond = settings.sampler_spec(config), settings.conditioning(config)
    chunk = self._chunk(config, len(x0))
    fn = self._cached(('edit', strength, spec, cond, chunk), lambda: runner.make_sdedit_fn(
        strength, spec, cond, self.schedule, self._apply_fn, batch_size=chunk))
    key = jax.random.fold_in(jax.random.PRNGKey(int(seed)), RNG_EDIT)
    return run_in_chunks(fn, self.params, key, [x0], chunk, desc)

  # --- the probability-flow ODE: encode, decode, likelihood -----------------------------------

  def _ode_fn(self, kind: str, batch: int, rtol: float, atol: float):
    tol = dict(rtol=float(rtol), atol=float(atol), mean_type=self.config.diffusion.mean_type)
    s, apply_fn = self.schedule, self._apply_fn

    def encode(params, rng, x, y):
      del rng, y
      return sde.ode_encode(s, lambda xx, t: apply_fn(params, xx, t), x, **tol)[0]

    def decode(params, rng, z, y):
      del y
      return sde.probability_flow_sample(s, lambda xx, t: apply_fn(params, xx, t), rng, z.shape,
                                         x_T=z, **tol)[0]

    fn = encode if kind == 'encode' else decode
    return self._cached((kind, batch, rtol, atol), lambda: runner.jit_batched(
        fn, batch=batch, num_batched=1, conditional=False))

  def _over_chunks(self, kind: str, x: np.ndarray, rtol: float, atol: float) -> np.ndarray:
    if self.config.model.num_classes:
      raise ValueError('encode/decode are for unconditional models (model.num_classes = 0).')
    chunk = self._chunk(self.config, len(x))
    fn = self._ode_fn(kind, chunk, rtol, atol)
    out = []
    for i in range(0, len(x), chunk):
      part = rt.pad_batch(x[i:i + chunk], chunk)
      out.append(runner.to_host(fn(self.params, jax.random.PRNGKey(0), part, None))[:len(x[i:i + chunk])])
    return np.concatenate(out).astype(np.float32)

  def encode(self, images, *, rtol: float = ROUND_TRIP_TOL,
             atol: float = ROUND_TRIP_TOL) -> np.ndarray:
    """float32 latents x_T ``[N, H, W, C]`` of uint8 images: the probability-flow ODE from 0 to T-1.

    Deterministic and invertible: :meth:`decode` gives the images back (score
    SDE §4.3) up to the solver's tolerances. At the default 1e-6 the README
    digits model returns every pixel of 64 test digits exactly; at 1e-5 (the
    sampler's ``sampling.ode_rtol``) 1% of the pixels move, by up to 3 levels.
    """
    return self._over_chunks('encode', to_float(_check_images(images, self.image_shape)),
                             rtol, atol)

  def decode(self, latents, *, rtol: float = ROUND_TRIP_TOL,
             atol: float = ROUND_TRIP_TOL) -> np.ndarray:
    """uint8 images ``[N, H, W, C]`` of latents x_T: the probability-flow ODE from T-1 to 0."""
    z = np.asarray(latents)
    if z.ndim != 4 or tuple(z.shape[1:]) != self.image_shape or not np.issubdtype(
        z.dtype, np.floating):
      raise ValueError(f'latents must be float [N, {", ".join(map(str, self.image_shape))}]; '
                       f'got {z.dtype} {list(z.shape)}.')
    return image_lib.to_uint8(self._over_chunks('decode', z.astype(np.float32), rtol, atol))

  def bits_per_dim(self, images, *, method: str = 'bound', seed: int = 0,
                   labels=None) -> np.ndarray:
    """float ``[N]`` bits/dim of uint8 images.

    ``method='bound'``: the variational bound of DDPM eq. 5 (L_T + sum L_t + L_0,
    every t); ``'ode'``: the probability-flow ODE likelihood of the uniformly
    dequantised images (an upper bound on the same quantity, Song et al. 2021).
    A class-conditional model needs the images' ``labels``.
    """
    x = _check_images(images, self.image_shape)
    if method not in BPD_METHODS:
      raise ValueError(f'method={method!r} is not supported; allowed values: '
                       f'{", ".join(BPD_METHODS)}.')
    cond = settings.conditioning(self.config)
    if labels is not None or cond.conditional:
      if labels is None:
        raise ValueError('a class-conditional model needs the images\' labels.')
      labels = self._check_labels(labels, len(x), cond)
    rng = jax.random.fold_in(jax.random.PRNGKey(int(seed)), RNG_BPD)
    mesh = runner.make_mesh()
    if method == 'bound':
      out = bits_per_dim.bpd_eval(self.config, self.schedule, self._apply_fn, self.params,
                                  to_float(x), rng, mesh=mesh, labels=labels, progress=False)
      return out['total_bpd']
    return ode_bpd.ode_bpd_eval(self.config, self.schedule, self._apply_fn, self.params, x, rng,
                                mesh=mesh, labels=labels, progress=False)['bpd']


def run_in_chunks(fn, params, rng, arrays, chunk: int, desc: str) -> np.ndarray:
  """``fn(params, fold_in(rng, i), *chunk_i)`` over chunks of the arrays, as uint8 images.

  The last chunk is padded (its first image repeated) to ``chunk`` and truncated.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  n = len(arrays[0])
  out = []
  for i in tqdm(range(-(-n // chunk)), desc=desc, unit='chunk', disable=not rt.is_main(),
                dynamic_ncols=True):
    part = [a[i * chunk:(i + 1) * chunk] for a in arrays]
    pad = chunk - len(part[0])
    if pad:
      part = [np.concatenate([p, np.repeat(p[:1], pad, axis=0)]) for p in part]
    x = fn(params, jax.random.fold_in(rng, i), *part)
    out.append(image_lib.to_uint8(rt.to_host(x))[:chunk - pad])
  return np.concatenate(out, axis=0)
