"""Tests for diffusion_jax.evaluation.classifier_metrics (the metric itself runs in test_evaluate.py)."""

import numpy as np
import pytest

from diffusion_jax import config_lib, data
from diffusion_jax.evaluation import classifier_metrics


def test_digits_labels_follow_the_splits():
  train, test = classifier_metrics.digits_labels('train'), classifier_metrics.digits_labels('test')
  assert train.shape == (1797 - data.DIGITS_NUM_TEST,) and test.shape == (data.DIGITS_NUM_TEST,)
  assert set(np.unique(train)) == set(range(10))
  with pytest.raises(ValueError, match='not a digits split'):
    classifier_metrics.digits_labels('validation')


def test_classifier_metric_is_for_digits_only(tmp_path):
  config = config_lib.digits_config()
  config.data.name = 'mnist'
  with pytest.raises(ValueError, match='data.name=digits'):
    classifier_metrics.classifier_metrics(config, str(tmp_path), {})


def test_distances_beside_real_data_at_the_same_count():
  """Samples from the real distribution score like real data at their count, whatever N.

  With 40 samples against a reference of 1500, the Fréchet distance is
  dominated by its sample-size bias; the real baseline at 40 carries the same
  bias, and KID is ~0. A shifted set is far on both.
  """
  rng = np.random.default_rng(0)
  d = 16
  ref, real = rng.standard_normal((1500, d)), rng.standard_normal((297, d))
  good = classifier_metrics.distances_to_reference(rng.standard_normal((40, d)), real, ref)
  assert good['num_compared'] == 40
  assert good['frechet_at_n'] > 1.5 and good['frechet_real_at_n'] > 1.5   # bias at N = 40
  assert 0.5 < good['frechet_at_n'] / good['frechet_real_at_n'] < 2.0
  assert abs(good['kid']) < 0.1 and abs(good['kid_real']) < 0.05
  bad = classifier_metrics.distances_to_reference(1.0 + rng.standard_normal((1000, d)), real, ref)
  assert bad['num_compared'] == 297
  assert bad['frechet_distance'] > 14 and bad['frechet_at_n'] > bad['frechet_real_at_n'] + 10
  assert bad['kid'] > 1.0 > 10 * abs(bad['kid_real'])
  assert good['frechet_real_at_n'] > 5 * bad['frechet_real_at_n']   # the bias shrinks with N


def test_reference_split_halves_the_training_digits():
  parts = classifier_metrics.reference_split(1500, seed=0)
  assert [len(parts[k]) for k in ('reference', 'real')] == [750, 750]
  np.testing.assert_array_equal(np.sort(np.concatenate(list(parts.values()))), np.arange(1500))
  again = classifier_metrics.reference_split(1500, seed=0)
  assert all(np.array_equal(parts[k], again[k]) for k in parts)
  assert not np.array_equal(parts['real'], classifier_metrics.reference_split(1500, seed=1)['real'])


def test_the_classifier_learns_on_digits_that_are_neither_reference_nor_baseline():
  config = config_lib.digits_config()
  parts = classifier_metrics._split_digits(config)   # pylint: disable=protected-access
  np.testing.assert_array_equal(parts['fit'][0], data.load_split(config, 'test'))
  np.testing.assert_array_equal(parts['fit'][1], classifier_metrics.digits_labels('test'))
  x_train = data.load_split(config, 'train')
  idx = classifier_metrics.reference_split(1500, seed=classifier_metrics.REFERENCE_SEED)
  for name in ('reference', 'real'):
    np.testing.assert_array_equal(parts[name][0], x_train[idx[name]])


@pytest.fixture(scope='module')
def honest_metric(tmp_path_factory):
  """The real baseline, the reference and distorted copies of the baseline, as features."""
  from diffusion_jax.evaluation import classifier  # pylint: disable=g-import-not-at-top
  config = config_lib.digits_config()
  config.eval.classifier_steps = 500
  params = classifier_metrics.load_digit_classifier(config, str(tmp_path_factory.mktemp('wd')))
  parts = classifier_metrics._split_digits(config)   # pylint: disable=protected-access
  x_real = parts['real'][0]
  blurred = (x_real + np.roll(x_real, 1, 1) + np.roll(x_real, 1, 2) + np.roll(x_real, (1, 1), (1, 2))) / 4
  shuffled = x_real.reshape(len(x_real), -1)[:, np.random.default_rng(0).permutation(64)]
  features = lambda x: classifier.classifier_features(params, np.asarray(x).reshape((-1,) + x_real.shape[1:]))  # noqa: E731
  return (features(parts['reference'][0]), features(x_real),
          {'blurred': features(blurred), 'shuffled': features(shuffled)})


def test_real_digits_are_the_floor_kid_within_two_standard_errors_of_zero(honest_metric):
  ref, real, _ = honest_metric
  d = classifier_metrics.distances_to_reference(real, real, ref)
  assert d['kid_real_std'] > 0
  assert abs(d['kid_real']) < 2 * d['kid_real_std'], (d['kid_real'], d['kid_real_std'])


def test_blurred_and_shuffled_digits_are_clearly_worse_than_real(honest_metric):
  ref, real, distorted = honest_metric
  for name, feats in distorted.items():
    d = classifier_metrics.distances_to_reference(feats, real, ref)
    assert d['frechet_at_n'] > 3 * d['frechet_real_at_n'], name
    assert d['kid'] > d['kid_real'] + 10 * d['kid_std'], name
