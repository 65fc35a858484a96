"""Tests for diffusion_jax.evaluation.nfe_curve: quality per model call (eval part ``nfe_curve``)."""

import csv
import os

import jax
import numpy as np
import pytest

from diffusion_jax import config_lib, models, samplers, sampling, settings
from diffusion_jax import schedule as schedule_lib
from diffusion_jax.evaluation import nfe_curve


def test_nfe_spec_sets_the_budget():
  config = config_lib.digits_config()
  spec = settings.sampler_spec(config)
  ddim = nfe_curve.nfe_spec(spec, 'ddim', 10)
  assert (ddim.name, ddim.num_steps, ddim.eta) == ('ddim', 10, 0.0)
  dpm = nfe_curve.nfe_spec(spec, 'dpm_solver3', 20)
  assert (dpm.name, dpm.num_steps, dpm.order) == ('dpm_solver', 20, 3)
  anc = nfe_curve.nfe_spec(spec, 'ancestral', 50)
  assert (anc.name, anc.num_steps, anc.calls(1000)) == ('ancestral', 50, 50)
  assert spec.order == 2 and spec.name == 'ddim'   # frozen: a copy
  with pytest.raises(ValueError, match='unknown sampler'):
    nfe_curve.nfe_spec(spec, 'euler', 5)


def test_respaced_ancestral_calls_the_model_n_times_at_the_grid():
  """``sampling.ancestral_steps = n`` runs the respaced chain: n calls at evenly spaced t."""
  config = config_lib.digits_config()
  config.sampling.sampler, config.sampling.ancestral_steps = 'ancestral', 5
  s = schedule_lib.make_schedule('linear', 1000)
  seen = []

  def model_fn(x, t):
    jax.debug.callback(lambda t: seen.append(int(t[0])), t)
    return 0.0 * x

  jax.block_until_ready(samplers.run(settings.sampler_spec(config), s, model_fn,
                                     jax.random.PRNGKey(0), (2, 8, 8, 1)))
  assert seen == sorted(sampling.uniform_timesteps(1000, 5).tolist(), reverse=True)


@pytest.mark.parametrize('var_type', ['fixed_large', 'fixed_small'])
def test_one_step_ancestral_returns_the_clipped_x0_prediction(var_type):
  """A respaced chain of one step: no noise at its only step, x_0 = clip(x0_hat(x_T))."""
  config = config_lib.digits_config()
  config.sampling.sampler, config.sampling.ancestral_steps = 'ancestral', 1
  config.diffusion.var_type = var_type
  s = schedule_lib.make_schedule('linear', 1000)
  spec = settings.sampler_spec(config)
  x_T = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
  seen = []

  def model_fn(x, t):
    jax.debug.callback(lambda t: seen.append(int(t[0])), t)
    return 0.5 * x

  x0, nfe = samplers.run(spec, s, model_fn, jax.random.PRNGKey(1), x_T.shape, x_T=x_T)
  jax.block_until_ready(x0)
  (t_only,) = seen
  abar = float(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))[t_only])
  expected = np.clip((x_T - np.sqrt(1 - abar) * 0.5 * x_T) / np.sqrt(abar), -1, 1)
  assert int(nfe) == 1
  np.testing.assert_allclose(x0, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_nfe_curve_writes_one_row_per_sampler_and_budget(tmp_path):
  config = config_lib.digits_config()
  config.model.ch, config.model.ch_mult, config.model.num_groups = 16, (1, 2), 8
  config.diffusion.num_timesteps = 20
  config.eval.num_fid_samples, config.eval.classifier_steps = 16, 50
  config.eval.nfe_calls, config.eval.nfe_ode_rtols = '2,4', '1e-2'
  config.sampling.batch_size = 16
  model = models.create_model(config)
  params = model.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1), np.float32),
                      np.zeros((1,), np.int32))
  apply_fn = lambda p, x, t: model.apply(p, x, t, train=False)  # noqa: E731
  s = schedule_lib.schedule_from_config(config)
  rows = nfe_curve.nfe_curve(config, str(tmp_path), s, apply_fn, params, step=7)
  again = nfe_curve.nfe_curve(config, str(tmp_path), s, apply_fn, params, step=7)   # cached sets
  assert [(r['sampler'], r['nfe'], r['wall_s']) for r in again] == [
      (r['sampler'], r['nfe'], r['wall_s']) for r in rows]
  assert os.path.exists(tmp_path / 'eval' / 'nfe_ddim_2_step7.npz')
  assert [(r['sampler'], r['nfe']) for r in rows[:-1]] == [
      (name, n) for name in nfe_curve.SAMPLERS for n in (2.0, 4.0)]
  assert rows[-1]['sampler'] == 'ode_rtol0.01' and rows[-1]['nfe'] >= 2
  for r in rows:
    assert r['num_samples'] == 16 and r['wall_s'] > 0
    assert np.isfinite(r['classifier_frechet_at_n']) and np.isfinite(r['classifier_kid'])
  csv_path, png_path = nfe_curve.write_nfe_curve(rows, str(tmp_path / 'eval'))
  with open(csv_path) as f:
    table = list(csv.DictReader(f))
  assert list(table[0]) == list(nfe_curve.COLUMNS) and len(table) == len(rows)
  assert table[0]['sampler'] == 'ddim' and table[0]['fid'] == ''
  assert os.path.getsize(png_path) > 0
