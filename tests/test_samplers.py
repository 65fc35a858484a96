"""Tests for diffusion_jax.samplers (the sampler table) and diffusion_jax.settings.sampler_spec."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import config_lib, samplers, sampling, settings
from diffusion_jax.schedule import make_schedule

from test_sampling import SHAPE, oracle_model, zero_model


def small_config(sampler):
  config = config_lib.base_config()
  config.diffusion.num_timesteps = 20
  config.sampling.sampler = sampler
  config.sampling.num_steps = 5
  config.data.image_size = 4
  config.data.num_channels = 1
  config.sampling.batch_size = 4
  return config


def spec_of(sampler, **changes):
  return settings.sampler_spec(small_config(sampler)).replace(**changes)


def test_every_sampler_is_in_the_table():
  assert tuple(samplers.SAMPLERS) == sampling.SAMPLERS
  assert set(samplers.SEGMENT_SAMPLERS) < set(samplers.SAMPLERS)


def test_spec_reads_every_option_from_the_config():
  config = small_config('pc')
  sc, dc = config.sampling, config.diffusion
  sc.eta, sc.skip_type, sc.solver_order, sc.pc_snr, sc.pc_corrector_steps = 0.5, 'quadratic', 3, 0.1, 2
  sc.ode_rtol, sc.ode_atol, sc.ancestral_steps = 1e-3, 1e-4, 7
  dc.mean_type, dc.var_type, dc.clip_denoised = 'v', 'fixed_small', False
  spec = settings.sampler_spec(config)
  assert spec == samplers.SamplerSpec(
      name='pc', num_steps=5, mean_type='v', var_type='fixed_small', clip_denoised=False,
      eta=0.5, skip_type='quadratic', order=3, snr=0.1, corrector_steps=2, rtol=1e-3, atol=1e-4)
  sc.sampler = 'ancestral'   # the ancestral sampler's steps are sampling.ancestral_steps
  assert settings.sampler_spec(config).num_steps == 7
  hash(spec)   # compiled functions are cached on it


def test_calls_and_tags():
  assert spec_of('ancestral', num_steps=0).calls(20) == 20
  assert spec_of('ancestral', num_steps=5).calls(20) == 5
  assert spec_of('pc', corrector_steps=2).calls(20) == 15
  assert spec_of('ode').calls(20) is None
  assert spec_of('dpm_solver', order=3).tag(20) == '5_order3'
  assert spec_of('ode', rtol=1e-3).tag(20) == 'rtol0.001'
  assert spec_of('ancestral', num_steps=0).tag(20) == '20'


def test_table_dispatch(monkeypatch):
  """Each sampler gets the spec's arguments (recorded, not run: no compilation)."""
  calls = {}
  for fn in ('p_sample_loop', 'ddim_sample_loop', 'pc_sample_loop', 'dpm_solver_sample_loop'):
    monkeypatch.setattr(sampling, fn, lambda *a, _fn=fn, **kw: calls.setdefault(_fn, (a, kw)))
  s, rng = make_schedule('linear', 20), jax.random.PRNGKey(10)
  samplers.run(spec_of('ancestral', num_steps=0, var_type='fixed_small'), s, zero_model, rng,
               SHAPE)
  assert calls['p_sample_loop'] == ((s, zero_model, rng, SHAPE), dict(
      mean_type='eps', var_type='fixed_small', clip_denoised=True, x_T=None))
  samplers.run(spec_of('ddim', eta=0.5, skip_type='quadratic', mean_type='v'), s, zero_model,
               rng, SHAPE)
  assert calls['ddim_sample_loop'][1] == dict(num_steps=5, eta=0.5, skip_type='quadratic',
                                              mean_type='v', clip_denoised=True, x_T=None)
  samplers.run(spec_of('pc', snr=0.1, corrector_steps=2, clip_denoised=False), s, zero_model,
               rng, SHAPE)
  assert calls['pc_sample_loop'][1] == dict(num_steps=5, snr=0.1, num_corrector_steps=2,
                                            var_type='fixed_large', mean_type='eps',
                                            clip_denoised=False, x_T=None)
  samplers.run(spec_of('dpm_solver', order=3, mean_type='x0'), s, zero_model, rng, SHAPE)
  assert calls['dpm_solver_sample_loop'][1] == dict(num_steps=5, order=3, skip_type='uniform',
                                                    mean_type='x0', clip_denoised=False, x_T=None)
  with pytest.raises(ValueError, match=r"sampling\.sampler='euler'.*ancestral, ddim, pc"):
    samplers.run(spec_of('ddim', name='euler'), s, zero_model, rng, SHAPE)
  with pytest.raises(ValueError, match=r"sampling\.sampler='euler'.*ancestral, ddim, pc"):
    settings.sampler_spec(small_config('euler'))


def test_respaced_ancestral_is_the_respaced_chain():
  """ancestral with 0 < num_steps < T equals p_sample_loop on the respaced schedule."""
  s = make_schedule('linear', 20)
  model = lambda x, t: 0.1 * x + 0.01 * t[:, None, None, None]
  rng = jax.random.PRNGKey(4)
  got, nfe = jax.jit(lambda r: samplers.run(spec_of('ancestral', num_steps=5), s, model, r,
                                            SHAPE))(rng)
  seg, wrap = sampling.respace_schedule(s, sampling.uniform_timesteps(20, 5))
  want = jax.jit(lambda r: sampling.p_sample_loop(seg, wrap(model), r, SHAPE))(rng)
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert int(nfe) == 5


def test_every_sampler_runs_to_the_oracle_x0(x0_target):
  s = make_schedule('linear', 20, beta_start=1e-3, beta_end=0.3)
  model_fn = oracle_model(s, x0_target)
  # 'ode' calls the model at real-valued t, which this integer-t oracle cannot take:
  # tests/test_sde.py runs it through the table with a continuous-time model.
  out = jax.jit(lambda r: {k: samplers.run(spec_of(k), s, model_fn, r, SHAPE)
                           for k in samplers.SAMPLERS if k != 'ode'})(jax.random.PRNGKey(0))
  for sampler, (x, nfe) in out.items():
    np.testing.assert_allclose(x, x0_target, atol=1e-4, err_msg=sampler)
    assert int(nfe) == spec_of(sampler).calls(20), sampler


@pytest.fixture(scope='module')
def x0_target():
  return jax.random.uniform(jax.random.PRNGKey(42), SHAPE, minval=-0.9, maxval=0.9)
