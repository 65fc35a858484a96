"""Tests for diffusion_jax.sde against the closed forms of Gaussian data.

Data N(mu, Sigma) in D dimensions (Sigma = Q diag(lam) Q^T) has, at noise level
abar, x_t ~ N(sqrt(abar) mu, abar Sigma + (1 - abar) I), so

- the optimal noise predictor is eps*(x, t) = sqrt(1 - abar) (abar Sigma + (1 - abar) I)^-1
  (x - sqrt(abar) mu);
- the probability-flow ODE keeps the standardised value
  z_i = (Q^T (x_t - sqrt(abar) mu))_i / sqrt(abar lam_i + 1 - abar) constant;
- hence log p_0(x) = log N(x_{T-1}; 0, I) + sum_i log(sd_{T-1,i} / sd_{0,i}).
"""

import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import config_lib, samplers, sde, settings
from diffusion_jax.evaluation import ode_bpd
from diffusion_jax.models import layers
from diffusion_jax.schedule import make_schedule

D = 4
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope='module')
def sched():
  return make_schedule('linear', 1000)


@pytest.fixture(scope='module')
def gauss():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(D, D))
  sigma = a @ a.T / D + 0.05 * np.eye(D)
  mu = rng.normal(size=D) * 0.5
  lam, q = np.linalg.eigh(sigma)
  return dict(mu=mu, sigma=sigma, lam=lam, q=q)


