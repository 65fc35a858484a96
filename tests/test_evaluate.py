"""Tests for diffusion_jax.evaluate: ``--mode sample`` and ``--mode eval``.

A tiny model is trained for 4 steps (module fixture) and evaluated once with
every part (module fixture); the tests then check the files. The pure pieces
(rate-distortion, the reverse chain from x_t, the FID plumbing) are checked
against closed forms: an oracle denoiser for a fixed x_0 (every term of the
bound is known exactly) and the optimal denoiser for Gaussian data (the
x_0-prediction error is the Gaussian posterior variance).
"""

import contextlib
import csv
import fcntl
import io
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import config_lib, data, diffusion, evaluate, sampling, train
from diffusion_jax.schedule import make_schedule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny model of the fixtures, as config overrides (also used on the command line).
OVERRIDES = {
    'model.ch': 32, 'model.ch_mult': (1, 2), 'model.num_res_blocks': 1, 'model.num_groups': 8,
    'diffusion.num_timesteps': 20, 'training.num_train_steps': 4,
    'training.checkpoint_every_steps': 2, 'training.sample_every_steps': 4,
    'sampling.sampler': 'ddim', 'sampling.num_steps': 10, 'eval.num_bpd_examples': 16,
    'eval.num_fid_samples': 32, 'eval.classifier_steps': 50,
    'eval.sample_sets': 'ancestral,ddim10',
}


def tiny_config():
  config = config_lib.digits_config()
  for key, value in OVERRIDES.items():
    section, name = key.split('.')
    config[section][name] = value
  return config


