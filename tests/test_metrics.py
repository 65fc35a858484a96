"""Tests for diffusion_jax.evaluation.metrics: Fréchet distance, Inception Score, stats files.

The closed forms are computed here without scipy.linalg.sqrtm (eigh-based
square roots, or diagonal/commuting covariances), so they check the
library's sqrtm path independently.
"""

import numpy as np
import pytest

from diffusion_jax.evaluation import metrics


def _psd_sqrt(a):
  """Symmetric PSD square root by eigendecomposition (independent of sqrtm)."""
  w, v = np.linalg.eigh(a)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _frechet_reference(mu1, s1, mu2, s2):
  """||m1-m2||^2 + tr(S1 + S2 - 2 (S1^{1/2} S2 S1^{1/2})^{1/2}).

  tr((S1 S2)^{1/2}) = tr((S1^{1/2} S2 S1^{1/2})^{1/2}) (similar matrices).
  """
  r1 = _psd_sqrt(s1)
  cross = _psd_sqrt(r1 @ s2 @ r1)
  d = mu1 - mu2
  return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross)


def _random_cov(rng, d, scale=1.0):
  a = rng.normal(size=(d, d))
  return scale * (a @ a.T / d + 0.1 * np.eye(d))


def test_feature_statistics_matches_numpy_ddof1():
  rng = np.random.default_rng(0)
  f = rng.normal(size=(50, 7)).astype(np.float32)
  mu, sigma = metrics.feature_statistics(f)
  assert mu.dtype == np.float64 and sigma.dtype == np.float64
  assert mu.shape == (7,) and sigma.shape == (7, 7)
  np.testing.assert_allclose(mu, f.astype(np.float64).mean(0), rtol=1e-12)
  centred = f.astype(np.float64) - f.astype(np.float64).mean(0)
  np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-10)
  with pytest.raises(ValueError):
    metrics.feature_statistics(f[:1])


def test_frechet_distance_of_a_set_with_itself_is_zero():
  rng = np.random.default_rng(1)
  f = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32))
  mu, sigma = metrics.feature_statistics(f)
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
  assert abs(metrics.frechet_distance_from_features(f, f)) < 1e-6


def test_frechet_distance_diagonal_closed_form():
  mu1, var1 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 4.0, 0.25])
  mu2, var2 = np.array([1.0, 1.0, 0.0]), np.array([9.0, 1.0, 0.25])
  # By hand: ||dmu||^2 = 1 + 0 + 4; sum (sqrt v1 - sqrt v2)^2 = 4 + 1 + 0.
  expected = 10.0
  got = metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
  assert got == pytest.approx(expected, abs=1e-9)
  assert metrics.gaussian_frechet_distance_closed_form(
      mu1, var1, mu2, var2) == pytest.approx(expected, abs=1e-12)


def test_frechet_distance_commuting_covariances_closed_form():
  rng = np.random.default_rng(2)
  d = 6
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  l1, l2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  s1, s2 = (q * l1) @ q.T, (q * l2) @ q.T    # same eigenvectors: commute
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
  got = metrics.frechet_distance(mu1, s1, mu2, s2)
  assert got == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_general_covariances_match_eigh_reference():
  rng = np.random.default_rng(3)
  d = 10
  s1, s2 = _random_cov(rng, d), _random_cov(rng, d, scale=2.0)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  expected = _frechet_reference(mu1, s1, mu2, s2)
  got = metrics.frechet_distance(mu1, s1, mu2, s2)
  assert got == pytest.approx(expected, rel=1e-8)
  # Symmetric in its arguments.
  assert metrics.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-8)


def test_frechet_distance_of_samples_approaches_the_gaussian_value():
  rng = np.random.default_rng(4)
  d, n = 4, 40_000
  s1, s2 = _random_cov(rng, d), _random_cov(rng, d, scale=0.5)
  mu1, mu2 = np.zeros(d), np.full(d, 0.5)
  expected = _frechet_reference(mu1, s1, mu2, s2)
  x1 = rng.multivariate_normal(mu1, s1, size=n)
  x2 = rng.multivariate_normal(mu2, s2, size=n)
  got = metrics.frechet_distance_from_features(x1, x2)
  assert got == pytest.approx(expected, rel=0.05, abs=5e-3)
  # A smaller sample is further off on average (bias ~ d/n), but still close.
  got_small = metrics.frechet_distance_from_features(x1[:2000], x2[:2000])
  assert got_small == pytest.approx(expected, rel=0.25, abs=0.05)


