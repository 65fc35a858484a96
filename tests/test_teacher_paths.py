"""Tests for diffusion_jax.teacher_paths: the stored DDIM paths a distillation can train on.

The path against a float64 NumPy DDIM chain of the exact Gaussian denoiser and
against the library's DDIM sampler; the pairs a round draws; the pool on disk,
resumed chunk by chunk, and its settings check.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import models
from diffusion_jax import sampling
from diffusion_jax import schedule as schedule_lib
from diffusion_jax import teacher_paths
from diffusion_jax import timesteps
from diffusion_jax import train
from diffusion_jax.schedule import make_schedule
from test_distill import tiny_config
from test_distillation import MU, STD
from test_distillation import np_ddim
from test_distillation import teacher as gaussian_teacher


@pytest.mark.parametrize('start,stored', [(8, 4), (8, 8), (4, 1)])
def test_path_is_the_ddim_chain_every_stride_th_state(start, stored):
  s = make_schedule('linear', 40)
  z = jax.random.normal(jax.random.PRNGKey(0), (5, 4, 4, 1))
  states = teacher_paths.ddim_path(s, gaussian_teacher(s, 'eps'), z, start_steps=start,
                                   stored_steps=stored, mean_type='eps', clip_denoised=False)
  assert states.shape == (stored + 1,) + z.shape
  # NumPy float64: DDIM eta 0 along the trailing grid, from x_T.
  abar = np.asarray(s.alphas_cumprod, np.float64)
  desc = timesteps.trailing_timesteps(40, start)[::-1]
  chain = [np.asarray(z, np.float64)]
  for k, t in enumerate(desc):
    chain.append(np_ddim(chain[-1], abar[t], abar[desc[k + 1]] if k + 1 < start else 1.0))
  np.testing.assert_allclose(states, np.stack(chain[::start // stored]), rtol=2e-5, atol=2e-5)
  # The last state is the library's DDIM sample in `start` trailing steps from the same x_T.
  sample = sampling.ddim_sample_loop(s, gaussian_teacher(s, 'eps'), jax.random.PRNGKey(1),
                                     z.shape, num_steps=start, skip_type='trailing',
                                     clip_denoised=False, x_T=z)
  np.testing.assert_allclose(states[-1], sample, rtol=1e-5, atol=1e-5)


def _np_ode_flow(z, abar, abar_to):
  """The probability-flow ODE's exact map for x ~ N(MU, STD^2), float64: quantile to quantile."""
  def mean_std(ab):
    return np.sqrt(ab) * MU, np.sqrt(ab * STD ** 2 + 1.0 - ab)
  (m, d), (m_to, d_to) = mean_std(abar), mean_std(abar_to)
  return m_to + d_to * (z - m) / d


@pytest.mark.parametrize('order', [2, 3])
def test_solver_path_is_the_dpm_solver_chain_and_closer_to_the_ode_than_ddim(order):
  """Stored states of DPM-Solver++ lie on the DDIM grid's times, nearer the exact ODE path."""
  s = make_schedule('linear', 40)
  z = jax.random.normal(jax.random.PRNGKey(0), (5, 4, 4, 1))
  fn = gaussian_teacher(s, 'eps')
  kw = dict(start_steps=8, stored_steps=4, mean_type='eps', clip_denoised=False)
  states = teacher_paths.solver_path(s, fn, z, order=order, **kw)
  ddim = teacher_paths.ddim_path(s, fn, z, **kw)
  assert states.shape == ddim.shape == (5,) + z.shape
  np.testing.assert_array_equal(states[0], z)
  # The last state is the library's DPM-Solver++ sample in 8 trailing steps from the same x_T.
  sample = sampling.dpm_solver_sample_loop(s, fn, jax.random.PRNGKey(1), z.shape, num_steps=8,
                                           order=order, skip_type='trailing', x_T=z)
  np.testing.assert_allclose(states[-1], sample, rtol=1e-5, atol=1e-5)
  # Every stored state against the exact flow from x_T to its time (abar = 1 for the sample).
  abar = np.asarray(s.alphas_cumprod, np.float64)
  desc = timesteps.trailing_timesteps(40, 8)[::-1]
  times = [abar[desc[k]] if k < 8 else 1.0 for k in (2, 4, 6, 8)]
  exact = np.stack([_np_ode_flow(np.asarray(z, np.float64), abar[desc[0]], a) for a in times])
  err_solver = np.abs(np.asarray(states[1:], np.float64) - exact).max(axis=(1, 2, 3, 4))
  err_ddim = np.abs(np.asarray(ddim[1:], np.float64) - exact).max(axis=(1, 2, 3, 4))
  assert np.all(err_solver < 0.5 * err_ddim), (err_solver, err_ddim)   # 2-12x smaller here


