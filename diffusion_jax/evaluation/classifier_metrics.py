"""Sample quality on the digits default with no download: a small classifier's feature space.

FID needs Inception weights and 299x299 inputs; for the offline 8x8 digits the
same Fréchet distance (Heusel et al. 2017) and the Kernel Inception Distance
(Bińkowski et al. 2018) are taken in the penultimate layer of a small digit
classifier (:mod:`diffusion_jax.evaluation.classifier`), cached in ``workdir/eval``.

**Who sees which digits.** A feature network clusters the images it was
trained on more tightly than any others, so a classifier trained on the
reference set makes every unseen digit look far from the reference, while
samples of a model trained on the same digits land inside the tight cluster:
real data scored 3x worse than samples. So the roles are split:

- ``fit``: the classifier learns on the **test split** (297 digits) only;
- ``reference`` (750 of the 1,500 training digits, at random,
  :func:`reference_split`): the set whose features every sample set is
  compared with;
- ``real`` (the other 750): the real baseline, from the same writers as the
  reference and, like it, never seen by the classifier.

Why the test split trains the features rather than serving as the baseline:
scikit-learn's last 297 digits come from other writers. Measured on the raw
pixels, their KID to training digits is 0.036 ± 0.008 while 297 other
training digits give -0.001 ± 0.003; in features of a classifier that saw
neither, 92 ± 38 against 16 ± 32. As a baseline they would never read ~0;
as the feature network's data they are exactly what it needs, digits that
are neither the reference, nor the baseline, nor seen by the diffusion model.
The classifier still reads 92% of the training digits right.

Alternatives measured on the README model (ancestral and DDIM-50 samples,
300 each): learning on 600 training digits with 600 as the reference and 300
as the baseline put the samples *below* real data (Fréchet distance 15.9
and 14.5 against 24.2 at 300: the 300-digit baseline's own distance varies
by a factor of two between draws); learning on 300 with 600 + 600 gave 15.3
and 14.0 against 13.5. With 750 + 750 and the test split as ``fit``: 14.6
and 15.0 against 11.2; at 500 samples 13.8 and 11.2 against 9.1, KID of
real digits -4.2 ± 8.1. Cross-fitting (features
of each reference digit from a classifier that did not see it) was not
chosen: it mixes several feature spaces. The split is deliberately *not*
stratified by class: KID's unbiased estimator assumes independent draws, and
sets forced to equal class counts are more alike than that (a stratified
split put real digits 2 standard errors below 0).

The diffusion model is trained on the whole training split, so it has seen
the reference and baseline digits (its samples are not copies: their
nearest training digit is as far as a real digit's nearest other digit).
With a few hundred digits the Fréchet distance's sample-size bias dominates,
so every distance is reported beside the real baseline's at the same count.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from diffusion_jax import data as data_lib
from diffusion_jax.evaluation import kernel_distance
from diffusion_jax.evaluation import metrics
from diffusion_jax.evaluation import runtime as rt

REFERENCE_SEED = 0   # the fixed halving of the training digits (reference | real)


def digits_labels(split: str) -> np.ndarray:
  """Labels of the digits split, in :mod:`data`'s order (train: first 1500, test: last 297)."""
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  if split not in data_lib.DIGITS_SPLITS:
    raise ValueError(f'split {split!r} is not a digits split; allowed: {data_lib.DIGITS_SPLITS}.')
  target = sk_datasets.load_digits().target.astype(np.int32)
  n_test = data_lib.DIGITS_NUM_TEST
  return target[:-n_test] if split == 'train' else target[-n_test:]


