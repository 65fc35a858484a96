"""Tests for diffusion_jax.sampling: ancestral, progressive, DDIM, PC, DPM-Solver++ (the math)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion, sampling
from diffusion_jax.schedule import make_schedule

SHAPE = (4, 4, 4, 1)


def oracle_model(s, x0):
  """The exact eps for data that is always ``x0``: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
  return lambda x_t, t: diffusion.eps_from_x0(s, x_t, t, x0)


def gaussian_model(s, mu, sigma):
  """The optimal eps for data N(mu, sigma^2) per dimension.

  x_t ~ N(sqrt(abar) mu, abar sigma^2 + 1 - abar), so
  eps* = -sqrt(1 - abar) grad log q(x_t)
       = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar sigma^2 + 1 - abar).
  """
  def model_fn(x_t, t):
    abar = diffusion.extract(s.alphas_cumprod, t, x_t.shape)
    return jnp.sqrt(1 - abar) * (x_t - jnp.sqrt(abar) * mu) / (abar * sigma ** 2 + 1 - abar)
  return model_fn


def jrun(sampler, *args, **kw):
  """Calls ``sampler(*args, **kw)`` under ``jax.jit`` (one compile; faster than eager)."""
  *head, rng, shape = args
  return jax.jit(lambda r: sampler(*head, r, shape, **kw))(rng)


def zero_model(x_t, t):
  del t
  return jnp.zeros_like(x_t)


@pytest.fixture(scope='module')
def sched():
  return make_schedule('linear', 50, beta_start=1e-3, beta_end=0.2)


@pytest.fixture(scope='module')
def x0_target():
  return jax.random.uniform(jax.random.PRNGKey(42), SHAPE, minval=-0.9, maxval=0.9)


# --- oracle denoiser -------------------------------------------------------------------
# Every sampler variant runs in ONE jitted call (module fixture): XLA's per-compile
# overhead dominates on CPU, so this keeps the file fast; each check is its own test.

ORACLE_RUNS = {
    'ancestral': lambda s, m, m2, r: sampling.p_sample_loop(s, m, r, SHAPE),
    'ancestral_learned_range': lambda s, m, m2, r: sampling.p_sample_loop(
        s, m2, r, SHAPE, var_type='learned_range'),
    'ddim_uniform10': lambda s, m, m2, r: sampling.ddim_sample_loop(s, m, r, SHAPE, num_steps=10),
    'ddim_quadratic7_eta1': lambda s, m, m2, r: sampling.ddim_sample_loop(
        s, m, r, SHAPE, num_steps=7, eta=1.0, skip_type='quadratic'),
    'ddim_learned_range': lambda s, m, m2, r: sampling.ddim_sample_loop(
        s, m2, r, SHAPE, num_steps=10),
    'pc': lambda s, m, m2, r: sampling.pc_sample_loop(s, m, r, SHAPE, num_corrector_steps=2),
    'dpm_solver2_uniform10': lambda s, m, m2, r: sampling.dpm_solver_sample_loop(
        s, m, r, SHAPE, num_steps=10),
    'dpm_solver3_quadratic7_learned_range': lambda s, m, m2, r: sampling.dpm_solver_sample_loop(
        s, m2, r, SHAPE, num_steps=7, order=3, skip_type='quadratic'),
}


@pytest.fixture(scope='module')
def oracle_samples(sched, x0_target):
  eps = oracle_model(sched, x0_target)
  # learned-range output: 2C channels, the last C (v) must not affect the mean.
  eps2 = lambda x, t: jnp.concatenate([eps(x, t), 0.5 * jnp.ones_like(x)], axis=-1)
  run = jax.jit(lambda r: {k: f(sched, eps, eps2, r) for k, f in ORACLE_RUNS.items()})
  return run(jax.random.PRNGKey(0))


@pytest.mark.parametrize('name', sorted(ORACLE_RUNS))
def test_oracle_denoiser_returns_x0(oracle_samples, x0_target, name):
  np.testing.assert_allclose(oracle_samples[name], x0_target, atol=1e-4)


# --- Gaussian data: sample moments -------------------------------------------------------

MU, SIGMA = 0.3, 0.5
GAUSS_SHAPE = (256, 4, 4, 1)   # 4096 scalar samples

