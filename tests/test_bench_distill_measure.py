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
