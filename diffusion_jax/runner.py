"""The runner: the mesh, the batch sharding, and jitted, batch-sharded model calls.

One place builds what every computation over a batch of images needs, so the
training step, the samplers, the evaluation passes and the editing walks are
set up alike:

* :func:`make_mesh`: a 1-D mesh over all devices (of all hosts), axis ``data``;
* :func:`batch_sharding` / :func:`put` / :func:`to_host`: host batches to
  batch-sharded device arrays and back (gathered across hosts);
* :func:`apply_fn_for`: a Flax module as ``apply_fn(params, x_t, t, y=None)``
  (eval mode), and :meth:`guidance.Conditioning.model_fn` turns it into the
  ``model_fn(x_t, t)`` of the samplers, guided for a class-conditional model;
* :func:`jit_batched`: ``jax.jit`` of ``fn(params, rng, *batched, y)`` with the
  batched inputs (and labels) sharded on the batch axis and the rest
  replicated, compiled with :func:`host.cpu_compiler_options`;
* :func:`make_sampler`: a compiled sampler of :mod:`diffusion_jax.samplers`'
  table on a batch, x_T drawn sharded.

Conventions: images in [-1, 1], NHWC; every process takes part in the
sharded computations, and only process 0 writes files.
"""

from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from diffusion_jax import editing
from diffusion_jax import guidance
from diffusion_jax import host
from diffusion_jax import samplers
from diffusion_jax.schedule import Schedule

ApplyFn = Callable[..., jnp.ndarray]   # (params, x_t, t[, y]) -> output; y: labels of a conditional model


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all devices (of all hosts) with the batch axis ``data``."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), ('data',))