GAUSS_RUNS = {
    'ancestral_large': lambda s, m, r: sampling.p_sample_loop(
        s, m, r, GAUSS_SHAPE, var_type='fixed_large', clip_denoised=False),
    'ancestral_small': lambda s, m, r: sampling.p_sample_loop(
        s, m, r, GAUSS_SHAPE, var_type='fixed_small', clip_denoised=False),
    'ddim100_eta0': lambda s, m, r: sampling.ddim_sample_loop(
        s, m, r, GAUSS_SHAPE, num_steps=100, eta=0.0, clip_denoised=False),
    'ddim100_eta1': lambda s, m, r: sampling.ddim_sample_loop(
        s, m, r, GAUSS_SHAPE, num_steps=100, eta=1.0, clip_denoised=False),
    'pc': lambda s, m, r: sampling.pc_sample_loop(s, m, r, GAUSS_SHAPE, clip_denoised=False),
    'pc_respaced50': lambda s, m, r: sampling.pc_sample_loop(
        s, m, r, GAUSS_SHAPE, num_steps=50, clip_denoised=False),
}


@pytest.fixture(scope='module')
def gaussian_samples():
  s = make_schedule('cosine', 200)
  m = gaussian_model(s, MU, SIGMA)
  run = jax.jit(lambda r: {k: f(s, m, r) for k, f in GAUSS_RUNS.items()})
  return jax.tree.map(np.asarray, run(jax.random.PRNGKey(3)))


@pytest.mark.parametrize('name', sorted(GAUSS_RUNS))
def test_gaussian_data_moments(gaussian_samples, name):
  x = gaussian_samples[name]
  n = x.size
  se_mean, se_std = SIGMA / np.sqrt(n), SIGMA / np.sqrt(2 * n)
  # Monte Carlo error (4 standard errors) plus a small discretisation bias
  # (e.g. fixed_small underestimates the reverse variance by ~0.02 at T=200).
  assert abs(x.mean() - MU) < 4 * se_mean + 0.01, (name, x.mean())
  assert abs(x.std() - SIGMA) < 4 * se_std + 0.02, (name, x.std())


# --- exact relations between samplers ------------------------------------------------------


def test_exact_relations_between_samplers(sched):
  """Same rng, hence the same x_T and the same per-step noise:

  - DDIM with every timestep and eta=1 has sigma_t^2 = beta~_t, so eq. 12 is the
    posterior mean plus the same noise: ancestral ``fixed_small``;
  - PC without corrector steps is ancestral sampling;
  - the progressive sampler's x_0 is p_sample_loop's.
  """
  model_fn = gaussian_model(sched, MU, SIGMA)
  T = sched.num_timesteps

  def run(rng):
    kw = dict(clip_denoised=False)
    return dict(
        small=sampling.p_sample_loop(sched, model_fn, rng, SHAPE, var_type='fixed_small', **kw),
        ddim=sampling.ddim_sample_loop(sched, model_fn, rng, SHAPE, num_steps=T, eta=1.0, **kw),
        large=sampling.p_sample_loop(sched, model_fn, rng, SHAPE, **kw),
        pc0=sampling.pc_sample_loop(sched, model_fn, rng, SHAPE, num_corrector_steps=0, **kw),
        prog=sampling.p_sample_loop_progressive(sched, model_fn, rng, SHAPE, **kw)[0])

  out = jax.jit(run)(jax.random.PRNGKey(5))
  np.testing.assert_allclose(out['small'], out['ddim'], atol=1e-4)
  np.testing.assert_allclose(out['large'], out['pc0'], atol=1e-6)
  np.testing.assert_allclose(out['large'], out['prog'], atol=1e-6)
  assert not np.allclose(out['small'], out['large'])


def test_ddim_eta0_deterministic(sched):
  model_fn = gaussian_model(sched, MU, SIGMA)
  x_T = jax.random.normal(jax.random.PRNGKey(7), SHAPE)
  run = jax.jit(lambda rng, x_T, eta: sampling.ddim_sample_loop(
      sched, model_fn, rng, SHAPE, num_steps=10, eta=eta, x_T=x_T))
  a, b = run(jax.random.PRNGKey(0), x_T, 0.0), run(jax.random.PRNGKey(1), x_T, 0.0)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, run(jax.random.PRNGKey(0), x_T, 0.0))
  # eta > 0 does depend on the rng for a fixed x_T
  assert not np.allclose(a, run(jax.random.PRNGKey(1), x_T, 1.0))
  # without x_T: the same rng gives the same x_T and sample, another rng does not.
  run = jax.jit(lambda rng: sampling.ddim_sample_loop(sched, model_fn, rng, SHAPE, num_steps=10))
  c, d, e = run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(1))
  np.testing.assert_array_equal(c, d)
  assert not np.allclose(c, e)


