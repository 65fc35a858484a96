"""Class conditioning and classifier-free guidance (Ho & Salimans 2022).

A class-conditional model (``model.num_classes = K > 0``) embeds labels
``0..K-1`` and one more token, ``K``, meaning "no label" (the null label ∅).
Training replaces each label by ∅ with probability ``model.class_dropout``
(:func:`drop_labels`, the paper's Algorithm 1), so the same network learns
the conditional eps(x_t, y) and the unconditional eps(x_t, ∅). Sampling with
guidance scale ``w`` uses, at every step (the paper's eq. 6),

    eps~(x_t, y) = (1 + w) eps(x_t, y) - w eps(x_t, ∅),

both halves from ONE batched model call (:func:`guided_model_fn`). The result
is a plain ``model_fn(x_t, t)`` (docs/design.md), so every sampler of
:mod:`diffusion_jax.sampling` and the figure chains guide without change.

Guidance acts on the model's mean parameterisation (the first C channels):
eps, x0 and v are affine in one another with x_t fixed, and the weights
``1 + w`` and ``-w`` sum to one, so guiding x0 or v is guiding eps. A learned
variance (the last C channels) is taken from the conditional half, as in GLIDE.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# The stream of the sampling labels, folded into a sampler's key.
RNG_LABELS = 0x1AB

CondModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]   # (x_t, t, y) -> output


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


@dataclasses.dataclass(frozen=True)
class Conditioning:
  """How a sampler conditions a model: ``num_classes`` (0: unconditional), the labels, the guidance.

  ``class_label``: -1 draws labels uniformly, k >= 0 asks for class k;
  ``guidance_scale``: w of eq. 6 (0: the conditional model itself).
  """
  num_classes: int = 0
  class_label: int = -1
  guidance_scale: float = 0.0

  @property
  def conditional(self) -> bool:
    return self.num_classes > 0

  def labels(self, rng, num: int):
    """The labels a sampler uses for ``num`` samples and key ``rng`` (None: unconditional).

    Drawn from ``fold_in(rng, RNG_LABELS)``, a stream separate from the chain's.
    """
    if not self.conditional:
      return None
    return sample_labels(jax.random.fold_in(rng, RNG_LABELS), num, self.num_classes,
                         self.class_label)

  def edit_labels(self, num: int):
    """int32 ``[num]`` labels an edit is conditioned on (None: unconditional).

    ``class_label = k >= 0``: all k ("complete this as a 7", guided with
    ``guidance_scale``); -1: the "no label" token (the unconditional model the
    conditional one also learned), since an edit should keep the input's own
    content rather than push it to a random class.
    """
    if not self.conditional:
      return None
    label = self.class_label if self.class_label >= 0 else self.num_classes
    return np.full((num,), label, np.int32)

  def model_fn(self, apply_fn, params, y):
    """The ``model_fn(x_t, t)`` a sampler runs: ``apply_fn(params, x, t[, y])``, guided if conditional."""
    if not self.conditional:
      return lambda x, t: apply_fn(params, x, t)
    return guided_model_fn(lambda x, t, yy: apply_fn(params, x, t, yy), y, self.num_classes,
                           self.guidance_scale)
