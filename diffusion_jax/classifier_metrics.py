"""Sample quality on the digits default with no download: a small classifier's feature space.

FID needs Inception weights and 299x299 inputs; for the offline 8x8 digits the
same Fréchet distance (Heusel et al. 2017) is taken in the penultimate layer of
a small digit classifier (:mod:`diffusion_jax.classifier`) trained on the
training split and cached in ``workdir/eval``.
"""

from __future__ import annotations

import numpy as np

from diffusion_jax import data as data_lib
from diffusion_jax import eval_runtime as rt
from diffusion_jax import metrics


def digits_labels(split: str) -> np.ndarray:
  """Labels of the digits split, in :mod:`data`'s order (train: first 1500, test: last 297)."""
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  if split not in data_lib.DIGITS_SPLITS:
    raise ValueError(f'split {split!r} is not a digits split; allowed: {data_lib.DIGITS_SPLITS}.')
  target = sk_datasets.load_digits().target.astype(np.int32)
  n_test = data_lib.DIGITS_NUM_TEST
  return target[:-n_test] if split == 'train' else target[-n_test:]


def classifier_metrics(config, workdir: str, sample_sets: dict) -> dict:
  """Sample quality for the digits default with no download (see :mod:`classifier`).

  Trains (or loads from ``workdir/eval``) the small digit classifier on the
  training split and reports, for every sample set, the Fréchet distance
  between its penultimate-layer features and those of the **training split**
  (the larger split, 1500 images; as FID uses training-set statistics), the
  mean classifier confidence (max softmax) and the predicted-class histogram.
  ``frechet_test_vs_train`` (held-out test digits against the same reference)
  is the floor a perfect model would reach with 297 images.
  """
  from diffusion_jax import classifier  # pylint: disable=g-import-not-at-top
  if config.data.name != 'digits':
    raise ValueError(f'the classifier metric is for data.name=digits, got {config.data.name!r}.')
  train_split, test_split = config.data.train_split, config.data.eval_split
  x_train = data_lib.load_split(config, train_split)
  y_train = digits_labels(train_split)
  params = classifier.load_or_train_classifier(workdir, config, x_train, y_train)
  x_test = data_lib.load_split(config, test_split)
  ref = classifier.classifier_features(params, x_train)
  mu_ref, sigma_ref = metrics.feature_statistics(ref)

  def fd(images):
    return metrics.frechet_distance(
        *metrics.feature_statistics(classifier.classifier_features(params, images)),
        mu_ref, sigma_ref)

  out = dict(reference=f'{train_split} split ({len(x_train)} images)',
             classifier_steps=int(config.eval.classifier_steps),
             test_accuracy=classifier.classifier_accuracy(params, x_test,
                                                          digits_labels(test_split)),
             frechet_test_vs_train=fd(x_test), num_test=int(len(x_test)))
  for label, images in sample_sets.items():
    x = np.asarray(images, np.float32) / 127.5 - 1.0
    logits = classifier.classifier_logits(params, x)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    hist = np.bincount(np.argmax(probs, axis=1), minlength=probs.shape[1])
    out[label] = dict(num_samples=int(len(x)), frechet_distance=fd(x),
                      mean_confidence=float(np.mean(np.max(probs, axis=1))),
                      class_histogram=[int(c) for c in hist],
                      digit_score=metrics.inception_score(probs, num_splits=1,
                                                          from_logits=False)[0])
    rt.say(f'  {label}: classifier Fréchet distance {out[label]["frechet_distance"]:.3f} '
         f'(test digits: {out["frechet_test_vs_train"]:.3f}), '
         f'confidence {out[label]["mean_confidence"]:.3f}')
  return out
