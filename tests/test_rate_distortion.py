"""Tests for diffusion_jax.evaluation.rate_distortion (DDPM §4.3, Fig. 5).

Closed forms: an oracle denoiser for a fixed x_0 (every term of the bound is
known exactly) and the optimal denoiser for Gaussian data (the x_0-prediction
error is the Gaussian posterior variance).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion
from diffusion_jax.evaluation import rate_distortion
from diffusion_jax.schedule import make_schedule


def test_rate_distortion_synthetic():
  vb = np.array([0.5, 0.1, 0.2, 0.3])          # column 0 = L_0
  mse = np.array([0.0, 0.01, 0.04, 0.09])
  rd = rate_distortion.rate_distortion(vb, mse, 2.0)
  np.testing.assert_array_equal(rd['t'], [3, 2, 1, 0])
  np.testing.assert_array_equal(rd['reverse_steps'], [0, 1, 2, 3])
  np.testing.assert_allclose(rd['rate_bpd'], [2.0, 2.3, 2.5, 2.6])
  np.testing.assert_allclose(rd['distortion_rmse'], np.array([0.3, 0.2, 0.1, 0.0]) * 127.5)
  total = 2.0 + vb.sum()
  np.testing.assert_allclose(rd['rate_bpd'][-1], total - vb[0])
  # [B, T] inputs are averaged over the batch.
  rd2 = rate_distortion.rate_distortion(np.stack([vb, vb]), np.stack([mse, mse]), np.array([2.0, 2.0]))
  np.testing.assert_allclose(rd2['rate_bpd'], rd['rate_bpd'])


@pytest.fixture(scope='module')
def sched():
  return make_schedule('linear', 50, beta_start=1e-3, beta_end=0.2)


def test_rate_distortion_oracle_matches_closed_form(sched):
  """Oracle eps for a fixed x_0: pred_x0 = x_0, so every term of the bound is known.

  - distortion 0 at every t;
  - L_t (t >= 1) = KL(N(mu~, beta~) || N(mu~, sigma^2)) = (log(sigma^2/beta~) + beta~/sigma^2 - 1)/2,
    0 for sigma^2 = beta~ (fixed_small), > 0 for sigma^2 = beta (fixed_large);
  - L_T = KL(N(sqrt(abar_T) x_0, 1 - abar_T) || N(0, 1));
  - L_0 = -log P(bin of x_0) under N(x_0, beta~_1) (interior pixels).
  """
  s = sched
  T = s.num_timesteps
  ints = jax.random.randint(jax.random.PRNGKey(0), (3, 4, 4, 1), 1, 255)
  x0 = ints.astype(jnp.float32) / 127.5 - 1.0                  # interior 8-bit values
  oracle = lambda x_t, t: diffusion.eps_from_x0(s, x_t, t, x0)
  run = jax.jit(lambda rng: {v: diffusion.calc_bpd_loop(s, oracle, x0, rng, var_type=v)
                             for v in ('fixed_small', 'fixed_large')})
  outs = run(jax.random.PRNGKey(1))
  betas = np.asarray(s.betas, np.float64)
  abar = np.cumprod(1 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  beta_tilde = betas * (1 - abar_prev) / (1 - abar)
  ln2 = math.log(2.0)
  x = np.asarray(x0, np.float64)
  prior = np.mean(0.5 * (-1 - np.log(1 - abar[-1]) + (1 - abar[-1]) + abar[-1] * x ** 2)) / ln2
  sd = math.sqrt(beta_tilde[1])
  cdf = lambda z: np.asarray(diffusion.approx_standard_normal_cdf(jnp.asarray(z)), np.float64)
  l0 = -math.log(cdf(1 / 255 / sd) - cdf(-1 / 255 / sd)) / ln2
  kl_large = np.zeros(T)
  kl_large[1:] = 0.5 * (np.log(betas[1:] / beta_tilde[1:]) + beta_tilde[1:] / betas[1:] - 1) / ln2
  for var_type, kl in (('fixed_small', np.zeros(T)), ('fixed_large', kl_large)):
    out = jax.tree.map(np.asarray, outs[var_type])
    rd = rate_distortion.rate_distortion(out['vb'], out['xstart_mse'], out['prior_bpd'])
    np.testing.assert_allclose(rd['distortion_rmse'], 0.0, atol=0.05)
    np.testing.assert_allclose(out['vb'][:, 1:].mean(0), kl[1:], rtol=2e-3, atol=2e-5)
    np.testing.assert_allclose(out['prior_bpd'].mean(), prior, rtol=1e-4)
    np.testing.assert_allclose(out['vb'][:, 0].mean(), l0, rtol=2e-3)
    expected_rate = prior + np.append(np.cumsum(kl[::-1])[::-1][1:], 0.0)[::-1]
    np.testing.assert_allclose(rd['rate_bpd'], expected_rate, rtol=2e-3, atol=2e-5)
    assert np.all(np.diff(rd['rate_bpd']) >= -1e-6)
    end = np.mean(out['total_bpd'].astype(np.float64) - out['vb'][:, 0])
    np.testing.assert_allclose(rd['rate_bpd'][-1], end, rtol=1e-5, atol=1e-6)


def test_distortion_decreases_for_the_optimal_gaussian_denoiser(sched):
  """Data N(mu, sigma^2): the optimal x_0 prediction has MSE sigma^2 (1-abar) / (abar sigma^2 + 1-abar).

  That posterior variance decreases as t decreases, so the distortion curve of
  the exact denoiser is monotone; the measured x0-MSE of calc_bpd_loop matches it.
  """
  s = sched
  mu, sigma = 0.1, 0.3

  def gaussian_eps(x_t, t):
    a = diffusion.extract(s.alphas_cumprod, t, x_t.shape)
    return jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * mu) / (a * sigma ** 2 + 1 - a)

  x0 = mu + sigma * jax.random.normal(jax.random.PRNGKey(2), (64, 8, 8, 1))
  out = jax.jit(lambda r: diffusion.calc_bpd_loop(s, gaussian_eps, x0, r, clip_denoised=False))(
      jax.random.PRNGKey(3))
  abar = np.cumprod(1 - np.asarray(s.betas, np.float64))
  optimal = sigma ** 2 * (1 - abar) / (abar * sigma ** 2 + 1 - abar)
  measured = np.asarray(out['xstart_mse']).mean(0)
  np.testing.assert_allclose(measured, optimal, rtol=0.1)
  rd = rate_distortion.rate_distortion(np.asarray(out['vb']), optimal, np.asarray(out['prior_bpd']))
  assert np.all(np.diff(rd['distortion_rmse']) <= 0)            # non-increasing along the chain
  assert np.all(np.diff(rd['rate_bpd']) >= -1e-9)               # KL terms are >= 0
  rd_measured = rate_distortion.rate_distortion(out['vb'], out['xstart_mse'], out['prior_bpd'])
  assert rd_measured['distortion_rmse'][-1] < 0.2 * rd_measured['distortion_rmse'][0]
