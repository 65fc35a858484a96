"""Tests for diffusion_jax.evaluation.evaluate: the ``--mode sample`` and ``--mode eval`` drivers.

A tiny model is trained for 4 steps (module fixture) and evaluated once with
every part (module fixture); the tests then check the files. The pure pieces
are tested with their modules (test_bits_per_dim.py, test_rate_distortion.py,
test_figures.py, test_fid.py, test_samples.py, ...).
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

import numpy as np
import pytest

from diffusion_jax import config_lib, train
from diffusion_jax.evaluation import evaluate

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
  assert results['figures']['interpolation_t'] == [1, 4, 7, 9, 11, 14, 17, 19]   # 125..1000 of T


def test_metrics_json_classifier_and_fid_message(workdir, eval_run):
  _, printed = eval_run
  with open(os.path.join(workdir, 'eval', 'metrics.json')) as f:
    m = json.load(f)
  assert m['step'] == 4
  cls = m['classifier']
  assert cls['reference'].startswith('train split')
  assert 0.0 <= cls['reference_accuracy'] <= 1.0
  assert math.isfinite(cls['frechet_real_vs_reference']) and cls['frechet_real_vs_reference'] >= 0
  assert cls['kid_real_vs_reference_std'] > 0
  for label in ('ancestral', 'ddim10'):
    assert cls[label]['num_samples'] == 32
    assert math.isfinite(cls[label]['frechet_distance']) and cls[label]['frechet_distance'] >= 0
    # Beside the real baseline digits at the same count (32 < 750 of them), and KID.
    assert cls[label]['num_compared'] == 32
    for key in ('frechet_at_n', 'frechet_real_at_n', 'kid', 'kid_real'):
      assert math.isfinite(cls[label][key]), key
    np.testing.assert_allclose(cls[label]['frechet_at_n'], cls[label]['frechet_distance'])
    assert cls[label]['kid_real'] == cls['kid_real_vs_reference']
    assert sum(cls[label]['class_histogram']) == 32
    with np.load(os.path.join(workdir, 'eval', f'samples_{label}_step4.npz')) as f:
      assert f['images'].dtype == np.uint8 and f['images'].shape == (32, 8, 8, 1)
  assert os.path.exists(os.path.join(workdir, 'eval', 'digits_classifier.msgpack'))
  # No Inception weights configured: FID is skipped, loudly, naming the key.
  assert 'eval.inception_path' in m['fid']['skipped']
  assert 'FID / Inception Score skipped' in printed and 'eval.inception_path' in printed
