"""A small CNN digit classifier: an offline feature space for a Fréchet distance.

FID (Heusel et al. 2017) needs the Inception network's weights, which the
embedded digits default cannot download. Instead the project trains this
small classifier on part of the digits training split (seconds on a CPU),
caches it in the workdir, and reports Fréchet distances and KID in its
penultimate-layer feature space, against digits it never saw
(:mod:`diffusion_jax.evaluation.classifier_metrics` says which) — the same construction
as FID with a domain-specific network (cf. the LeNet-feature "FID" for MNIST
used in pytorch-fid's ``lenet.py`` / KID code). The number is comparable
between runs that use the same cached classifier, not with Inception FIDs.

Images are float arrays in [-1, 1], NHWC with one channel (``[N, H, W]`` is
accepted too); any size >= 4x4 works (8x8 for scikit-learn's digits).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax.evaluation import metrics

CACHE_NAME = 'digits_classifier.msgpack'


class DigitClassifier(nn.Module):
  """conv3x3(32) -> conv3x3/2(64) -> dense(features) -> dense(num_classes), ReLU.

  ``__call__(x, return_features=False)`` returns logits, or ``(features,
  logits)`` with ``features`` the penultimate (post-ReLU) layer.
  """
  num_classes: int = 10
  channels: Sequence[int] = (32, 64)
  features: int = 128

  @nn.compact
  def __call__(self, x: jax.Array, return_features: bool = False):
    x = _as_nhwc(x)
    for i, ch in enumerate(self.channels):
      x = nn.Conv(ch, (3, 3), strides=(1, 1) if i == 0 else (2, 2),
                  padding='SAME', name=f'conv{i}')(x)
      x = nn.relu(x)
    x = x.reshape((x.shape[0], -1))
    feats = nn.relu(nn.Dense(self.features, name='dense')(x))
    logits = nn.Dense(self.num_classes, name='logits')(feats)
    return (feats, logits) if return_features else logits


def _as_nhwc(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x, jnp.float32)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise ValueError(f'expected [N, H, W] or [N, H, W, C] images, got {x.shape}')
  return x


def _model(num_classes: int = 10) -> DigitClassifier:
  return DigitClassifier(num_classes=num_classes)


def init_classifier(image_shape: Sequence[int], seed: int = 0,
                    num_classes: int = 10) -> Any:
  """Random parameters for images of shape ``image_shape`` (``(H, W)`` or ``(H, W, C)``)."""
  shape = tuple(image_shape)
  if len(shape) == 2:
    shape = shape + (1,)
  x = jnp.zeros((1,) + shape, jnp.float32)
  return _model(num_classes).init(jax.random.PRNGKey(seed), x)['params']


def train_classifier(images: np.ndarray, labels: np.ndarray, *, steps: int,
                     seed: int = 0, batch_size: int = 128, lr: float = 2e-3,
                     weight_decay: float = 1e-4, num_classes: int = 10) -> Any:
  """Trains :class:`DigitClassifier` with AdamW on random mini-batches.

  One jitted step per iteration (the data stay on the device; batches are
  drawn with replacement from ``jax.random``), a cosine-decayed learning rate,
  and random +-1 pixel shifts of the batch as augmentation. Deterministic for a
  given ``seed`` on a given backend.

  Args:
    images: ``[N, H, W(, 1)]`` floats in [-1, 1].
    labels: ``[N]`` ints in ``[0, num_classes)``.
    steps: optimisation steps.
    seed: PRNG seed for initialisation, batches and augmentation.
    batch_size: images per step.

  Returns:
    The parameters (a pytree of arrays).
  """
  x_all = _as_nhwc(images)
  y_all = jnp.asarray(labels, jnp.int32)
  if x_all.shape[0] != y_all.shape[0]:
    raise ValueError(f'{x_all.shape[0]} images but {y_all.shape[0]} labels')
  if steps < 1:
    raise ValueError(f'steps must be >= 1, got {steps}')
  model = _model(num_classes)
  rng = jax.random.PRNGKey(seed)
  init_rng, train_rng = jax.random.split(rng)
  params = model.init(init_rng, x_all[:1])['params']
  schedule = optax.cosine_decay_schedule(lr, steps, alpha=0.05)
  tx = optax.adamw(schedule, weight_decay=weight_decay)

  def shift(x, key):
    # Random translation of the batch by -1..1 pixels (padded with background -1).
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    d = jax.random.randint(key, (2,), 0, 3)
    return jax.lax.dynamic_slice(xp, (0, d[0], d[1], 0), x.shape)

  def loss_fn(p, x, y):
    logits = model.apply({'params': p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, opt_state, key, x_all, y_all):
    k_idx, k_aug = jax.random.split(key)
    idx = jax.random.randint(k_idx, (batch_size,), 0, x_all.shape[0])
    x = shift(x_all[idx], k_aug)
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y_all[idx])
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  # A Python loop over a jitted step: on XLA:CPU, convolutions inside a
  # lax.scan/while body run ~30x slower than at top level (measured with
  # jax 0.10), which would turn seconds of training into minutes.
  opt_state = tx.init(params)
  for key in jax.random.split(train_rng, steps):
    params, opt_state, _ = step(params, opt_state, key, x_all, y_all)
  return jax.device_get(params)


@jax.jit
def _apply_both(params, x):
  return _model(params['logits']['bias'].shape[0]).apply(
      {'params': params}, x, return_features=True)


def _batched(params, images, batch_size, which):
  x = _as_nhwc(images)
  out = []
  for i in range(0, x.shape[0], batch_size):
    out.append(np.asarray(_apply_both(params, x[i:i + batch_size])[which]))
  return np.concatenate(out, axis=0)


def classifier_features(params: Any, images: np.ndarray,
                        batch_size: int = 1000) -> np.ndarray:
  """Penultimate-layer features ``[N, D]`` (D = 128) of images in [-1, 1]."""
  return _batched(params, images, batch_size, 0)


def classifier_logits(params: Any, images: np.ndarray,
                      batch_size: int = 1000) -> np.ndarray:
  """Class logits ``[N, num_classes]`` of images in [-1, 1]."""
  return _batched(params, images, batch_size, 1)


def classifier_accuracy(params: Any, images: np.ndarray,
                        labels: np.ndarray) -> float:
  """Fraction of ``images`` classified as ``labels``."""
  pred = np.argmax(classifier_logits(params, images), axis=-1)
  return float(np.mean(pred == np.asarray(labels)))


def classifier_frechet_distance(params: Any, images1: np.ndarray,
                                images2: np.ndarray) -> float:
  """Fréchet distance between two image sets in the classifier's feature space."""
  return metrics.frechet_distance_from_features(
      classifier_features(params, images1), classifier_features(params, images2))


