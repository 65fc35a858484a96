"""Tests for diffusion_jax.schedule against closed forms computed independently."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import schedule as schedule_lib


@pytest.mark.parametrize('name', schedule_lib.SCHEDULES)
def test_alphas_cumprod_strictly_decreasing_and_in_unit_interval(name):
  s = schedule_lib.make_schedule(name, 1000)
  abar = np.asarray(s.alphas_cumprod, np.float64)
  assert np.all(np.diff(abar) < 0)
  assert 0 < abar[-1] < abar[0] < 1
  chex.assert_shape([s.betas, s.alphas_cumprod, s.posterior_variance], (1000,))


def test_linear_endpoints_and_abar_product():
  s = schedule_lib.make_schedule('linear', 1000)
  betas = np.linspace(1e-4, 0.02, 1000)
  np.testing.assert_allclose(s.betas, betas, rtol=1e-6)
  np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-5)
  # abar_T for the DDPM schedule is about 4e-5 (the prior term is tiny).
  assert 3e-5 < float(s.alphas_cumprod[-1]) < 5e-5


def test_alphas_cumprod_prev_is_shifted_with_one():
  s = schedule_lib.make_schedule('linear', 50)
  assert float(s.alphas_cumprod_prev[0]) == 1.0
  np.testing.assert_array_equal(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])


@pytest.mark.parametrize('name', ['linear', 'cosine', 'quadratic'])
def test_posterior_variance_formula(name):
  s = schedule_lib.make_schedule(name, 300)
  beta = np.asarray(s.betas, np.float64)
  abar = np.cumprod(1 - beta)
  abar_prev = np.append(1.0, abar[:-1])
  expected = beta * (1 - abar_prev) / (1 - abar)
  np.testing.assert_allclose(s.posterior_variance, expected, rtol=5e-5, atol=1e-12)
  assert float(s.posterior_variance[0]) == 0.0
  # log variance is clipped: entry 0 replaced by entry 1.
  np.testing.assert_allclose(s.posterior_log_variance_clipped[0], np.log(expected[1]), rtol=1e-6)
  np.testing.assert_allclose(s.posterior_log_variance_clipped[1:], np.log(expected[1:]), rtol=1e-5,
                             atol=1e-7)


def test_posterior_mean_coefficients():
  s = schedule_lib.make_schedule('linear', 100)
  beta = np.linspace(1e-4, 0.02, 100)
  abar = np.cumprod(1 - beta)
  abar_prev = np.append(1.0, abar[:-1])
  np.testing.assert_allclose(s.posterior_mean_coef1, beta * np.sqrt(abar_prev) / (1 - abar),
                             rtol=1e-5)
  np.testing.assert_allclose(s.posterior_mean_coef2,
                             (1 - abar_prev) * np.sqrt(1 - beta) / (1 - abar), rtol=1e-5)


def test_cosine_matches_closed_form():
  T, s_off = 1000, 0.008
  s = schedule_lib.make_schedule('cosine', T)
  f = lambda t: math.cos((t / T + s_off) / (1 + s_off) * math.pi / 2) ** 2
  expected_abar = np.array([f(t) / f(0) for t in range(1, T + 1)])
  betas = np.minimum(1 - expected_abar / np.append(1.0, expected_abar[:-1]), 0.999)
  np.testing.assert_allclose(s.betas, betas, rtol=1e-5)
  # Where no beta is clipped, abar_t is exactly the cosine closed form.
  np.testing.assert_allclose(s.alphas_cumprod[:-1], expected_abar[:-1], rtol=1e-5, atol=1e-7)
  assert float(s.betas[-1]) == pytest.approx(0.999)


def test_computed_in_float64_then_cast():
  s = schedule_lib.make_schedule('linear', 1000)
  chex.assert_type(s.alphas_cumprod, jnp.float32)
  # A float32 cumprod drifts from the float64 one; the schedule must hold the
  # float64 result rounded once.
  beta = np.linspace(1e-4, 0.02, 1000)
  exact = np.cumprod(1 - beta).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(s.alphas_cumprod), exact)
  s16 = schedule_lib.make_schedule('linear', 10, dtype=jnp.bfloat16)
  chex.assert_type(s16.betas, jnp.bfloat16)


def test_schedule_is_a_pytree_with_static_length():
  s = schedule_lib.make_schedule('linear', 10)
  leaves = jax.tree_util.tree_leaves(s)
  assert all(l.shape == (10,) for l in leaves)

  @jax.jit
  def f(sched):
    return sched.num_timesteps * sched.betas[0]

  np.testing.assert_allclose(f(s), 10 * 1e-4, rtol=1e-5)


def test_other_schedules_endpoints():
  q = schedule_lib.make_schedule('quadratic', 100)
  np.testing.assert_allclose([q.betas[0], q.betas[-1]], [1e-4, 0.02], rtol=1e-5)
  sg = schedule_lib.make_schedule('sigmoid', 100)
  assert np.all(np.diff(np.asarray(sg.betas)) > 0)
  c = schedule_lib.make_schedule('constant', 10, beta=0.1)
  np.testing.assert_allclose(c.alphas_cumprod, 0.9 ** np.arange(1, 11), rtol=1e-5)


def test_single_step_schedule():
  s = schedule_lib.make_schedule('constant', 1, beta=0.5)
  assert s.num_timesteps == 1
  assert np.isfinite(np.asarray(s.posterior_log_variance_clipped)).all()


@pytest.mark.parametrize('args,kw,match', [
    (('nope', 10), {}, 'allowed values: linear, cosine'),
    (('linear', 0), {}, 'num_timesteps'),
    (('linear', -3), {}, 'num_timesteps'),
    (('linear', 10), dict(beta_start=0.0), r'open interval \(0, 1\)'),
    (('linear', 10), dict(beta_end=1.5), r'open interval \(0, 1\)'),
    (('cosine', 10), dict(beta_start=0.1), 'bad keyword'),
])
def test_bad_arguments_raise(args, kw, match):
  with pytest.raises(ValueError, match=match):
    schedule_lib.make_schedule(*args, **kw)
