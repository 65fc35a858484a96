"""Sample quality on the digits default with no download: a small classifier's feature space.

FID needs Inception weights and 299x299 inputs; for the offline 8x8 digits the
same Fréchet distance (Heusel et al. 2017) and the Kernel Inception Distance
(Bińkowski et al. 2018) are taken in the penultimate layer of a small digit
classifier (:mod:`diffusion_jax.classifier`) trained on the training split and
cached in ``workdir/eval``. With only 297 held-out digits the Fréchet
distance's sample-size bias dominates, so every distance is reported beside
the real test digits' distance at the same sample count.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from diffusion_jax import data as data_lib
from diffusion_jax import eval_runtime as rt
from diffusion_jax import kernel_distance
from diffusion_jax import metrics


def digits_labels(split: str) -> np.ndarray:
  """Labels of the digits split, in :mod:`data`'s order (train: first 1500, test: last 297)."""
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  if split not in data_lib.DIGITS_SPLITS:
    raise ValueError(f'split {split!r} is not a digits split; allowed: {data_lib.DIGITS_SPLITS}.')
  target = sk_datasets.load_digits().target.astype(np.int32)
  n_test = data_lib.DIGITS_NUM_TEST
  return target[:-n_test] if split == 'train' else target[-n_test:]


def distances_to_reference(features: np.ndarray, real: np.ndarray, ref: np.ndarray) -> dict:
  """A sample set's distances to the reference, each beside real data's at the same count.

  The Fréchet distance of N points is biased upwards by roughly
  ``tr(Sigma) / N``-sized terms, so it is compared with held-out real
  features at the same count ``n = min(N, len(real))``
  (``frechet_at_n`` vs ``frechet_real_at_n``); ``frechet_distance`` is the
  one of all N points. KID (:mod:`kernel_distance`, unbiased) is given for
  all N points and for all the real points (``kid_real``).
  """
  mu_ref, sigma_ref = metrics.feature_statistics(ref)
  fd = lambda f: metrics.frechet_distance(*metrics.feature_statistics(f), mu_ref, sigma_ref)  # noqa: E731
  n = min(len(features), len(real))
  kid, kid_std = kernel_distance.kernel_inception_distance(features, ref)
  kid_real, kid_real_std = kernel_distance.kernel_inception_distance(real, ref)
  return dict(frechet_distance=fd(features), num_compared=int(n),
              frechet_at_n=fd(features[:n]), frechet_real_at_n=fd(real[:n]),
              kid=kid, kid_std=kid_std, kid_real=kid_real, kid_real_std=kid_real_std)


def asked_for_accuracy(predicted: np.ndarray, asked: np.ndarray, num_classes: int) -> dict:
  """The fraction of samples read as the class they were asked for, overall and per class.

  A class-conditional model's fidelity to its label (classifier-free guidance,
  Ho & Salimans 2022, trades it against diversity with the scale w).
  """
  predicted, asked = np.asarray(predicted), np.asarray(asked)
  hit = predicted == asked
  per_class = [float(np.mean(hit[asked == k])) if np.any(asked == k) else float('nan')
               for k in range(num_classes)]
  return dict(asked_for_accuracy=float(np.mean(hit)), asked_for_accuracy_per_class=per_class)


def classifier_metrics(config, workdir: str, sample_sets: dict,
                       sample_labels: Optional[dict] = None) -> dict:
  """Sample quality for the digits default with no download (see :mod:`classifier`).

  Trains (or loads from ``workdir/eval``) the small digit classifier on the
  training split and reports, for every sample set, its distances to the
  penultimate-layer features of the **training split** (1500 images; as FID
  uses training-set statistics), each next to the held-out test digits'
  distance at the same sample count (:func:`distances_to_reference`: Fréchet
  distance and KID), the mean classifier confidence (max softmax) and the
  predicted-class histogram. ``sample_labels`` (a class-conditional model's
  asked-for labels per set) adds :func:`asked_for_accuracy`.
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
  real = classifier.classifier_features(params, x_test)
  real_vs_ref = distances_to_reference(real, real, ref)
  out = dict(reference=f'{train_split} split ({len(x_train)} images)',
             classifier_steps=int(config.eval.classifier_steps),
             test_accuracy=classifier.classifier_accuracy(params, x_test,
                                                          digits_labels(test_split)),
             frechet_test_vs_train=real_vs_ref['frechet_distance'],
             kid_test_vs_train=real_vs_ref['kid'], num_test=int(len(x_test)))
  for label, images in sample_sets.items():
    x = np.asarray(images, np.float32) / 127.5 - 1.0
    logits = classifier.classifier_logits(params, x)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    predicted = np.argmax(probs, axis=1)
    hist = np.bincount(predicted, minlength=probs.shape[1])
    d = distances_to_reference(classifier.classifier_features(params, x), real, ref)
    out[label] = dict(num_samples=int(len(x)), **d,
                      mean_confidence=float(np.mean(np.max(probs, axis=1))),
                      class_histogram=[int(c) for c in hist],
                      digit_score=metrics.inception_score(probs, num_splits=1,
                                                          from_logits=False)[0])
    asked = (sample_labels or {}).get(label)
    if asked is not None:
      out[label].update(asked_for_accuracy(predicted, asked, probs.shape[1]))
      rt.say(f'  {label}: {out[label]["asked_for_accuracy"]:.1%} read as the asked-for class')
    rt.say(f'  {label}: classifier Fréchet distance {d["frechet_at_n"]:.3f} at '
           f'{d["num_compared"]} samples (test digits at {d["num_compared"]}: '
           f'{d["frechet_real_at_n"]:.3f}; all {len(x)} samples: {d["frechet_distance"]:.3f}), '
           f'KID {d["kid"]:.4f} ± {d["kid_std"]:.4f} (test digits: {d["kid_real"]:.4f}), '
           f'confidence {out[label]["mean_confidence"]:.3f}')
  return out