def test_draw_and_step_pairs_take_states_stride_apart():
  """A 2-step student on 4 stored steps: its step i goes from state 2 i to state 2 i + 2."""
  states = jnp.arange(5 * 7, dtype=jnp.float32).reshape(5, 7, 1, 1, 1)   # value = 7 s + p
  paths = teacher_paths.Paths(states=states, labels=None)
  assert paths.num_steps == 4
  i, b = teacher_paths.draw(paths, jax.random.PRNGKey(3), 64, 2)
  assert set(np.asarray(i).tolist()) == {0, 1} and set(np.asarray(b).tolist()) == set(range(7))
  z, z_end = teacher_paths.step_pairs(paths, i, b, 2)
  np.testing.assert_array_equal(z[:, 0, 0, 0], 7 * 2 * i + b)
  np.testing.assert_array_equal(z_end[:, 0, 0, 0], 7 * (2 * i + 2) + b)
  z, z_end = teacher_paths.step_pairs(paths, i, b, 4)   # the 4-step student: neighbours
  np.testing.assert_array_equal(z_end[:, 0, 0, 0] - z[:, 0, 0, 0], 7)


def _make(config, workdir, params, say=lambda _: None):
  model = models.create_model(config)
  return teacher_paths.make_paths(config, model, schedule_lib.schedule_from_config(config),
                                  params, workdir, stored_steps=2, checkpoint_step=2,
                                  mesh=train.make_mesh(), say=say)


def test_pool_is_made_once_resumes_by_chunk_and_checks_its_settings(tmp_path):
  config = tiny_config(**{'distill.inputs': 'teacher_paths', 'distill.teacher': 'original',
                          'distill.num_paths': 12, 'distill.path_chunk': 4})
  model = models.create_model(config)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32),
                      train=False)['params']
  said = []
  paths = _make(config, tmp_path, params, said.append)
  assert paths.states.shape == (3, 12, 8, 8, 1) and paths.labels is None
  assert said and 'Teacher paths: 12 of 12 to make' in said[0]
  directory = teacher_paths.paths_dir(tmp_path)
  assert sorted(os.listdir(directory)) == ['chunk_00000.npz', 'chunk_00001.npz',
                                           'chunk_00002.npz', 'meta.json']
  # Chunk c's x_T comes from the seed and c: the first state of the stored chunk.
  x1, _ = teacher_paths.chunk_inputs(config, 1, 4)
  np.testing.assert_array_equal(paths.states[0, 4:8], x1)
  # The paths are the model's 4-step DDIM samples (the state after 2 of 2 stored steps).
  fn = lambda x, t: model.apply({'params': params}, x, t, train=False)
  sample = sampling.ddim_sample_loop(schedule_lib.schedule_from_config(config), fn,
                                     jax.random.PRNGKey(0), x1.shape, num_steps=4,
                                     skip_type='trailing', x_T=x1)
  np.testing.assert_allclose(paths.states[-1, 4:8], sample, rtol=1e-5, atol=1e-5)
  # A kill while making chunk 1: the rerun makes only that chunk, and the same pool.
  kept = os.path.getmtime(directory / 'chunk_00000.npz')
  os.remove(directory / 'chunk_00001.npz')
  said = []
  again = _make(config, tmp_path, params, said.append)
  assert 'Teacher paths: 4 of 12 to make' in said[0]
  assert os.path.getmtime(directory / 'chunk_00000.npz') == kept
  np.testing.assert_array_equal(again.states, paths.states)
  said = []
  _make(config, tmp_path, params, said.append)   # complete: nothing to make, nothing said
  assert said == []
  # A pool made with other settings is not reused silently.
  other = tiny_config(**{'distill.inputs': 'teacher_paths', 'distill.teacher': 'original',
                         'distill.num_paths': 12, 'distill.path_chunk': 6})
  with pytest.raises(ValueError, match=r'path_chunk=4, not 6; remove that folder'):
    _make(other, tmp_path, params)
  solver = tiny_config(**{'distill.inputs': 'teacher_paths', 'distill.teacher': 'original',
                          'distill.num_paths': 12, 'distill.path_chunk': 4,
                          'distill.path_solver_order': 3})
  with pytest.raises(ValueError, match=r'path_solver_order=1, not 3; remove that folder'):
    _make(solver, tmp_path, params)
  # A pool written before meta.json named its sampler was made with DDIM: still reused.
  meta = directory / 'meta.json'
  meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items()
                              if k != 'path_solver_order'}))
  said = []
  _make(config, tmp_path, params, said.append)
  assert said == []
  # With DPM-Solver++ (3M) in another workdir: the model's 4-step DPM-Solver++ samples.
  said = []
  paths = _make(solver, tmp_path / 'solver', params, said.append)
  assert '4 DPM-Solver++ (3M) steps each' in said[0]
  sample = sampling.dpm_solver_sample_loop(schedule_lib.schedule_from_config(config), fn,
                                           jax.random.PRNGKey(0), x1.shape, num_steps=4,
                                           order=3, skip_type='trailing', x_T=x1,
                                           clip_denoised=bool(config.diffusion.clip_denoised))
  np.testing.assert_allclose(paths.states[-1, 4:8], sample, rtol=1e-5, atol=1e-5)


