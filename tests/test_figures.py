"""Tests for diffusion_jax.evaluation.figures: reverse chains from x_t (DDPM Figs. 6-9)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import config_lib, diffusion, sampling
from diffusion_jax.evaluation import figures
from diffusion_jax.schedule import make_schedule


@pytest.fixture(scope='module')
def sched():
  return make_schedule('linear', 50, beta_start=1e-3, beta_end=0.2)


def test_p_sample_loop_from(sched):
  s = sched
  T = s.num_timesteps
  shape = (2, 4, 4, 1)
  x0 = jax.random.uniform(jax.random.PRNGKey(4), shape, minval=-0.9, maxval=0.9)
  oracle = lambda x_t, t: diffusion.eps_from_x0(s, x_t, t, x0)
  model = lambda x_t, t: 0.5 * x_t          # a generic (non-oracle) model
  x_T = jax.random.normal(jax.random.PRNGKey(5), shape)
  rng = jax.random.PRNGKey(6)
  keys = jnp.stack([jax.random.PRNGKey(7)] * 2)
  x_mid = diffusion.q_sample(s, x0, jnp.full((2,), 20), x_T)
  from_ = figures.p_sample_loop_from

  @jax.jit
  def run():
    return dict(
        full=from_(s, model, rng, x_T, T - 1),
        reference=sampling.p_sample_loop(s, model, rng, shape, x_T=x_T),
        mixed=from_(s, model, rng, x_T, jnp.array([T - 1, -1])),
        oracle=from_(s, oracle, rng, x_mid, 20),
        same_key=from_(s, model, keys, jnp.stack([x_T[0], x_T[0]]), T - 1),
        diff_key=from_(s, model, jax.random.split(rng, 2), jnp.stack([x_T[0], x_T[0]]), T - 1))

  out = jax.tree.map(np.asarray, run())
  np.testing.assert_allclose(out['full'], out['reference'], atol=1e-6)
  np.testing.assert_allclose(out['mixed'][0], out['reference'][0], atol=1e-6)
  np.testing.assert_array_equal(out['mixed'][1], np.asarray(x_T[1]))   # t_start = -1: untouched
  np.testing.assert_allclose(out['oracle'], x0, atol=1e-4)             # oracle from x_20 -> x_0
  np.testing.assert_array_equal(out['same_key'][0], out['same_key'][1])
  assert np.abs(out['diff_key'][0] - out['diff_key'][1]).max() > 1e-3
  jaxpr = str(jax.make_jaxpr(lambda x: from_(s, model, rng, x, 10))(x_T))
  assert 'scan' in jaxpr and 'cond' in jaxpr


def test_paper_steps_rescale():
  assert [figures.paper_step_to_t(p, 1000) for p in (1000, 750, 500, 250)] == [999, 749, 499, 249]
  assert [figures.paper_step_to_t(p, 20) for p in (1000, 750, 500, 250)] == [19, 14, 9, 4]


def test_interpolation_rows_of_mixing_steps(sched):
  """Figs. 8-9: one row per mixing step, lambda = 0 and 1 are the reconstructions.

  With the oracle denoiser of x_0 and the pair (x_0, x_0), every latent is
  q_sample(x_0, t, eps) and every chain decodes to x_0 exactly, at every t and
  lambda. With a generic model and two different sources, the row at lambda = 0
  equals the reconstruction of the first source (a chain from its own x_t with
  the pair's noise), and the interpolants differ from it.
  """
  s = sched
  config = config_lib.digits_config()
  config.diffusion.num_timesteps = s.num_timesteps
  x0 = jax.random.uniform(jax.random.PRNGKey(8), (1, 4, 4, 1), minval=-0.9, maxval=0.9)
  oracle = lambda params, x_t, t: diffusion.eps_from_x0(s, x_t, t, x0)
  steps = (250, 500, 1000)
  out = figures.interpolate(config, s, oracle, None, x0, x0, jax.random.PRNGKey(9),
                            paper_steps=steps, num_lambdas=3)
  assert out['decoded'].shape == (1, 3, 3, 4, 4, 1)
  np.testing.assert_array_equal(out['t'], [figures.paper_step_to_t(p, 50) for p in steps])
  np.testing.assert_allclose(out['decoded'], np.broadcast_to(x0[:, None, None], (1, 3, 3, 4, 4, 1)),
                             atol=1e-4)
  model = lambda params, x_t, t: 0.5 * x_t
  x0b = -x0
  rng = jax.random.PRNGKey(10)
  out = figures.interpolate(config, s, model, None, x0, x0b, rng, paper_steps=(500,),
                            num_lambdas=5)
  t = int(out['t'][0])
  noise = jax.random.normal(jax.random.fold_in(rng, 0), x0.shape)
  x_t = diffusion.q_sample(s, x0, jnp.full((1,), t), noise)
  key = jax.random.split(jax.random.fold_in(rng, 1), 1)
  recon = figures.p_sample_loop_from(s, lambda x, tt: 0.5 * x, key, x_t, t)
  np.testing.assert_allclose(out['decoded'][0, 0, 0], np.asarray(recon)[0], atol=1e-5)
  diffs = np.abs(out['decoded'][0, 0] - out['decoded'][0, 0, :1]).reshape(5, -1).max(axis=1)
  assert diffs[0] == 0 and np.all(np.diff(diffs) > 0)   # moving away from the reconstruction