def test_frechet_distance_singular_covariances_are_finite():
  rng = np.random.default_rng(5)
  # Fewer samples than dimensions: rank-deficient covariances (as pytorch-fid
  # warns about); the eps-offset path keeps the result finite.
  f1, f2 = rng.normal(size=(5, 20)), rng.normal(size=(5, 20)) + 1.0
  got = metrics.frechet_distance_from_features(f1, f2)
  assert np.isfinite(got) and got > 0
  zero = np.zeros((3, 3))
  assert metrics.frechet_distance(np.zeros(3), zero, np.ones(3), zero) == (
      pytest.approx(3.0, abs=1e-6))


def test_frechet_distance_rejects_non_covariances_and_bad_shapes():
  # diag(1, -1) is not a covariance (its square root would be imaginary).
  with pytest.raises(ValueError, match='not positive semi-definite'):
    metrics.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]),
                             np.zeros(2), np.eye(2))
  with pytest.raises(ValueError):
    metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def _one_hot_balanced(k, per_split, num_splits):
  """Confident predictions cycling through k classes: every split has each class."""
  labels = np.tile(np.arange(k), per_split * num_splits)
  return np.eye(k)[labels]


@pytest.mark.parametrize('k', [2, 10, 100])
def test_inception_score_of_uniform_confident_predictions_is_k(k):
  probs = _one_hot_balanced(k, per_split=2, num_splits=10)
  mean, std = metrics.inception_score(probs, num_splits=10)
  assert mean == pytest.approx(k, rel=1e-9)
  assert std == pytest.approx(0.0, abs=1e-9)
  # Confident logits instead of probabilities: softmax is one-hot to ~1e-13.
  mean_logits, _ = metrics.inception_score(60.0 * probs, num_splits=10)
  assert mean_logits == pytest.approx(k, rel=1e-6)


def test_inception_score_of_identical_predictions_is_one():
  rng = np.random.default_rng(6)
  p = rng.dirichlet(np.ones(12))
  probs = np.tile(p, (100, 1))
  mean, std = metrics.inception_score(probs, num_splits=5)
  assert mean == pytest.approx(1.0, abs=1e-9) and std == pytest.approx(0, abs=1e-9)
  logits = np.tile(rng.normal(size=12), (100, 1))
  assert metrics.inception_score(logits)[0] == pytest.approx(1.0, abs=1e-9)


def test_inception_score_matches_the_improved_gan_formula():
  rng = np.random.default_rng(7)
  logits = 3.0 * rng.normal(size=(200, 20))
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  # Salimans et al.'s code: per split, kl = p (log p - log mean p), exp(mean sum kl).
  scores = []
  for part in np.split(probs, 4):
    kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
    scores.append(np.exp(kl.sum(1).mean()))
  mean, std = metrics.inception_score(probs, num_splits=4)
  assert mean == pytest.approx(np.mean(scores), rel=1e-10)
  assert std == pytest.approx(np.std(scores), rel=1e-8)
  # Logits give the same (auto-detected, and explicit).
  assert metrics.inception_score(logits, 4)[0] == pytest.approx(mean, rel=1e-10)
  assert metrics.inception_score(logits, 4, from_logits=True)[0] == (
      pytest.approx(mean, rel=1e-10))
  with pytest.raises(ValueError):
    metrics.inception_score(probs, num_splits=0)


def test_stats_round_trip_and_missing_file_error(tmp_path):
  rng = np.random.default_rng(8)
  mu, sigma = metrics.feature_statistics(rng.normal(size=(30, 5)))
  path = tmp_path / 'ref' / 'stats.npz'
  metrics.save_stats(path, mu, sigma)
  with np.load(path) as f:
    assert sorted(f.files) == ['mu', 'sigma']
  mu2, sigma2 = metrics.load_stats(path)
  np.testing.assert_array_equal(mu, mu2)
  np.testing.assert_array_equal(sigma, sigma2)
  with pytest.raises(FileNotFoundError, match='eval.fid_stats_path'):
    metrics.load_stats(None)
  with pytest.raises(FileNotFoundError, match='eval.fid_stats_path'):
    metrics.load_stats(tmp_path / 'nope.npz')
