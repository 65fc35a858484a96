"""benchmarks/distill_measure.py: the per-draw scoring shared by the distillation benchmarks."""

import importlib.util
import os
import sys

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(__file__), '..', 'benchmarks')


@pytest.fixture(name='dm')
def fixture_dm(monkeypatch):
  monkeypatch.syspath_prepend(BENCH)
  spec = importlib.util.spec_from_file_location('distill_measure',
                                                os.path.join(BENCH, 'distill_measure.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  yield module
  sys.modules.pop('distill_measure', None)


def test_quality_over_draws_seeds_caches_and_statistics(dm, monkeypatch):
  drawn = []

  def draw(config, workdir, num, cache, seed):
    drawn.append((cache, seed))
    return np.full((num, 8, 8, 1), seed, np.float32), 10.0 + seed - dm.SEED

  fd = {dm.SEED: 3.0, dm.SEED + 1: 5.0, dm.SEED + 2: 10.0}
  monkeypatch.setattr(dm, 'draw', draw)
  monkeypatch.setattr(dm.guidance_sweep, 'quality_row', lambda tconfig, teacher, name, images: {
      'classifier_frechet_at_n': fd[int(images[0, 0, 0, 0])], 'name': name})
  rows, first, wall = dm.quality_over_draws(None, 'T', 'ddim_4', None, 'W', 5, 3,
                                            lambda k: f'c{k}.npz')
  assert drawn == [('c0.npz', dm.SEED), ('c1.npz', dm.SEED + 1), ('c2.npz', dm.SEED + 2)]
  assert [r['name'] for r in rows] == ['ddim_4'] * 3
  assert first.shape == (5, 8, 8, 1) and first[0, 0, 0, 0] == dm.SEED and wall == 10.0
  mean, std = dm.frechet_mean_std(rows)
  assert mean == pytest.approx(6.0) and std == pytest.approx(np.std([3.0, 5.0, 10.0], ddof=1))
  assert dm.frechet_mean_std(rows[:1]) == (3.0, 0.0)


def test_students_sampled_at_each_eta_with_their_own_rows(dm, monkeypatch):
  from diffusion_jax import config_lib   # pylint: disable=g-import-not-at-top
  drawn = []

  def draw(config, workdir, num, cache, seed):
    drawn.append((workdir, config.sampling.sampler, config.sampling.eta, cache))
    return np.full((num, 8, 8, 1), config.sampling.eta, np.float32), 1.0

  def read_config(workdir):
    config = config_lib.digits_config()
    config.sampling.sampler, config.sampling.num_steps = 'ddim', 4
    return config

  monkeypatch.setattr(dm, 'draw', draw)
  monkeypatch.setattr(dm.convert, 'read_config', read_config)
  monkeypatch.setattr(dm.guidance_sweep, 'quality_row', lambda tconfig, teacher, name, images: {
      'classifier_frechet_at_n': 10.0 + float(images[0, 0, 0, 0]),
      'classifier_frechet_real_at_n': 9.0})
  rows, sets = dm.measure('T', 5, [4], [], seeds=1, solvers=(), student_etas=(0.0, 0.3))
  assert [(w, s, e) for w, s, e, _ in drawn] == [('T/distilled/steps_4', 'ddim', 0.0),
                                                 ('T/distilled/steps_4', 'ddim', 0.3)]
  assert drawn[0][3].endswith('distill_measure_5.npz')
  assert drawn[1][3].endswith('distill_measure_5_eta0.3.npz')
  assert [(r['method'], r['classifier_frechet_at_n']) for r in rows] == [
      ('distilled', 10.0), ('distilled_eta0.3', pytest.approx(10.3))]
  assert float(sets[4][0, 0, 0, 0]) == 0.0          # the eta-0 set is the one kept for grids
  table = dm.markdown(rows)
  assert 'distilled student (DDIM, trailing)' in table
  assert 'distilled student (DDIM eta 0.3, trailing)' in table
