"""Tests for diffusion_jax.evaluation.fid: FID / Inception Score plumbing (random Inception weights)."""

import math
import os

import numpy as np
import pytest

from diffusion_jax import config_lib, data
from diffusion_jax.evaluation import fid


def test_fid_missing_inception_path_prints_the_key(tmp_path, capsys):
  config = config_lib.digits_config()
  assert config.eval.inception_path is None
  out = fid.fid_metrics(config, str(tmp_path), {'x': np.zeros((4, 8, 8, 1), np.uint8)})
  printed = capsys.readouterr().out
  assert 'eval.inception_path' in out['skipped'] and 'eval.inception_path' in printed
  config.eval.inception_path = str(tmp_path / 'missing.msgpack')
  with pytest.raises(FileNotFoundError, match='eval.inception_path'):
    fid.fid_metrics(config, str(tmp_path), {})


@pytest.fixture(scope='module')
def inception_path(tmp_path_factory):
  from diffusion_jax.evaluation import inception_weights
  path = str(tmp_path_factory.mktemp('inception') / 'random_inception.msgpack')
  inception_weights.save_inception_params(inception_weights.init_inception_variables(seed=0), path)
  return path


def test_fid_and_inception_score_with_random_weights(tmp_path, inception_path):
  """FID / IS plumbing at the real 299x299 input: reference statistics from the
  train split, cached; FID of the reference images themselves ~ 0.

  One sample set only: each FID needs one 2048x2048 ``sqrtm`` (~15 s on a CPU).
  """
  config = config_lib.digits_config()
  config.eval.inception_path = inception_path
  config.eval.num_fid_reference = 12
  workdir = str(tmp_path)
  train_images = data.load_uint8(config, 'train', num=12)
  out = fid.fid_metrics(config, workdir, {'train': train_images})
  cached = [f for f in os.listdir(os.path.join(workdir, 'eval')) if f.startswith('fid_stats_')]
  assert len(cached) == 1 and out['reference'].endswith(cached[0])
  with np.load(out['reference']) as f:
    assert f['mu'].shape == (2048,) and f['sigma'].shape == (2048, 2048)
    scale = float(np.trace(f['sigma']))
    assert f['features'].shape == (12, 2048)   # kept for KID
  assert scale > 0
  res = out['train']
  assert res['num_samples'] == 12
  assert math.isfinite(res['fid']) and abs(res['fid']) < 1e-3 * scale   # the reference itself
  assert math.isfinite(res['inception_score']) and res['inception_score'] >= 1.0 - 1e-6
  assert math.isfinite(res['kid'])
  base = res['real_baseline']   # 12 held-out test digits against the same reference
  assert base['num_images'] == 12 and base['split'] == 'test'
  assert math.isfinite(base['fid']) and base['fid'] > res['fid'] and math.isfinite(base['kid'])
  mu, _, path = fid.fid_reference_stats(config, workdir, None)   # cached: no network
  assert path == out['reference'] and mu.shape == (2048,)