def gaussian_model(s, g, mean_type='eps'):
  """The optimal model output for N(mu, Sigma) data at real (float) t, [B, D] in and out."""
  mu, sigma = jnp.asarray(g['mu'], jnp.float32), jnp.asarray(g['sigma'], jnp.float32)

  def model_fn(x, t):
    abar = sde.alpha_bar(s, t)[:, None, None]
    cov = abar * sigma + (1.0 - abar) * jnp.eye(D)
    resid = x - jnp.sqrt(abar[..., 0]) * mu
    eps = jnp.sqrt(1.0 - abar[..., 0]) * jnp.linalg.solve(cov, resid[..., None])[..., 0]
    if mean_type == 'eps':
      return eps
    a = abar[..., 0]
    x0 = (x - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
    return x0 if mean_type == 'x0' else jnp.sqrt(a) * eps - jnp.sqrt(1.0 - a) * x0

  return model_fn


def _abar64(s, t):
  return float(np.cumprod(1.0 - np.asarray(s.betas, np.float64))[t])


def _sd(g, abar):
  return np.sqrt(abar * g['lam'] + 1.0 - abar)


def exact_flow(s, g, x, t_from, t_to):
  """The closed-form probability-flow map from integer index t_from to t_to (float64)."""
  a0, a1 = _abar64(s, t_from), _abar64(s, t_to)
  z = (np.asarray(x, np.float64) - np.sqrt(a0) * g['mu']) @ g['q'] / _sd(g, a0)
  return np.sqrt(a1) * g['mu'] + (z * _sd(g, a1)) @ g['q'].T


def exact_log_p(s, g, x0):
  """log p_0(x0) of the ODE model with prior N(0, I) at index T-1, in nats (float64)."""
  T = s.num_timesteps
  x_T = exact_flow(s, g, x0, 0, T - 1)
  log_prior = -0.5 * np.sum(x_T ** 2, -1) - 0.5 * D * math.log(2 * math.pi)
  return log_prior + np.sum(np.log(_sd(g, _abar64(s, T - 1)) / _sd(g, _abar64(s, 0))))


# --- the schedule in continuous time -----------------------------------------------------------


def test_abar_and_beta_match_the_discrete_schedule_at_integer_t(sched):
  T = sched.num_timesteps
  betas64 = np.asarray(sched.betas, np.float64)
  abar64 = np.cumprod(1.0 - betas64)
  t = jnp.arange(T, dtype=jnp.float32)
  np.testing.assert_allclose(sde.alpha_bar(sched, t), abar64, rtol=2e-6)
  # 1 - abar stays accurate where abar ~ 1 (log1p / expm1, not 1 - float32 abar).
  one_minus = -np.expm1(np.asarray(sde.log_alpha_bar(sched, t), np.float64))
  np.testing.assert_allclose(one_minus, 1.0 - abar64, rtol=1e-4)
  # beta(t) on [i, i+1) is -log(1 - beta_{i+1}) = beta_{i+1} + O(beta^2).
  b = np.asarray(sde.beta(sched, t[:-1]), np.float64)
  np.testing.assert_allclose(b, -np.log1p(-betas64[1:]), rtol=1e-5)
  assert np.all(np.abs(b - betas64[1:]) <= betas64[1:] ** 2)
  # Piecewise-linear log abar: midpoints average their neighbours, the slope is -beta.
  la = np.log(abar64)
  mid = np.asarray(sde.log_alpha_bar(sched, t[:-1] + 0.5), np.float64)
  np.testing.assert_allclose(mid, 0.5 * (la[:-1] + la[1:]), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(sde.beta(sched, t[:-1] + 0.25)), b, rtol=1e-6)
  np.testing.assert_allclose(np.sum(b), la[0] - la[-1], rtol=1e-5)


def test_timestep_embedding_takes_real_t_and_is_unchanged_at_integers():
  t_int = jnp.array([0, 3, 999], jnp.int32)
  np.testing.assert_array_equal(layers.get_timestep_embedding(t_int, 16),
                                layers.get_timestep_embedding(t_int.astype(jnp.float32), 16))
  half = layers.get_timestep_embedding(jnp.array([3.5], jnp.float32), 16)
  lo, hi = (layers.get_timestep_embedding(jnp.array([v], jnp.float32), 16) for v in (3.0, 4.0))
  assert not np.allclose(half, lo) and not np.allclose(half, hi)


# --- the probability-flow ODE ----------------------------------------------------------------


@pytest.fixture(scope='module')
def flow_run(sched, gauss):
  """One jitted sample, encode and round trip for the eps, x0 and v parameterisations."""
  x_T = jax.random.normal(jax.random.PRNGKey(1), (8, D))
  x_data = jnp.asarray(np.random.default_rng(2).multivariate_normal(gauss['mu'],
                                                                   gauss['sigma'], 8),
                       jnp.float32)

  @jax.jit
  def run(x_T, x_data):
    out = {}
    for mt in ('eps', 'x0', 'v'):
      fn = gaussian_model(sched, gauss, mt)
      out[mt] = sde.probability_flow_sample(sched, fn, jax.random.PRNGKey(0), x_T.shape,
                                            mean_type=mt, x_T=x_T, **TOL)
    fn = gaussian_model(sched, gauss)
    enc, nfe_enc = sde.ode_encode(sched, fn, x_data, **TOL)
    back, nfe_back = sde.probability_flow_sample(sched, fn, jax.random.PRNGKey(0), x_T.shape,
                                                 x_T=enc, **TOL)
    return out, (enc, nfe_enc), (back, nfe_back)

  return dict(x_T=x_T, x_data=x_data, results=run(x_T, x_data))


def test_ode_sample_matches_the_closed_form_map(sched, gauss, flow_run):
  x0, nfe = flow_run['results'][0]['eps']
  want = exact_flow(sched, gauss, flow_run['x_T'], sched.num_timesteps - 1, 0)
  chex.assert_shape(x0, (8, D))
  np.testing.assert_allclose(x0, want, atol=2e-4)
  assert 10 < int(nfe) < 2000


@pytest.mark.parametrize('mean_type', ['x0', 'v'])
def test_x0_and_v_parameterisations_give_the_same_flow(sched, gauss, flow_run, mean_type):
  # x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) loses float32 digits where abar ~ 4e-5.
  out = flow_run['results'][0]
  want = exact_flow(sched, gauss, flow_run['x_T'], sched.num_timesteps - 1, 0)
  np.testing.assert_allclose(out[mean_type][0], want, atol=5e-4)
  np.testing.assert_allclose(out[mean_type][0], out['eps'][0], atol=5e-4)


def test_encode_matches_the_map_and_round_trips(sched, gauss, flow_run):
  _, (enc, nfe_enc), (back, _) = flow_run['results']
  want = exact_flow(sched, gauss, flow_run['x_data'], 0, sched.num_timesteps - 1)
  np.testing.assert_allclose(enc, want, atol=2e-4)
  np.testing.assert_allclose(back, flow_run['x_data'], atol=5e-4)
  assert int(nfe_enc) > 10


def test_nfe_counts_every_model_call(sched, gauss):
  calls = []
  fn = gaussian_model(sched, gauss)

  def counting(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return fn(x, t)

  x, nfe = jax.jit(lambda r: sde.probability_flow_sample(sched, counting, r, (2, D),
                                                         rtol=1e-3, atol=1e-3))(
                                                             jax.random.PRNGKey(3))
  jax.block_until_ready(x)
  assert int(nfe) == len(calls) > 0


def test_jit_and_no_jit_agree(sched, gauss):
  fn = gaussian_model(sched, gauss)
  f = lambda r: sde.probability_flow_sample(sched, fn, r, (2, D), rtol=1e-3, atol=1e-3)
  chex.assert_trees_all_close(f(jax.random.PRNGKey(4)), jax.jit(f)(jax.random.PRNGKey(4)),
                              atol=1e-5)


def test_the_sampler_table_runs_the_ode(sched, gauss):
  config = config_lib.digits_config()
  config.sampling.sampler = 'ode'
  config.sampling.ode_rtol = config.sampling.ode_atol = 1e-4
  x_T = jax.random.normal(jax.random.PRNGKey(1), (3, D))
  got, nfe = jax.jit(lambda r: samplers.run(settings.sampler_spec(config), sched,
                                            gaussian_model(sched, gauss), r, (3, D), x_T=x_T))(
                                                jax.random.PRNGKey(0))
  assert int(nfe) > 10   # the adaptive solver's model calls come back through the table
  want = exact_flow(sched, gauss, x_T, sched.num_timesteps - 1, 0)
  np.testing.assert_allclose(got, want, atol=2e-3)


# --- likelihoods ---------------------------------------------------------------------------------


def test_exact_trace_log_likelihood_matches_the_gaussian_density(sched, gauss):
  x0 = jnp.asarray(np.random.default_rng(5).multivariate_normal(gauss['mu'], gauss['sigma'], 6),
                   jnp.float32)
  log_p, nfe = jax.jit(lambda x: sde.ode_log_likelihood(
      sched, gaussian_model(sched, gauss), x, jax.random.PRNGKey(0), exact_trace=True, **TOL))(x0)
  chex.assert_shape(log_p, (6,))
  np.testing.assert_allclose(np.asarray(log_p) / D, exact_log_p(sched, gauss, x0) / D, atol=3e-3)
  assert int(nfe) > 10


def test_hutchinson_log_likelihood_is_unbiased(sched, gauss):
  n = 512   # one point, one Rademacher probe per copy
  x0 = jnp.broadcast_to(jnp.asarray(gauss['mu'] + 0.3, jnp.float32), (n, D))
  log_p, _ = jax.jit(lambda x: sde.ode_log_likelihood(
      sched, gaussian_model(sched, gauss), x, jax.random.PRNGKey(7), **TOL))(x0)
  log_p = np.asarray(log_p, np.float64)
  stderr = log_p.std(ddof=1) / np.sqrt(n)
  assert stderr > 0   # the probes do vary
  assert abs(log_p.mean() - exact_log_p(sched, gauss, x0[:1])[0]) < 3 * stderr + 1e-3 * D


def test_dequantised_bits_per_dim():
  images = jnp.array([[0, 255, 128]], jnp.uint8)
  y = sde.dequantize(jax.random.PRNGKey(0), images)
  assert np.all((y >= -1.0) & (y < 1.0))
  assert np.all(np.floor((np.asarray(y) + 1.0) * 128.0) == np.asarray(images))
  # Uniform over [-1, 1)^D has log p = -D log 2: exactly 8 bits per dimension.
  np.testing.assert_allclose(sde.bpd_from_log_p(-3 * math.log(2.0), 3), 8.0, rtol=1e-6)


def iso_apply_fn(s, var):
  """``apply_fn(params, x, t)``: params x the optimal eps of per-pixel N(0, var) images."""
  def apply_fn(params, x, t):
    abar = sde.alpha_bar(s, t)[:, None, None, None]
    return params * jnp.sqrt(1.0 - abar) * x / (abar * var + 1.0 - abar)
  return apply_fn


def test_ode_bpd_eval_matches_the_closed_form(sched):
  """Per-pixel N(0, 0.3^2) data on 2x2 images: bits/dim of the dequantised images, batch by batch."""
  var = 0.09
  iso = dict(mu=np.zeros(D), sigma=var * np.eye(D), lam=np.full(D, var), q=np.eye(D))

  apply_fn = iso_apply_fn(sched, var)
  config = config_lib.digits_config()
  config.eval.ode_bpd_exact_trace = True
  images = np.random.default_rng(8).integers(0, 256, (5, 2, 2, 1)).astype(np.uint8)
  rng = jax.random.PRNGKey(9)
  out = ode_bpd.ode_bpd_eval(config, sched, apply_fn, 1.0, images, rng, batch_size=2, progress=False)
  chex.assert_shape(out['bpd'], (5,))
  assert out['nfe'].shape == (3,) and np.all(out['nfe'] > 10)
  want = []
  for i in range(3):   # batch i dequantises with the first half of fold_in(rng, i)
    x = images[2 * i:2 * i + 2]
    y = sde.dequantize(jax.random.split(jax.random.fold_in(rng, i))[0], x)
    log_p = exact_log_p(sched, iso, np.asarray(y).reshape(len(x), D))
    want.append(np.asarray(sde.bpd_from_log_p(log_p, D)))
  np.testing.assert_allclose(out['bpd'], np.concatenate(want), atol=3e-3)


def test_a_solve_past_max_steps_returns_nan(sched, gauss):
  x, _ = jax.jit(lambda r: sde.probability_flow_sample(
      sched, gaussian_model(sched, gauss), r, (2, D), rtol=1e-9, atol=1e-9, max_steps=3))(
          jax.random.PRNGKey(0))
  assert np.all(np.isnan(x))


def test_eval_part_ode_bpd_writes_json_with_the_bound_beside_it(sched, tmp_path):
  from diffusion_jax.evaluation import evaluate
  config = config_lib.digits_config()
  config.eval.num_ode_bpd_examples = 4
  config.sampling.ode_rtol = config.sampling.ode_atol = 1e-3
  (tmp_path / 'bpd.json').write_text(json.dumps(
      dict(step=7, total_bpd=4.5, total_bpd_stderr=0.1, num_examples=297)))
  ctx = evaluate._Context(config=config, workdir=str(tmp_path), eval_dir=str(tmp_path),
                          schedule=sched, apply_fn=iso_apply_fn(sched, 0.25), params=1.0, step=7, mesh=None,
                          rng=jax.random.PRNGKey(0))
  out = evaluate._part_ode_bpd(ctx)
  on_disk = json.loads((tmp_path / 'ode_bpd.json').read_text())
  assert on_disk == out
  assert np.isfinite(out['bpd']) and out['bpd_stderr'] > 0 and out['nfe'] > 10
  assert (out['num_examples'], out['trace'], out['bound_bpd']) == (4, 'hutchinson', 4.5)