def _train_and_evaluate_once(root):
  """Trains the tiny model and runs evaluate() once per ``root``, also across xdist workers.

  Under ``pytest -n`` every worker would build module fixtures of its own; the
  run is shared through a file lock in the session's common temporary folder.
  """
  workdir = os.path.join(root, 'evaluate_run')
  done = os.path.join(root, 'evaluate_run.json')
  with open(os.path.join(root, 'evaluate_run.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(done):
      train.train_and_evaluate(tiny_config(), workdir)
      out = io.StringIO()
      with contextlib.redirect_stdout(out):
        results = evaluate.evaluate(tiny_config(), workdir)
      with open(done + '.tmp', 'w') as f:
        json.dump({'results': results, 'printed': out.getvalue()}, f)
      os.replace(done + '.tmp', done)
  with open(done) as f:
    run = json.load(f)
  return workdir, run['results'], run['printed']


@pytest.fixture(scope='module')
def shared_run(tmp_path_factory):
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent   # shared by all workers of this session
  return _train_and_evaluate_once(str(root))


@pytest.fixture(scope='module')
def workdir(shared_run):
  return shared_run[0]


@pytest.fixture(scope='module')
def eval_run(shared_run):
  """evaluate() with every part, once: (results, printed text)."""
  return shared_run[1], shared_run[2]


# --- --mode sample ------------------------------------------------------------------


def test_sample_mode_cli_writes_uint8_npz_and_png(workdir):
  flags = [f'--default_config.{k}={v}' for k, v in OVERRIDES.items()
           if not k.startswith('eval.')]
  flags = [f.replace(' ', '') for f in flags]
  cmd = [sys.executable, '-m', 'diffusion_jax.main', '--mode', 'sample', '--workdir', workdir,
         '--default_config.sampling.num_samples=6', '--default_config.sampling.batch_size=4',
         *flags]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  npz = os.path.join(workdir, 'samples', 'samples_ddim_10.npz')
  png = os.path.join(workdir, 'samples', 'samples_ddim_10.png')
  assert npz in proc.stdout and png in proc.stdout
  with np.load(npz) as f:
    images = f['images']
  assert images.dtype == np.uint8 and images.shape == (6, 8, 8, 1)   # 2 chunks of 4, truncated
  assert os.path.getsize(png) > 0


def test_sample_set_names():
  assert evaluate.parse_sample_sets('ancestral, ddim50,pc7', 1000) == [
      ('ancestral', 'ancestral', 1000), ('ddim50', 'ddim', 50), ('pc7', 'pc', 7)]
  assert evaluate.parse_sample_sets('ddim50', 20) == [('ddim20', 'ddim', 20)]   # clamped to T
  for bad in ('ddim', 'ancestral5', 'euler10'):
    with pytest.raises(ValueError, match='eval.sample_sets'):
      evaluate.parse_sample_sets(bad, 100)
  assert evaluate.parse_parts('fid, bpd') == ['bpd', 'fid']
  with pytest.raises(ValueError, match='eval.parts'):
    evaluate.parse_parts('bpd,nll')


# --- --mode eval: files -----------------------------------------------------------------


def test_bpd_json_breakdown(workdir, eval_run):
  results, _ = eval_run
  with open(os.path.join(workdir, 'eval', 'bpd.json')) as f:
    bpd = json.load(f)
  assert bpd == results['bpd']
  assert bpd['step'] == 4 and bpd['num_examples'] == 16 and bpd['num_timesteps'] == 20
  for key in ('total_bpd', 'L_T_prior_bpd', 'sum_L_t_bpd', 'L_0_decoder_bpd', 'rate_bpd'):
    assert math.isfinite(bpd[key]) and bpd[key] > 0, key
  np.testing.assert_allclose(
      bpd['total_bpd'], bpd['L_T_prior_bpd'] + bpd['sum_L_t_bpd'] + bpd['L_0_decoder_bpd'],
      rtol=1e-5)
  np.testing.assert_allclose(bpd['rate_bpd'], bpd['total_bpd'] - bpd['L_0_decoder_bpd'],
                             rtol=1e-5)


def test_rate_distortion_files(workdir, eval_run):
  eval_dir = os.path.join(workdir, 'eval')
  with open(os.path.join(eval_dir, 'rate_distortion.csv')) as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ['t', 'rate_bpd', 'distortion_rmse']
  t = np.array([int(r['t']) for r in rows])
  rate = np.array([float(r['rate_bpd']) for r in rows])
  dist = np.array([float(r['distortion_rmse']) for r in rows])
  np.testing.assert_array_equal(t, np.arange(19, -1, -1))
  assert np.all(np.diff(rate) >= -1e-9)          # more bits as the chain runs
  assert np.all(np.isfinite(dist)) and np.all(dist >= 0)
  with open(os.path.join(eval_dir, 'bpd.json')) as f:
    bpd = json.load(f)
  np.testing.assert_allclose(rate[0], bpd['L_T_prior_bpd'], rtol=1e-5)
  np.testing.assert_allclose(rate[-1], bpd['total_bpd'] - bpd['L_0_decoder_bpd'], rtol=1e-5)
  assert os.path.getsize(os.path.join(eval_dir, 'rate_distortion.png')) > 0


def test_figures_written(workdir, eval_run):
  results, _ = eval_run
  for name in ('progressive_generation', 'shared_latent', 'interpolation'):
    path = os.path.join(workdir, 'eval', f'{name}.png')
    assert results['figures']['paths'][name] == path
    assert os.path.getsize(path) > 0
  assert results['figures']['shared_latent_t'] == [19, 14, 9, 4]   # 1000, 750, 500, 250 of T
  assert results['figures']['interpolation_t'] == 9


def test_metrics_json_classifier_and_fid_message(workdir, eval_run):
  _, printed = eval_run
  with open(os.path.join(workdir, 'eval', 'metrics.json')) as f:
    m = json.load(f)
  assert m['step'] == 4
  cls = m['classifier']
  assert cls['reference'].startswith('train split')
  assert 0.0 <= cls['test_accuracy'] <= 1.0
  assert math.isfinite(cls['frechet_test_vs_train']) and cls['frechet_test_vs_train'] >= 0
  for label in ('ancestral', 'ddim10'):
    assert cls[label]['num_samples'] == 32
    assert math.isfinite(cls[label]['frechet_distance']) and cls[label]['frechet_distance'] >= 0
    assert sum(cls[label]['class_histogram']) == 32
    with np.load(os.path.join(workdir, 'eval', f'samples_{label}_step4.npz')) as f:
      assert f['images'].dtype == np.uint8 and f['images'].shape == (32, 8, 8, 1)
  assert os.path.exists(os.path.join(workdir, 'eval', 'digits_classifier.msgpack'))
  # No Inception weights configured: FID is skipped, loudly, naming the key.
  assert 'eval.inception_path' in m['fid']['skipped']
  assert 'FID / Inception Score skipped' in printed and 'eval.inception_path' in printed


# --- rate-distortion, pure --------------------------------------------------------------


def test_rate_distortion_synthetic():
  vb = np.array([0.5, 0.1, 0.2, 0.3])          # column 0 = L_0
  mse = np.array([0.0, 0.01, 0.04, 0.09])
  rd = evaluate.rate_distortion(vb, mse, 2.0)
  np.testing.assert_array_equal(rd['t'], [3, 2, 1, 0])
  np.testing.assert_array_equal(rd['reverse_steps'], [0, 1, 2, 3])
  np.testing.assert_allclose(rd['rate_bpd'], [2.0, 2.3, 2.5, 2.6])
  np.testing.assert_allclose(rd['distortion_rmse'], np.array([0.3, 0.2, 0.1, 0.0]) * 127.5)
  total = 2.0 + vb.sum()
  np.testing.assert_allclose(rd['rate_bpd'][-1], total - vb[0])
  # [B, T] inputs are averaged over the batch.
  rd2 = evaluate.rate_distortion(np.stack([vb, vb]), np.stack([mse, mse]), np.array([2.0, 2.0]))
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
    rd = evaluate.rate_distortion(out['vb'], out['xstart_mse'], out['prior_bpd'])
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
  rd = evaluate.rate_distortion(np.asarray(out['vb']), optimal, np.asarray(out['prior_bpd']))
  assert np.all(np.diff(rd['distortion_rmse']) <= 0)            # non-increasing along the chain
  assert np.all(np.diff(rd['rate_bpd']) >= -1e-9)               # KL terms are >= 0
  rd_measured = evaluate.rate_distortion(out['vb'], out['xstart_mse'], out['prior_bpd'])
  assert rd_measured['distortion_rmse'][-1] < 0.2 * rd_measured['distortion_rmse'][0]


# --- the reverse chain from x_t -----------------------------------------------------------


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
  from_ = evaluate.p_sample_loop_from

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
  assert [evaluate.paper_step_to_t(p, 1000) for p in (1000, 750, 500, 250)] == [999, 749, 499, 249]
  assert [evaluate.paper_step_to_t(p, 20) for p in (1000, 750, 500, 250)] == [19, 14, 9, 4]


# --- FID plumbing ----------------------------------------------------------------------------


def test_fid_missing_inception_path_prints_the_key(tmp_path, capsys):
  config = tiny_config()
  assert config.eval.inception_path is None
  out = evaluate.fid_metrics(config, str(tmp_path), {'x': np.zeros((4, 8, 8, 1), np.uint8)})
  printed = capsys.readouterr().out
  assert 'eval.inception_path' in out['skipped'] and 'eval.inception_path' in printed
  config.eval.inception_path = str(tmp_path / 'missing.msgpack')
  with pytest.raises(FileNotFoundError, match='eval.inception_path'):
    evaluate.fid_metrics(config, str(tmp_path), {})


@pytest.fixture(scope='module')
def inception_path(tmp_path_factory):
  from diffusion_jax import inception
  path = str(tmp_path_factory.mktemp('inception') / 'random_inception.msgpack')
  inception.save_inception_params(inception.init_inception_variables(seed=0), path)
  return path


def test_fid_and_inception_score_with_random_weights(tmp_path, inception_path):
  """FID / IS plumbing at the real 299x299 input: reference statistics from the
  train split, cached; FID of the reference images themselves ~ 0.

  One sample set only: each FID needs one 2048x2048 ``sqrtm`` (~15 s on a CPU).
  """
  config = tiny_config()
  config.eval.inception_path = inception_path
  config.eval.num_fid_reference = 12
  workdir = str(tmp_path)
  train_images = data.load_uint8(config, 'train', num=12)
  out = evaluate.fid_metrics(config, workdir, {'train': train_images})
  cached = [f for f in os.listdir(os.path.join(workdir, 'eval')) if f.startswith('fid_stats_')]
  assert len(cached) == 1 and out['reference'].endswith(cached[0])
  with np.load(out['reference']) as f:
    assert f['mu'].shape == (2048,) and f['sigma'].shape == (2048, 2048)
    scale = float(np.trace(f['sigma']))
  assert scale > 0
  res = out['train']
  assert res['num_samples'] == 12
  assert math.isfinite(res['fid']) and abs(res['fid']) < 1e-3 * scale   # the reference itself
  assert math.isfinite(res['inception_score']) and res['inception_score'] >= 1.0 - 1e-6
  mu, _, path = evaluate.fid_reference_stats(config, workdir, None)   # cached: no network
  assert path == out['reference'] and mu.shape == (2048,)