def test_ancestral_uses_x_T_and_rng(sched):
  x_T = jax.random.normal(jax.random.PRNGKey(7), SHAPE)
  run = jax.jit(lambda rng: sampling.p_sample_loop(sched, zero_model, rng, SHAPE, x_T=x_T))
  a, b, c = run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  with pytest.raises(ValueError, match='x_T'):
    sampling.p_sample_loop(sched, zero_model, jax.random.PRNGKey(0), (2, 4, 4, 1), x_T=x_T)


# --- DDIM timesteps ------------------------------------------------------------------------


@pytest.mark.parametrize('T,n', [(1000, 50), (1000, 100), (1000, 1000), (200, 7), (10, 3)])
def test_ddim_timesteps(T, n):
  uniform = sampling.ddim_timesteps(T, n, 'uniform')
  np.testing.assert_array_equal(uniform, [i * (T // n) for i in range(n)])
  quad = sampling.ddim_timesteps(T, n, 'quadratic')
  expected = [int(v) for v in np.linspace(0, np.sqrt(T * 0.8), n) ** 2]   # DDIM paper code
  np.testing.assert_array_equal(quad, expected)
  for seq in (uniform, quad):
    assert isinstance(seq, np.ndarray) and np.issubdtype(seq.dtype, np.integer)
    assert seq.shape == (n,) and seq[0] == 0 and seq[-1] < T


def test_ddim_validation(sched):
  for bad in (0, sched.num_timesteps + 1, 2.5):
    with pytest.raises(ValueError, match='num_steps'):
      sampling.ddim_sample_loop(sched, zero_model, jax.random.PRNGKey(0), SHAPE, num_steps=bad)
  with pytest.raises(ValueError, match='skip_type'):
    sampling.ddim_sample_loop(sched, zero_model, jax.random.PRNGKey(0), SHAPE, num_steps=5,
                              skip_type='cubic')
  with pytest.raises(ValueError, match='eta'):
    sampling.ddim_sample_loop(sched, zero_model, jax.random.PRNGKey(0), SHAPE, num_steps=5,
                              eta=-1.0)


def test_pc_validation(sched):
  with pytest.raises(ValueError, match='num_steps'):
    sampling.pc_sample_loop(sched, zero_model, jax.random.PRNGKey(0), SHAPE, num_steps=0)
  with pytest.raises(ValueError, match='num_corrector_steps'):
    sampling.pc_sample_loop(sched, zero_model, jax.random.PRNGKey(0), SHAPE,
                            num_corrector_steps=-1)


def test_respace_schedule_keeps_marginals(sched):
  tau = sampling.uniform_timesteps(sched.num_timesteps, 11)
  assert tau[0] == 0 and tau[-1] == sched.num_timesteps - 1 and len(np.unique(tau)) == 11
  new, wrap = sampling.respace_schedule(sched, tau)
  assert new.num_timesteps == 11
  np.testing.assert_allclose(new.alphas_cumprod, np.asarray(sched.alphas_cumprod)[tau], rtol=1e-5)
  seen = wrap(lambda x, t: t)(jnp.zeros((3, 1)), jnp.array([0, 5, 10], jnp.int32))
  np.testing.assert_array_equal(seen, tau[[0, 5, 10]])


# --- progressive sampling --------------------------------------------------------------------


def test_progressive_matches_p_sample_loop(sched, x0_target, oracle_samples):
  model_fn = oracle_model(sched, x0_target)
  rng = jax.random.PRNGKey(0)
  xp, snaps = jrun(sampling.p_sample_loop_progressive, sched, model_fn, rng, SHAPE,
                   num_snapshots=6)
  # the same chain as p_sample_loop (compiled separately, hence allclose)
  np.testing.assert_allclose(oracle_samples['ancestral'], xp, atol=1e-6)
  T = sched.num_timesteps
  assert snaps['x_t'].shape == (6,) + SHAPE and snaps['pred_x0'].shape == (6,) + SHAPE
  np.testing.assert_array_equal(snaps['t'], T - 1 - np.round(np.linspace(0, T - 1, 6)))
  assert snaps['t'][0] == T - 1 and snaps['t'][-1] == 0
  np.testing.assert_allclose(snaps['pred_x0'][-1], xp, atol=1e-6)
  np.testing.assert_allclose(snaps['pred_x0'], np.broadcast_to(x0_target, (6,) + SHAPE),
                             atol=1e-4)
  # the first snapshot is x_T itself
  x_T, _ = sampling._init(rng, SHAPE, None)
  np.testing.assert_array_equal(snaps['x_t'][0], x_T)


def test_progressive_gaussian_snapshots(sched):
  """The x_t snapshots have the forward-process marginal variance abar sigma^2 + 1 - abar."""
  model_fn = gaussian_model(sched, MU, SIGMA)
  x, snaps = jrun(sampling.p_sample_loop_progressive, sched, model_fn, jax.random.PRNGKey(9),
                  (512, 2, 2, 1), num_snapshots=sched.num_timesteps, clip_denoised=False)
  np.testing.assert_array_equal(snaps['t'], np.arange(sched.num_timesteps)[::-1])
  abar = np.asarray(sched.alphas_cumprod)[np.asarray(snaps['t'])]
  want = np.sqrt(abar * SIGMA ** 2 + 1 - abar)
  got = np.asarray(snaps['x_t']).reshape(sched.num_timesteps, -1).std(axis=1)
  np.testing.assert_allclose(got, want, atol=0.06)
  assert x.shape == (512, 2, 2, 1)
  with pytest.raises(ValueError, match='num_snapshots'):
    sampling.p_sample_loop_progressive(sched, model_fn, jax.random.PRNGKey(0), SHAPE,
                                       num_snapshots=sched.num_timesteps + 1)


# --- compiles once; the chain is a scan ----------------------------------------------------------

SAMPLER_CALLS = {
    'ancestral': lambda s, m, r: sampling.p_sample_loop(s, m, r, SHAPE),
    'progressive': lambda s, m, r: sampling.p_sample_loop_progressive(s, m, r, SHAPE,
                                                                      num_snapshots=4),
    'ddim': lambda s, m, r: sampling.ddim_sample_loop(s, m, r, SHAPE, num_steps=10, eta=0.5),
    'pc': lambda s, m, r: sampling.pc_sample_loop(s, m, r, SHAPE, num_corrector_steps=3),
    'pc_respaced': lambda s, m, r: sampling.pc_sample_loop(s, m, r, SHAPE, num_steps=10),
    'dpm_solver3': lambda s, m, r: sampling.dpm_solver_sample_loop(s, m, r, SHAPE, num_steps=10,
                                                                   order=3),
}


@pytest.mark.parametrize('name', sorted(SAMPLER_CALLS))
def test_chain_is_one_scan(sched, name):
  """The model is traced once per scan body (pc: predictor + corrector), never per step."""
  traces = []

  def model_fn(x, t):
    traces.append((t.shape, t.dtype))
    return 0.1 * x

  jaxpr = jax.make_jaxpr(lambda r: SAMPLER_CALLS[name](sched, model_fn, r))(
      jax.random.PRNGKey(0))
  assert len(traces) == (2 if name.startswith('pc') else 1), traces
  assert all(tr == ((SHAPE[0],), jnp.int32) for tr in traces), traces
  assert any(eqn.primitive.name == 'scan' for eqn in jaxpr.jaxpr.eqns), jaxpr


def test_jitted_sampler_compiles_once(sched):
  traces = []

  def model_fn(x, t):
    traces.append(t.shape)
    return 0.1 * x

  f = jax.jit(lambda r: sampling.pc_sample_loop(sched, model_fn, r, SHAPE, num_steps=10))
  a, b = f(jax.random.PRNGKey(0)), f(jax.random.PRNGKey(1))
  assert f._cache_size() == 1 and len(traces) == 2
  assert not np.allclose(a, b)


# --- DPM-Solver++ -----------------------------------------------------------------------------


def test_dpm_solver_orders_warm_up_and_lower_order_final():
  np.testing.assert_array_equal(sampling.dpm_solver_orders(6, 3), [1, 2, 3, 2, 1, 1])
  np.testing.assert_array_equal(sampling.dpm_solver_orders(6, 2), [1, 2, 2, 2, 1, 1])
  np.testing.assert_array_equal(sampling.dpm_solver_orders(6, 3, lower_order_final=False),
                                [1, 2, 3, 3, 3, 1])   # the update to abar = 1 is always first order
  np.testing.assert_array_equal(sampling.dpm_solver_orders(1, 3), [1])
  with pytest.raises(ValueError, match='order must be an integer in'):
    sampling.dpm_solver_orders(5, 4)


def test_dpm_solver_order1_is_ddim_eta0(sched):
  model_fn = gaussian_model(sched, 0.2, 0.7)
  run = jax.jit(lambda r: [
      f(sched, model_fn, r, SHAPE, num_steps=n, skip_type=skip, clip_denoised=False, **kw)
      for n, skip in ((10, 'uniform'), (7, 'quadratic'))
      for f, kw in ((sampling.dpm_solver_sample_loop, dict(order=1)), (sampling.ddim_sample_loop, {}))])
  a, b, c, d = run(jax.random.PRNGKey(5))
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(c, d, rtol=1e-5, atol=1e-5)


def test_dpm_solver_mean_types_give_the_same_samples(sched):
  """eps, x0 and v outputs of one optimal model are converted to the same data prediction."""
  eps_fn = gaussian_model(sched, -0.1, 0.5)

  def as_mean_type(mean_type):
    def model_fn(x, t):
      eps = eps_fn(x, t)
      x0 = diffusion.predict_x0(sched, eps, x, t, mean_type='eps')
      if mean_type == 'x0':
        return x0
      abar = diffusion.extract(sched.alphas_cumprod, t, x.shape)
      return jnp.sqrt(abar) * eps - jnp.sqrt(1 - abar) * x0
    return model_fn

  run = jax.jit(lambda r: [sampling.dpm_solver_sample_loop(
      sched, eps_fn if m == 'eps' else as_mean_type(m), r, SHAPE, num_steps=8, order=3,
      mean_type=m) for m in ('eps', 'x0', 'v')])
  eps, x0, v = run(jax.random.PRNGKey(1))
  np.testing.assert_allclose(x0, eps, atol=2e-5)
  np.testing.assert_allclose(v, eps, atol=2e-5)


def gaussian_flow_to_data(s, mu, sigma, x, t):
  """The exact probability-flow map of N(mu, sigma^2) data from index t to abar = 1 (float64).

  Along the ODE the standardised value (x_t - sqrt(abar) mu) / sqrt(abar sigma^2 + 1 - abar)
  is constant, and at abar = 1 the standard deviation is sigma.
  """
  abar = float(np.cumprod(1.0 - np.asarray(s.betas, np.float64))[t])
  z = (np.asarray(x, np.float64) - np.sqrt(abar) * mu) / np.sqrt(abar * sigma ** 2 + 1 - abar)
  return mu + sigma * z


def test_dpm_solver_error_falls_faster_than_ddims_as_the_steps_double():
  """On Gaussian data (exact eps, exact ODE map) DDIM is first order, DPM-Solver++(2M) second."""
  s = make_schedule('linear', 1000)
  mu, sigma = 0.3, 0.2
  model_fn = gaussian_model(s, mu, sigma)
  steps = (20, 80)
  x_T = jax.random.normal(jax.random.PRNGKey(0), SHAPE)
  run = jax.jit(lambda x: {(o, n): sampling.dpm_solver_sample_loop(
      s, model_fn, jax.random.PRNGKey(1), SHAPE, num_steps=n, order=o, x_T=x)
      for o in (1, 2, 3) for n in steps})
  out = run(x_T)
  err = {}
  for (o, n), x0 in out.items():
    t_start = int(sampling.ddim_timesteps(1000, n)[-1])
    err[o, n] = np.abs(np.asarray(x0, np.float64)
                       - gaussian_flow_to_data(s, mu, sigma, x_T, t_start)).max()
  # Two doublings: first order gains about 4x, second order about 16x.
  assert 3.0 < err[1, 20] / err[1, 80] < 5.0, err
  assert err[2, 20] / err[2, 80] > 10 and err[3, 20] / err[3, 80] > 10, err
  assert err[2, 80] < err[1, 80] / 4 and err[3, 80] < err[1, 80] / 4, err


def test_dpm_solver_repeated_timesteps_are_no_ops():
  """The quadratic grid repeats its first timesteps at many steps: finite, and the oracle's point."""
  s = make_schedule('linear', 1000)
  assert np.any(np.diff(sampling.ddim_timesteps(1000, 80, 'quadratic')) == 0)
  x0 = jax.random.uniform(jax.random.PRNGKey(3), SHAPE, minval=-0.9, maxval=0.9)
  out = jax.jit(lambda r: [sampling.dpm_solver_sample_loop(
      s, oracle_model(s, x0), r, SHAPE, num_steps=80, order=o, skip_type='quadratic')
      for o in (2, 3)])(jax.random.PRNGKey(0))
  for x in out:
    np.testing.assert_allclose(x, x0, atol=1e-4)