def save_classifier(path: str | os.PathLike, params: Any,
                    meta: dict | None = None) -> None:
  """Writes ``{'params', 'meta'}`` with flax.serialization (msgpack), atomically."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  state = {'params': serialization.to_state_dict(jax.device_get(params)),
           'meta': json.dumps(meta or {}, sort_keys=True)}
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(serialization.msgpack_serialize(state))
  os.replace(tmp, path)


def load_classifier(path: str | os.PathLike, image_shape: Sequence[int],
                    num_classes: int = 10) -> tuple[Any, dict]:
  """Reads ``(params, meta)`` written by :func:`save_classifier`.

  Raises ValueError if the stored parameters do not fit ``image_shape``.
  """
  with open(os.fspath(path), 'rb') as f:
    state = serialization.msgpack_restore(f.read())
  template = init_classifier(image_shape, num_classes=num_classes)
  try:
    params = serialization.from_state_dict(template, state['params'])
  except (KeyError, ValueError) as e:
    raise ValueError(f'{path}: not a DigitClassifier for {tuple(image_shape)}') from e
  bad = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a, b: np.shape(a) != np.shape(b), template, params))
  if any(bad):
    raise ValueError(f'{path}: parameter shapes do not fit images of shape '
                     f'{tuple(image_shape)}')
  return params, json.loads(state.get('meta', '{}'))


def load_or_train_classifier(workdir: str | os.PathLike, config,
                             train_images: np.ndarray,
                             train_labels: np.ndarray) -> Any:
  """The digits classifier of ``workdir``: loaded from the cache, else trained.

  The cache is ``workdir/eval/digits_classifier.msgpack``. It is reused when
  its recorded settings (``config.eval.classifier_steps``, ``config.seed``,
  image shape, training-set size) match; otherwise the classifier is trained
  on ``(train_images, train_labels)`` and the cache is (re)written.

  Args:
    workdir: the experiment directory.
    config: the experiment config (uses ``seed``, ``eval.classifier_steps`` and
      optionally ``eval.classifier_batch_size``, default 128).
    train_images: ``[N, H, W(, 1)]`` training images in [-1, 1].
    train_labels: ``[N]`` integer labels.
  """
  images = np.asarray(train_images, np.float32)
  labels = np.asarray(train_labels)
  image_shape = images.shape[1:] if images.ndim == 4 else images.shape[1:] + (1,)
  num_classes = int(labels.max()) + 1 if labels.size else 10
  num_classes = max(num_classes, 10)
  ev = config.eval
  meta = {
      'steps': int(ev.classifier_steps),
      'seed': int(config.seed),
      'batch_size': int(ev.classifier_batch_size),
      'image_shape': [int(s) for s in image_shape],
      'num_train': int(images.shape[0]),
      'num_classes': num_classes,
  }
  path = os.path.join(os.fspath(workdir), 'eval', CACHE_NAME)
  if os.path.exists(path):
    try:
      params, stored = load_classifier(path, image_shape, num_classes)
      if stored == meta:
        logging.info('Loaded the digits classifier from %s', path)
        return params
      logging.info('Retraining the digits classifier: cached settings %s != %s',
                   stored, meta)
    except (ValueError, KeyError, OSError):
      pass  # Stale or unreadable cache: retrain below.
  params = train_classifier(images, labels, steps=meta['steps'],
                            seed=meta['seed'], batch_size=meta['batch_size'],
                            num_classes=num_classes)
  save_classifier(path, params, meta)
  logging.info('Trained the digits classifier (%d steps), cached in %s',
               meta['steps'], path)
  return params
