"""Tests for diffusion_jax.classifier_metrics (the metric itself runs in test_evaluate.py)."""

import numpy as np
import pytest

from diffusion_jax import classifier_metrics, config_lib, data


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
