"""Tests for diffusion_jax.evaluation.kernel_distance: KID against closed forms."""

import numpy as np
import pytest

from diffusion_jax.evaluation import kernel_distance, metrics


def _moments_of_dot(a: float, b: float, d: int):
  """E[u], E[u^2], E[u^3] of u = x . y, x ~ N(a 1, I_d), y ~ N(b 1, I_d) independent.

  Per coordinate z = x_i y_i: E z = ab, E z^2 = (1+a^2)(1+b^2),
  E z^3 = (a^3+3a)(b^3+3b); cumulants add over the d coordinates.
  """
  m1, m2, m3 = a * b, (1 + a * a) * (1 + b * b), (a ** 3 + 3 * a) * (b ** 3 + 3 * b)
  k1, k2, k3 = d * m1, d * (m2 - m1 ** 2), d * (m3 - 3 * m2 * m1 + 2 * m1 ** 3)
  return k1, k2 + k1 ** 2, k3 + 3 * k2 * k1 + k1 ** 3


def _expected_kernel(a, b, d):
  """E (x . y / d + 1)^3 for independent x, y as above."""
  e1, e2, e3 = _moments_of_dot(a, b, d)
  return e3 / d ** 3 + 3 * e2 / d ** 2 + 3 * e1 / d + 1


def closed_form_kid(shift: float, d: int) -> float:
  """MMD^2 between N(0, I_d) and N(shift 1, I_d) under the cubic kernel."""
  return (_expected_kernel(0, 0, d) + _expected_kernel(shift, shift, d)
          - 2 * _expected_kernel(0, shift, d))


def test_one_distribution_gives_zero_at_any_size_unlike_the_frechet_distance():
  rng = np.random.default_rng(0)
  d = 16
  for n in (20, 100, 1000):
    x, y = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    kid, _ = kernel_distance.kernel_inception_distance(x, y)
    # The estimator's standard deviation is ~ sqrt(2 * 2 * var k) / n ~ 3 / n here.
    assert abs(kid) < 10 / n, (n, kid)
  small = metrics.frechet_distance_from_features(x[:20], y[:20])
  assert small > 5.0   # the Fréchet distance's sample-size bias at N = 20, d = 16


def test_shifted_gaussians_match_the_closed_form():
  d, shift = 8, 0.5
  expected = closed_form_kid(shift, d)
  assert closed_form_kid(0.0, d) == 0 and expected > 0.5
  rng = np.random.default_rng(1)
  x = rng.standard_normal((3000, d))
  y = shift + rng.standard_normal((2000, d))
  kid, std = kernel_distance.kernel_inception_distance(x, y, subset_size=1000, num_subsets=20)
  assert std > 0
  np.testing.assert_allclose(kid, expected, rtol=0.05)
  full = kernel_distance.mmd2_unbiased(x, y)
  np.testing.assert_allclose(full, expected, rtol=0.05)


def test_kernel_and_errors():
  x = np.array([[1.0, 2.0]])
  np.testing.assert_allclose(kernel_distance.polynomial_kernel(x, x), [[(5 / 2 + 1) ** 3]])
  with pytest.raises(ValueError, match='at least 2 points'):
    kernel_distance.mmd2_unbiased(x, np.zeros((3, 2)))


def test_jackknife_standard_error_matches_the_spread_over_independent_draws():
  """The jackknife SE of the full-set estimate equals its std over many independent data sets."""
  rng = np.random.default_rng(2)
  d, m, n = 4, 60, 90
  draws, ses = [], []
  for _ in range(300):
    x, y = rng.standard_normal((m, d)), 0.3 + rng.standard_normal((n, d))
    value, se = kernel_distance.mmd2_with_stderr(x, y)
    np.testing.assert_allclose(value, kernel_distance.mmd2_unbiased(x, y), rtol=1e-10)
    draws.append(value)
    ses.append(se)
  np.testing.assert_allclose(np.mean(ses), np.std(draws), rtol=0.2)
  np.testing.assert_allclose(np.mean(draws), closed_form_kid(0.3, d), rtol=0.15)
  # Leave-one-out estimates from the row sums equal brute-force recomputation.
  x, y = rng.standard_normal((5, d)), rng.standard_normal((4, d))
  loo = [kernel_distance.mmd2_unbiased(np.delete(x, i, 0), y) for i in range(5)]
  loo += [kernel_distance.mmd2_unbiased(x, np.delete(y, j, 0)) for j in range(4)]
  lx, ly = np.array(loo[:5]), np.array(loo[5:])
  expected = np.sqrt(4 / 5 * np.sum((lx - lx.mean()) ** 2) + 3 / 4 * np.sum((ly - ly.mean()) ** 2))
  np.testing.assert_allclose(kernel_distance.mmd2_with_stderr(x, y)[1], expected, rtol=1e-10)
