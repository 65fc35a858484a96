"""Tests for diffusion_jax.pipeline: ``diffusion_jax.load`` and :class:`Pipeline`.

A tiny digits model is trained for 4 steps once (module fixture, shared across
xdist workers through a file lock) into a workdir with its ``config.json``, as
``--mode train`` leaves it; a tiny class-conditional one likewise.
"""

import fcntl
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import diffusion_jax
from diffusion_jax import config_lib, train, workdir as workdir_lib

from test_guidance import _random_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    'model.ch': 16, 'model.ch_mult': (1, 2), 'model.num_res_blocks': 1, 'model.num_groups': 8,
    'model.attn_resolutions': (), 'diffusion.num_timesteps': 20,
    'training.num_train_steps': 4, 'training.checkpoint_every_steps': 4,
    'training.sample_every_steps': 4, 'training.log_every_steps': 2,
    'training.num_sample_images': 4, 'sampling.num_steps': 5, 'sampling.batch_size': 8,
    'sampling.ode_rtol': 1e-5, 'sampling.ode_atol': 1e-5,
}


def tiny_config(**more):
  return config_lib.apply_overrides(config_lib.digits_config(), {**TINY, **more},
                                    trained=False)


def trained_workdir(root, name: str, config) -> str:
  """``root/name``: ``config`` trained for 4 steps with its config.json (once per root)."""
  workdir = os.path.join(root, name)
  with open(os.path.join(root, f'{name}.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(os.path.join(workdir, 'checkpoints', '4')):
      workdir_lib.prepare(workdir, config.to_json_best_effort(indent=2, sort_keys=True))
      train.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return trained_workdir(str(tmp_path_factory.getbasetemp().parent), 'pipeline_digits',
                         tiny_config())


@pytest.fixture(scope='module')
def pipe(workdir):
  return diffusion_jax.load(workdir)


def test_load_reads_the_workdir_config(pipe, workdir):
  assert pipe.config.model.ch == 16 and pipe.config.diffusion.num_timesteps == 20
  assert pipe.step == 4 and pipe.image_shape == (8, 8, 1)
  assert 'step=4' in repr(pipe)
  over = diffusion_jax.load(workdir, **{'sampling.num_steps': 3}, eval=dict(batch_size=7))
  assert over.config.sampling.num_steps == 3 and over.config.eval.batch_size == 7
  assert pipe.config.sampling.num_steps == 5   # the first pipeline is unchanged


def test_sample_is_deterministic_uint8_and_compiles_once(pipe):
  a = pipe.sample(6, seed=1, sampler='dpm_solver', num_steps=4)
  before = len(pipe._cache)   # pylint: disable=protected-access
  b = pipe.sample(6, seed=1, sampler='dpm_solver', num_steps=4)
  assert a.dtype == np.uint8 and a.shape == (6, 8, 8, 1)
  np.testing.assert_array_equal(a, b)   # bit-identical
  assert len(pipe._cache) == before   # pylint: disable=protected-access  (no new compile)
  assert not np.array_equal(a, pipe.sample(6, seed=2, sampler='dpm_solver', num_steps=4))
  anc = pipe.sample(2, sampler='ancestral', num_steps=5)   # respaced ancestral: 5 steps
  assert anc.shape == (2, 8, 8, 1)


def test_sample_equals_the_command_line(pipe, workdir):
  """``--mode sample --config.seed=S`` writes the images ``pipe.sample(num_samples, seed=S)`` gives."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  cmd = [sys.executable, '-m', 'diffusion_jax.main', '--mode=sample', f'--workdir={workdir}',
         '--config.seed=3', '--config.sampling.sampler=dpm_solver',
         '--config.sampling.num_steps=4', '--config.sampling.num_samples=6',
         '--config.training.cpu_devices=1']
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  npz = re.search(r'(\S+samples_dpm_solver_4_order2\.npz)', out.stdout).group(1)
  with np.load(npz) as f:
    cli = f['images']
  np.testing.assert_array_equal(cli, pipe.sample(6, seed=3, sampler='dpm_solver', num_steps=4))


def test_inpaint_keeps_every_known_pixel(pipe):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
  known = np.zeros((8, 8), bool)
  known[:4] = True   # keep the top half
  out = pipe.inpaint(images, known, resample=2, jump_length=2, num_steps=5)
  assert out.dtype == np.uint8 and out.shape == images.shape
  np.testing.assert_array_equal(out[:, :4], images[:, :4])
  assert np.any(out[:, 4:] != images[:, 4:])
  per_image = np.broadcast_to(known, (3, 8, 8)).copy()
  per_image[1] = ~known
  out = pipe.inpaint(images, per_image, method='replace', num_steps=5)
  np.testing.assert_array_equal(out[per_image], images[per_image])


def test_edit_strength_and_bad_arguments(pipe):
  images = np.full((2, 8, 8, 1), 200, np.uint8)
  out = pipe.edit(images, strength=0.3, sampler='ddim', num_steps=4)
  assert out.dtype == np.uint8 and out.shape == images.shape
  for bad in (0.0, 1.5, -0.1):
    with pytest.raises(ValueError, match=r'strength must be in \(0, 1\]'):
      pipe.edit(images, strength=bad)
  with pytest.raises(ValueError, match=r'images must be uint8 \[N, 8, 8, 1\]'):
    pipe.edit(images.astype(np.float32), strength=0.5)
  with pytest.raises(ValueError, match=r'images must be uint8'):
    pipe.inpaint(images[:, :4], np.ones((8, 8), bool))
  with pytest.raises(ValueError, match=r'known must be bool'):
    pipe.inpaint(images, np.ones((8, 8), np.uint8))
  with pytest.raises(ValueError, match=r"sampling\.sampler='euler' is not supported"):
    pipe.sample(2, sampler='euler')
  with pytest.raises(ValueError, match=r"unknown config key 'sampling\.bogus'"):
    pipe.sample(2, bogus=1)
  with pytest.raises(ValueError, match=r'num must be a positive integer'):
    pipe.sample(0)
  with pytest.raises(ValueError, match=r'labels are for a class-conditional model'):
    pipe.sample(2, labels=[0, 1])
  with pytest.raises(ValueError, match=r"method='exact' is not supported; allowed values: bound, ode"):
    pipe.bits_per_dim(images, method='exact')


def test_encode_then_decode_gives_the_images_back(pipe):
  from sklearn.datasets import load_digits   # pylint: disable=g-import-not-at-top
  digits = load_digits().images[:4]
  images = np.round(digits / 16.0 * 255).astype(np.uint8)[..., None]
  latents = pipe.encode(images)
  assert latents.dtype == np.float32 and latents.shape == images.shape
  back = pipe.decode(latents)
  assert np.abs(back.astype(int) - images.astype(int)).max() <= 1   # within one 8-bit level


def test_bits_per_dim_bound_and_ode(pipe):
  images = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
  bound = pipe.bits_per_dim(images, method='bound')
  assert bound.shape == (3,) and np.all(np.isfinite(bound)) and np.all(bound > 0)
  np.testing.assert_allclose(bound, pipe.bits_per_dim(images, method='bound'), rtol=1e-6)
  ode = pipe.bits_per_dim(images, method='ode')
  assert ode.shape == (3,) and np.all(np.isfinite(ode))


@pytest.fixture(scope='module')
def cond_pipe(tmp_path_factory):
  config = tiny_config(**{'model.num_classes': 10, 'model.class_dropout': 0.1})
  workdir = trained_workdir(str(tmp_path_factory.getbasetemp().parent), 'pipeline_cond', config)
  pipe = diffusion_jax.load(workdir)
  # Four steps barely move the zero-initialised output layer: random weights let labels matter.
  pipe.params = _random_params(pipe.params)
  return pipe


def test_a_conditional_model_samples_the_asked_for_labels(cond_pipe):
  labels = np.array([0, 3, 7, 9], np.int32)
  images, got = cond_pipe.sample_with_labels(4, seed=0, labels=labels, sampler='ddim',
                                             num_steps=4)
  np.testing.assert_array_equal(got, labels)
  # the labels reach the model: other labels give other images from the same noise
  other = cond_pipe.sample(4, seed=0, labels=(labels + 1) % 10, sampler='ddim', num_steps=4)
  assert np.any(images != other)
  same = cond_pipe.sample(4, seed=0, labels=labels, sampler='ddim', num_steps=4)
  np.testing.assert_array_equal(images, same)
  with pytest.raises(ValueError, match=r'labels must be integers in \[0, 9\] of shape \[4\]'):
    cond_pipe.sample(4, labels=[0, 1, 2, 10])
  guided = cond_pipe.sample(4, seed=0, labels=labels, guidance_scale=2.0, sampler='ddim',
                            num_steps=4)
  assert np.any(guided != images)


def test_the_readme_python_block_runs_as_written(workdir, tmp_path, monkeypatch):
  """The README's ``## From Python`` block, exactly as written, on a trained workdir at runs/digits."""
  with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
    readme = f.read()
  section = readme.split('## From Python', 1)[1]
  code = re.search(r'```python\n(.*?)```', section, re.S).group(1)
  (tmp_path / 'runs').mkdir()
  os.symlink(workdir, tmp_path / 'runs' / 'digits')
  monkeypatch.chdir(tmp_path)
  scope = {}
  exec(compile(code, 'README.md', 'exec'), scope)   # pylint: disable=exec-used
  assert scope['images'].shape == (64, 8, 8, 1) and scope['images'].dtype == np.uint8
  np.testing.assert_array_equal(scope['completed'][:, :4], scope['images'][:, :4])
  assert scope['edited'].shape == (64, 8, 8, 1) and scope['bpd'].shape == (64,)


@pytest.mark.slow   # a T = 1000 chain for the bound and the ODE: minutes on 2 cores
def test_a_diffusers_folder_loads_and_runs_every_method():
  """The tiny diffusers UNet2DModel of tests/fixtures (random weights, made by diffusers itself)."""
  folder = os.path.join(REPO, 'tests', 'fixtures', 'diffusers_tiny_unet')
  pipe = diffusion_jax.load(folder, sampling=dict(batch_size=4, ode_rtol=1e-3, ode_atol=1e-3))
  assert pipe.step is None and pipe.image_shape == (8, 8, 1)
  assert pipe.config.model.ch == 8 and pipe.config.diffusion.num_timesteps == 1000
  with np.load(os.path.join(REPO, 'tests', 'fixtures', 'diffusers_tiny_unet_io.npz')) as f:
    x, t, out = f['x'], f['t'], f['out']
  got = pipe.module.apply({'params': pipe.params}, np.transpose(x, (0, 2, 3, 1)), t, train=False)
  np.testing.assert_allclose(np.transpose(np.asarray(got), (0, 3, 1, 2)), out, atol=1e-4)
  images = pipe.sample(4, sampler='dpm_solver', num_steps=5, seed=0)
  assert images.dtype == np.uint8 and images.shape == (4, 8, 8, 1)
  np.testing.assert_array_equal(images, pipe.sample(4, sampler='dpm_solver', num_steps=5, seed=0))
  known = np.zeros((8, 8), bool)
  known[:, :4] = True
  filled = pipe.inpaint(images, known, num_steps=10, resample=1)
  np.testing.assert_array_equal(filled[:, :, :4], images[:, :, :4])
  assert pipe.edit(images, strength=0.5, sampler='ddim', num_steps=4).shape == images.shape
  assert pipe.decode(pipe.encode(images)).shape == images.shape
  assert pipe.bits_per_dim(images).shape == (4,)


def test_edit_and_inpaint_modes_take_your_own_files(pipe, workdir, tmp_path):
  """``edit.input`` (a folder of PNGs) and ``inpaint.input`` (an .npz) give the Pipeline's results."""
  from PIL import Image   # pylint: disable=g-import-not-at-top
  from diffusion_jax import editing_cli   # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
  folder = tmp_path / 'mine'
  folder.mkdir()
  for i, im in enumerate(images):
    Image.fromarray(im[..., 0]).save(folder / f'{i:02d}.png')
  Image.fromarray(np.zeros((16, 16), np.uint8)).resize((16, 16)).save(folder / 'zz_big.png')
  config = pipe.config.copy_and_resolve_references()
  config.edit.input, config.edit.strength = str(folder), 0.4
  out = editing_cli.run_edit(config, workdir)
  with np.load(out['npz']) as f:
    np.testing.assert_array_equal(f['originals'][:3], images)
    assert f['originals'].shape == (4, 8, 8, 1)   # the 16x16 image was resized
    np.testing.assert_array_equal(f['images'], pipe.edit(f['originals'], strength=0.4,
                                                         seed=config.seed))
  npz = tmp_path / 'mine.npz'
  np.savez(npz, images=images)
  config.inpaint.input, config.inpaint.missing = str(npz), 'left_half'
  config.inpaint.num_steps, config.inpaint.resample = 5, 2
  out = editing_cli.run_inpaint(config, workdir)
  with np.load(out['npz']) as f:
    np.testing.assert_array_equal(f['originals'], images)
    np.testing.assert_array_equal(f['images'][f['known']], images[f['known']])
  config.edit.input = str(tmp_path / 'nothing_here')
  with pytest.raises(FileNotFoundError, match=r"edit\.input .*nothing_here.* does not exist"):
    editing_cli.check_edit(config)
  np.savez(tmp_path / 'bad.npz', images=images[..., 0])
  config.inpaint.input = str(tmp_path / 'bad.npz')
  with pytest.raises(ValueError, match=r"inpaint\.input .*'images' must be uint8 \[N, 8, 8, 1\]"):
    editing_cli.check_inpaint(config)
