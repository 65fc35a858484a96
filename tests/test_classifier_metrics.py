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