def reference_split(num: int, seed: int = 0) -> dict:
  """Indices ``{'reference', 'real'}``: a random halving of ``num`` training digits.

  A seeded permutation cut in half (750 and 750 of the 1,500 training
  digits): ``reference`` is what samples are compared with, ``real`` the real
  baseline (module docstring). Not stratified by class, on purpose. The
  indices stay in the permutation's order, not sorted: the data set is
  ordered by writer, and :func:`distances_to_reference` compares the first n
  real digits with n samples, which must be a random n, not the first
  writers' (sorted, the first 500 of 750 scored a Fréchet distance of 15.4
  against the reference where a random 500 score about 9). Together they
  partition ``range(num)``.
  """
  perm = np.random.default_rng(seed).permutation(num)
  return {'reference': perm[:num // 2], 'real': perm[num // 2:]}


def _split_digits(config) -> dict:
  """``{'fit', 'reference', 'real'}`` -> ``(images, labels)``: the roles of the module docstring."""
  if config.data.name != 'digits':
    raise ValueError(f'the classifier metric is for data.name=digits, got {config.data.name!r}.')
  train, test = config.data.train_split, config.data.eval_split
  x, y = data_lib.load_split(config, train), digits_labels(train)
  parts = {name: (x[idx], y[idx]) for name, idx in reference_split(len(y), REFERENCE_SEED).items()}
  parts['fit'] = (data_lib.load_split(config, test), digits_labels(test))
  return parts


def load_digit_classifier(config, workdir: str):
  """The cached feature classifier of ``workdir`` (trained on the test split), for digits.

  Returns the parameters for :func:`classifier.classifier_features` /
  :func:`classifier.classifier_logits`; trains and caches it in
  ``workdir/eval`` on first use (seconds on a CPU).
  """
  from diffusion_jax.evaluation import classifier  # pylint: disable=g-import-not-at-top
  return classifier.load_or_train_classifier(workdir, config, *_split_digits(config)['fit'])


def distances_to_reference(features: np.ndarray, real: np.ndarray, ref: np.ndarray) -> dict:
  """A sample set's distances to the reference, each beside real data's at the same count.

  The Fréchet distance of N points is biased upwards by roughly
  ``tr(Sigma) / N``-sized terms, so it is compared with held-out real
  features at the same count ``n = min(N, len(real))``
  (``frechet_at_n`` vs ``frechet_real_at_n``); ``frechet_distance`` is the
  one of all N points. KID (:mod:`kernel_distance`, unbiased) is given for
  all N points and for all the real points (``kid_real``), each with its
  jackknife standard error (``kid_std``, ``kid_real_std``:
  :func:`kernel_distance.mmd2_with_stderr`), so that "within two standard
  errors of 0" can be read off.
  """
  mu_ref, sigma_ref = metrics.feature_statistics(ref)
  fd = lambda f: metrics.frechet_distance(*metrics.feature_statistics(f), mu_ref, sigma_ref)  # noqa: E731
  n = min(len(features), len(real))
  kid, kid_std = kernel_distance.mmd2_with_stderr(features, ref)
  kid_real, kid_real_std = kernel_distance.mmd2_with_stderr(real, ref)
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
  """Sample quality for the digits default with no download (see the module docstring).

  Trains (or loads from ``workdir/eval``) the small digit classifier on the
  test split and reports, for every sample set, its distances to the features
  of the **reference** half of the training split (750 digits the classifier
  never saw), each next to the real baseline's (the other 750) at the same
  sample count (:func:`distances_to_reference`: Fréchet distance and
  KID), the mean classifier confidence (max softmax) and the predicted-class
  histogram. ``sample_labels`` (a class-conditional model's asked-for labels
  per set) adds :func:`asked_for_accuracy`.
  """
  from diffusion_jax.evaluation import classifier  # pylint: disable=g-import-not-at-top
  parts = _split_digits(config)
  params = classifier.load_or_train_classifier(workdir, config, *parts['fit'])
  features = lambda x: classifier.classifier_features(params, x)  # noqa: E731
  ref, real = features(parts['reference'][0]), features(parts['real'][0])
  real_vs_ref = distances_to_reference(real, real, ref)
  n_fit, n_ref, n_real = (len(parts[k][0]) for k in ('fit', 'reference', 'real'))
  out = dict(reference=(f'{config.data.train_split} split, reference half ({n_ref} images); '
                        f'real baseline: the other {n_real}; the classifier learned on the '
                        f'{config.data.eval_split} split ({n_fit} images)'),
             classifier_steps=int(config.eval.classifier_steps),
             reference_accuracy=classifier.classifier_accuracy(params, *parts['reference']),
             frechet_real_vs_reference=real_vs_ref['frechet_distance'],
             kid_real_vs_reference=real_vs_ref['kid'],
             kid_real_vs_reference_std=real_vs_ref['kid_std'], num_real=n_real)
  rt.say(f'  real digits vs the reference: KID {real_vs_ref["kid"]:.4f} ± '
         f'{real_vs_ref["kid_std"]:.4f} (the floor, ~0); the classifier reads '
         f'{out["reference_accuracy"]:.1%} of the reference digits right')
  for label, images in sample_sets.items():
    x = np.asarray(images, np.float32) / 127.5 - 1.0
    logits = classifier.classifier_logits(params, x)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    predicted = np.argmax(probs, axis=1)
    hist = np.bincount(predicted, minlength=probs.shape[1])
    d = distances_to_reference(features(x), real, ref)
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
           f'{d["num_compared"]} samples (real digits at {d["num_compared"]}: '
           f'{d["frechet_real_at_n"]:.3f}; all {len(x)} samples: {d["frechet_distance"]:.3f}), '
           f'KID {d["kid"]:.4f} ± {d["kid_std"]:.4f} (real digits: {d["kid_real"]:.4f}), '
           f'confidence {out[label]["mean_confidence"]:.3f}')
  return out
