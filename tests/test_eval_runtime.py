"""Tests for diffusion_jax.evaluation.runtime: output files and workdir paths."""

import json
import os

import numpy as np

from diffusion_jax.evaluation import runtime as rt


def test_files_round_trip_atomically(tmp_path):
  path = os.path.join(str(tmp_path), 'a', 'b', 'x.npz')
  rt.save_npz(path, images=np.arange(6, dtype=np.uint8).reshape(2, 3), step=np.int64(4))
  got = rt.load_npz(path)
  np.testing.assert_array_equal(got['images'], np.arange(6).reshape(2, 3))
  assert got['images'].dtype == np.uint8 and int(got['step']) == 4
  rt.write_json(os.path.join(str(tmp_path), 'm.json'), {'b': 1, 'a': [1.5]})
  assert rt.read_json(os.path.join(str(tmp_path), 'm.json')) == {'a': [1.5], 'b': 1}
  with open(os.path.join(str(tmp_path), 'm.json')) as f:
    assert json.load(f) == {'a': [1.5], 'b': 1}
  assert sorted(os.listdir(str(tmp_path))) == ['a', 'm.json']   # no temporary files left
  assert rt.cached(path) and not rt.cached(path + '.missing')


def test_workdir_paths():
  assert rt.workdir_path('gs://bucket/run') == 'gs://bucket/run'
  assert rt.workdir_path('runs/x') == os.path.abspath('runs/x')
  assert rt.join('/w', 'eval', 'bpd.json') == '/w/eval/bpd.json'
  assert rt.join('gs://bucket/run', 'eval') == 'gs://bucket/run/eval'
