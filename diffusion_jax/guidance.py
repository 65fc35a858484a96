"""Class conditioning and classifier-free guidance (Ho & Salimans 2022).

A class-conditional model (``model.num_classes = K > 0``) embeds labels
``0..K-1`` and one more token, ``K``, meaning "no label" (the null label ∅).
Training replaces each label by ∅ with probability ``model.class_dropout``
(:func:`drop_labels`, the paper's Algorithm 1), so the same network learns
the conditional eps(x_t, y) and the unconditional eps(x_t, ∅). Sampling with
guidance scale ``w`` uses, at every step (the paper's eq. 6),

    eps~(x_t, y) = (1 + w) eps(x_t, y) - w eps(x_t, ∅),

both halves from ONE batched model call (:func:`guided_model_fn`). The result
is a plain ``model_fn(x_t, t)`` (DESIGN.md), so every sampler of
:mod:`diffusion_jax.sampling` and the figure chains guide without change.

Guidance acts on the model's mean parameterisation (the first C channels):
eps, x0 and v are affine in one another with x_t fixed, and the weights
``1 + w`` and ``-w`` sum to one, so guiding x0 or v is guiding eps. A learned
variance (the last C channels) is taken from the conditional half, as in GLIDE.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# The stream of the sampling labels, folded into a sampler's key.
RNG_LABELS = 0x1AB

CondModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]   # (x_t, t, y) -> output


def num_classes(config) -> int:
  """``model.num_classes`` (0: unconditional)."""
  return int(config.model.get('num_classes', 0) or 0)


def drop_labels(rng, y, num_classes: int, p: float):
  """Class dropout: each label becomes the null token ``num_classes`` with probability ``p``.

  Ho & Salimans 2022, Algorithm 1, line 3: "c <- ∅ with probability p_uncond".
  """
  y = jnp.asarray(y, jnp.int32)
  if not p:
    return y
  return jnp.where(jax.random.bernoulli(rng, p, y.shape), jnp.int32(num_classes), y)


def guided_output(cond, uncond, w, num_channels: int):
  """(1 + w) cond - w uncond on the first ``num_channels`` channels (Ho & Salimans 2022, eq. 6).

  Further channels (a learned variance) are the conditional model's.
  """
  mean = (1.0 + w) * cond[..., :num_channels] - w * uncond[..., :num_channels]
  return jnp.concatenate([mean.astype(cond.dtype), cond[..., num_channels:]], axis=-1)


def guided_model_fn(cond_model_fn: CondModelFn, y, num_classes: int, w: float):
  """``model_fn(x_t, t)`` of the guided model for labels ``y`` [B] (eq. 6).

  ``w = 0`` (a Python number) is the conditional model itself, one call per
  step. Otherwise the model is ``jax.vmap``-ed over the label pair
  ``(y, ∅)``: one model call on a doubled batch gives both halves of the
  formula (the layers before the label embedding enters, which see only x_t
  and t, are computed once), and the batch axis of x_t keeps its sharding.
  """
  y = jnp.asarray(y, jnp.int32)
  if isinstance(w, (int, float)) and w == 0:
    return lambda x, t: cond_model_fn(x, t, y)

  def model_fn(x, t):
    labels = jnp.stack([y, jnp.full_like(y, num_classes)])
    cond, uncond = jax.vmap(lambda yy: cond_model_fn(x, t, yy))(labels)
    return guided_output(cond, uncond, w, x.shape[-1])

  return model_fn


def sample_labels(rng, num: int, num_classes: int, class_label: int = -1):
  """int32 ``[num]`` labels: uniform over ``0..num_classes-1`` (``class_label=-1``) or all ``class_label``."""
  if class_label < 0:
    return jax.random.randint(rng, (num,), 0, num_classes, jnp.int32)
  if class_label >= num_classes:
    raise ValueError(f'class_label={class_label} must be in [-1, {num_classes - 1}].')
  return jnp.full((num,), class_label, jnp.int32)


def labels_from_config(config, rng, num: int):
  """The labels a sampler uses for ``num`` samples and key ``rng`` (``sampling.class_label``).

  Drawn from ``fold_in(rng, RNG_LABELS)``, a stream separate from the chain's.
  """
  return sample_labels(jax.random.fold_in(rng, RNG_LABELS), num, num_classes(config),
                       int(config.sampling.get('class_label', -1)))


def model_fn_from_config(config, apply_fn, params, y):
  """The ``model_fn(x_t, t)`` a sampler runs for a config: guided if conditional.

  ``apply_fn(params, x, t)``, or ``apply_fn(params, x, t, y)`` for a
  class-conditional config, which is guided with ``sampling.guidance_scale``.
  """
  k = num_classes(config)
  if not k:
    return lambda x, t: apply_fn(params, x, t)
  return guided_model_fn(lambda x, t, yy: apply_fn(params, x, t, yy), y, k,
                         float(config.sampling.get('guidance_scale', 0.0)))
