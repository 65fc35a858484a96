"""Tests for diffusion_jax.evaluation.classifier: the offline digits feature network.

Uses scikit-learn's bundled digits (no download) with a seeded split, scaled
from [0, 16] to [-1, 1] like the project's data pipeline.
"""

import time

import numpy as np
import pytest
from sklearn.datasets import load_digits

from diffusion_jax import config_lib
from diffusion_jax.evaluation import classifier
from diffusion_jax.evaluation import metrics

STEPS = 200


@pytest.fixture(scope='module')
def digits():
  d = load_digits()
  x = (d.images.astype(np.float32) / 16.0) * 2.0 - 1.0     # [N, 8, 8] in [-1, 1]
  y = d.target.astype(np.int32)
  perm = np.random.default_rng(0).permutation(len(x))
  tr, te = perm[:1400], perm[1400:]
  return x[tr, ..., None], y[tr], x[te, ..., None], y[te]


def _config(steps=STEPS, seed=0):
  config = config_lib.digits_config()
  config.eval.classifier_steps = steps
  config.seed = seed
  return config


@pytest.fixture(scope='module')
def trained(digits, tmp_path_factory):
  """(workdir, params, seconds): trained once through the cache function."""
  x_tr, y_tr, _, _ = digits
  workdir = tmp_path_factory.mktemp('workdir')
  t0 = time.time()
  params = classifier.load_or_train_classifier(workdir, _config(), x_tr, y_tr)
  return workdir, params, time.time() - t0


def test_classifier_reaches_90_percent_on_held_out_digits(digits, trained):
  _, _, x_te, y_te = digits
  _, params, seconds = trained
  acc = classifier.classifier_accuracy(params, x_te, y_te)
  assert acc >= 0.9, f'test accuracy {acc:.3f} after {STEPS} steps ({seconds:.1f} s)'
  logits = classifier.classifier_logits(params, x_te[:7])
  assert logits.shape == (7, 10)
  # [N, H, W] input works too.
  np.testing.assert_allclose(classifier.classifier_logits(params, x_te[:7, ..., 0]),
                             logits, rtol=1e-6)


def test_frechet_distance_in_feature_space_separates_digits_from_noise(digits, trained):
  x_tr, _, x_te, _ = digits
  _, params, _ = trained
  f_tr = classifier.classifier_features(params, x_tr)
  f_te = classifier.classifier_features(params, x_te)
  assert f_tr.shape == (len(x_tr), 128)
  noise = np.random.default_rng(1).uniform(-1, 1, x_te.shape).astype(np.float32)
  f_noise = classifier.classifier_features(params, noise)
  d_real = metrics.frechet_distance_from_features(f_tr, f_te)
  d_noise = metrics.frechet_distance_from_features(f_te, f_noise)
  assert d_real >= -1e-6
  assert d_real < 0.1 * d_noise, (d_real, d_noise)
  assert classifier.classifier_frechet_distance(params, x_tr, x_te) == (
      pytest.approx(d_real, rel=1e-6))


def test_cache_round_trip_gives_identical_features(digits, trained, monkeypatch):
  x_tr, y_tr, x_te, _ = digits
  workdir, params, _ = trained
  cache = workdir / 'eval' / classifier.CACHE_NAME
  assert cache.exists()

  def fail(*args, **kwargs):
    raise AssertionError('retrained although the cache matches')
  monkeypatch.setattr(classifier, 'train_classifier', fail)
  again = classifier.load_or_train_classifier(workdir, _config(), x_tr, y_tr)
  np.testing.assert_array_equal(classifier.classifier_features(again, x_te),
                                classifier.classifier_features(params, x_te))

  # Different settings: the stale cache is not reused.
  calls = []
  monkeypatch.setattr(classifier, 'train_classifier',
                      lambda *a, **k: calls.append(k) or params)
  classifier.load_or_train_classifier(workdir, _config(steps=STEPS + 1), x_tr, y_tr)
  assert calls and calls[0]['steps'] == STEPS + 1


def test_save_load_classifier(tmp_path, trained, digits):
  _, params, _ = trained
  x_te = digits[2]
  path = tmp_path / 'clf.msgpack'
  classifier.save_classifier(path, params, {'note': 'x'})
  loaded, meta = classifier.load_classifier(path, x_te.shape[1:])
  assert meta == {'note': 'x'}
  np.testing.assert_array_equal(classifier.classifier_logits(loaded, x_te),
                                classifier.classifier_logits(params, x_te))
  with pytest.raises(ValueError):
    classifier.load_classifier(path, (16, 16, 1))