DEVICES_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np
from test_distill import PATHS, tiny_config
from diffusion_jax import distill, models, teacher_paths, train
from diffusion_jax import schedule as schedule_lib
config = tiny_config(**{**PATHS, 'distill.num_paths': 16, 'distill.path_chunk': 8,
                   'distill.final_steps': 2, 'distill.steps_per_round': 3})
model = models.create_model(config)
schedule = schedule_lib.schedule_from_config(config)
params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32),
                    train=False)['params']
mesh = train.make_mesh()
paths = teacher_paths.make_paths(config, model, schedule, params, sys.argv[2], stored_steps=2,
                                 checkpoint_step=0, mesh=mesh)
cfg = distill.student_config(config, 2)
student, _ = distill.run_round(config, cfg, paths, distill.round_dir(sys.argv[2], 2),
                               label='2 steps', init_params=params)
leaves = jax.tree.leaves(jax.device_get(student))
np.savez(sys.argv[3], states=np.asarray(paths.states), *leaves)
print('DEVICES', jax.device_count())
"""


@pytest.mark.slow   # two subprocesses: a minute or two on 2 cores
def test_paths_and_a_round_on_them_agree_on_one_and_two_devices(tmp_path):
  """The pool (batch-sharded DDIM) and a 3-step round (drawn pairs sharded over ``data``)."""
  out = {}
  for devices in (1, 2):
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    npz = tmp_path / f'd{devices}.npz'
    proc = subprocess.run([sys.executable, '-c', DEVICES_SCRIPT, os.path.dirname(__file__),
                           str(tmp_path / f'run{devices}'), str(npz)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f'DEVICES {devices}' in proc.stdout
    with np.load(npz) as f:
      out[devices] = {k: f[k] for k in f.files}
  np.testing.assert_allclose(out[2]['states'], out[1]['states'], rtol=1e-5, atol=1e-5)
  keys = [k for k in out[1] if k != 'states']
  moved = max(float(np.abs(out[1][k]).max()) for k in keys)
  assert moved > 0
  num = sum(float(np.sum((np.float64(out[2][k]) - out[1][k]) ** 2)) for k in keys)
  den = sum(float(np.sum(np.float64(out[1][k]) ** 2)) for k in keys)
  assert (num / den) ** 0.5 < 1e-5, (num / den) ** 0.5