def batch_sharding(mesh: Optional[Mesh], batch: int):
  """``NamedSharding(mesh, P('data'))`` when ``batch`` divides over the mesh, else None."""
  if mesh is None or batch % mesh.size:
    return None
  return NamedSharding(mesh, P('data'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put(x: np.ndarray, sharding):
  """Host array (identical on every host) -> device array, batch-sharded if ``sharding``."""
  if sharding is None:
    return jnp.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def to_host(x) -> np.ndarray:
  """A global array as one NumPy array on every host (gathers across hosts if needed)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def round_up(n: int, k: int) -> int:
  return -(-n // k) * k


def apply_fn_for(model: nn.Module) -> ApplyFn:
  """``(params, x_t, t, y=None) -> output`` for a Flax module (eval mode, no dropout)."""
  return lambda params, x, t, y=None: model.apply({'params': params}, x, t, y=y, train=False)


def as_apply_fn(apply_fn) -> ApplyFn:
  """``apply_fn`` itself, or a Flax module called as ``module.apply(params, x, t, y=y, train=False)``."""
  if isinstance(apply_fn, nn.Module):
    module = apply_fn
    return lambda params, x, t, y=None: module.apply(params, x, t, y=y, train=False)
  return apply_fn


def jit_batched(fn: Callable, *, batch: int, num_batched: int, conditional: bool,
                devices=None, out: Callable = lambda data, rep: data,
                with_labels: bool = True) -> Callable:
  """``jax.jit`` of ``fn(params, rng, *batched, y)`` (``fn(params, rng, *batched)`` without ``with_labels``).

  The ``num_batched`` inputs after ``rng`` and the labels ``y`` (when
  ``conditional``; else None is passed) are sharded on the batch axis over
  ``devices`` (default all) when ``batch`` divides over them; params and rng are
  replicated. ``out(data, replicated)`` gives the output's shardings (default:
  batch-sharded).
  """
  devices = list(jax.devices() if devices is None else devices)
  options = host.cpu_compiler_options(devices, kind='sampler')
  if batch % len(devices):
    return jax.jit(fn, compiler_options=options)
  mesh = make_mesh(devices)
  data, rep = NamedSharding(mesh, P('data')), replicated(mesh)
  in_shardings = (rep, rep) + (data,) * num_batched + (
      ((data,) if conditional else (None,)) if with_labels else ())
  return jax.jit(fn, in_shardings=in_shardings, out_shardings=out(data, rep),
                 compiler_options=options)


def make_sampler(spec: samplers.SamplerSpec, cond: guidance.Conditioning, s: Schedule, apply_fn,
                 shape, *, devices=None, with_nfe: bool = False) -> Callable:
  """A compiled ``(params, rng, y=None) -> samples [B, H, W, C]`` (``(samples, nfe)`` with ``with_nfe``).

  ``apply_fn`` is ``(params, x_t, t[, y])`` or a Flax module; ``shape`` is the
  batch's NHWC shape. When the batch divides over ``devices`` (default all), x_T
  (drawn from ``rng`` as the samplers draw it), the labels and every step of the
  chain are sharded on the batch axis; params and rng are replicated. The whole
  chain is a scan inside the jit: one compilation per params structure.
  A conditional ``cond`` takes labels ``y`` int32 ``[B]`` (default
  ``cond.labels(rng, B)``), guided with ``cond.guidance_scale``.
  """
  apply_fn = as_apply_fn(apply_fn)
  shape = tuple(int(d) for d in shape)
  batch = shape[0]
  devices = list(jax.devices() if devices is None else devices)
  sharded = batch % len(devices) == 0
  data = NamedSharding(make_mesh(devices), P('data')) if sharded else None

  def run(params, rng, y):
    x_T = None
    if sharded:   # the same x_T the sampler would draw, placed sharded
      x_T = jax.lax.with_sharding_constraint(
          jax.random.normal(jax.random.split(rng)[0], shape, jnp.float32), data)
    x, nfe = samplers.run(spec, s, cond.model_fn(apply_fn, params, y), rng, shape, x_T=x_T)
    return (x, nfe) if with_nfe else x

  out = (lambda data, rep: (data, rep)) if with_nfe else (lambda data, rep: data)  # nfe: replicated
  if not cond.conditional:   # the jitted function itself: (params, rng)
    return jit_batched(lambda params, rng: run(params, rng, None), batch=batch, num_batched=0,
                       conditional=False, devices=devices, out=out, with_labels=False)
  jitted = jit_batched(run, batch=batch, num_batched=0, conditional=True, devices=devices, out=out)
  return lambda params, rng, y=None: jitted(params, rng, cond.labels(rng, batch) if y is None else y)


def make_inpaint_fn(ip, spec: samplers.SamplerSpec, cond: guidance.Conditioning, s: Schedule,
                    apply_fn, *, batch_size: int, devices=None) -> Callable:
  """A compiled ``(params, rng, x0, known) -> x_0`` of :func:`editing.inpaint`.

  ``ip`` is :class:`settings.Inpaint` (the walk: method, resample, jump length,
  steps, eta); ``spec`` gives the model's parameterisation. x0 and known
  ``[batch, H, W, C]`` are batch-sharded; a conditional model is guided towards
  :meth:`guidance.Conditioning.edit_labels`.
  """
  apply_fn = as_apply_fn(apply_fn)

  def run(params, rng, x0, known, y):
    return editing.inpaint(s, cond.model_fn(apply_fn, params, y), rng, x0, known,
                           method=ip.method, resample=ip.resample, jump_length=ip.jump_length,
                           num_steps=ip.num_steps, eta=ip.eta, mean_type=spec.mean_type,
                           var_type=spec.var_type, clip_denoised=spec.clip_denoised)

  jitted = jit_batched(run, batch=int(batch_size), num_batched=2, conditional=cond.conditional,
                       devices=devices)
  labels = cond.edit_labels(int(batch_size))
  return lambda params, rng, x0, known: jitted(params, rng, x0, known, labels)


def make_sdedit_fn(strength: float, spec: samplers.SamplerSpec, cond: guidance.Conditioning,
                   s: Schedule, apply_fn, *, batch_size: int, devices=None) -> Callable:
  """A compiled ``(params, rng, x0) -> edited`` of :func:`editing.sdedit`.

  ``spec``'s sampler runs the segment [0, t0], its ``num_steps`` scaled to it
  (:func:`editing.segment_num_steps`); sharding and labels as :func:`make_inpaint_fn`.
  """
  apply_fn = as_apply_fn(apply_fn)
  t0 = editing.edit_start_index(s.num_timesteps, strength)
  steps = 0 if spec.name == 'ancestral' else editing.segment_num_steps(
      spec.num_steps, s.num_timesteps, t0)
  spec = spec.replace(num_steps=steps)

  def run(params, rng, x0, y):
    return editing.sdedit(s, cond.model_fn(apply_fn, params, y), rng, x0, strength=strength,
                          spec=spec)

  jitted = jit_batched(run, batch=int(batch_size), num_batched=1, conditional=cond.conditional,
                       devices=devices)
  labels = cond.edit_labels(int(batch_size))
  return lambda params, rng, x0: jitted(params, rng, x0, labels)
