"""Tests for diffusion_jax.convert: diffusers folder -> workdir -> --mode sample / eval -> diffusers.

End to end on the tiny diffusers fixture (tests/fixtures/diffusers_tiny_unet,
8x8x1): the commands run as a user runs them, with T = 20 to stay quick.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors import numpy as st_numpy

from diffusion_jax import convert, interop

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TINY = os.path.join(HERE, 'fixtures', 'diffusers_tiny_unet')
# The tiny model and a short chain, as --default_config overrides of main.py.
MAIN_FLAGS = [
    '--default_config.model.ch=8', '--default_config.model.ch_mult=(1,2)',
    '--default_config.model.num_res_blocks=1', '--default_config.model.num_groups=4',
    '--default_config.diffusion.num_timesteps=20', '--default_config.sampling.num_steps=5',
]


def run(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)   # generous: CI machines may be loaded


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('convert') / 'w')
  proc = run('diffusion_jax.convert', 'from-diffusers', TINY, '--workdir', workdir,
             '--config', 'configs/digits.py', '--config.diffusion.num_timesteps=20',
             '--config.sampling.num_steps=5')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Wrote checkpoint step 0' in proc.stdout and workdir in proc.stdout
  return workdir


def test_from_diffusers_writes_a_checkpoint_and_config(workdir):
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['0']
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  assert config['model']['ch'] == 8 and config['model']['ch_mult'] == [1, 2]
  assert config['diffusion']['num_timesteps'] == 20 and config['data']['name'] == 'digits'


def test_sample_and_eval_run_on_the_workdir(workdir):
  proc = run('diffusion_jax.main', '--mode', 'sample', '--workdir', workdir, *MAIN_FLAGS,
             '--default_config.sampling.num_samples=4', '--default_config.sampling.batch_size=4')
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(os.path.join(workdir, 'samples', 'samples_ddim_5.npz')) as f:
    images = f['images']
  assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8
  proc = run('diffusion_jax.main', '--mode', 'eval', '--workdir', workdir, *MAIN_FLAGS,
             '--default_config.eval.parts=bpd,rd', '--default_config.eval.num_bpd_examples=8',
             '--default_config.eval.batch_size=8')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'checkpoint step 0' in proc.stdout and 'test NLL' in proc.stdout
  with open(os.path.join(workdir, 'eval', 'bpd.json')) as f:
    bpd = json.load(f)
  assert bpd['num_examples'] == 8 and bpd['num_timesteps'] == 20 and bpd['step'] == 0
  assert 0 < bpd['total_bpd'] < 100


def test_to_diffusers_exports_the_imported_weights(workdir, tmp_path):
  out = convert.to_diffusers(workdir, tmp_path / 'out')
  exported = st_numpy.load_file(str(out / interop.WEIGHTS_NAME))
  original = st_numpy.load_file(os.path.join(TINY, interop.WEIGHTS_NAME))
  assert set(exported) == set(original)
  for name, value in original.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_a_bad_folder_is_one_line_and_exit_2(tmp_path):
  folder = str(tmp_path / 'bad')
  shutil.copytree(TINY, folder)
  with open(os.path.join(folder, interop.CONFIG_NAME)) as f:
    dconfig = json.load(f)
  dconfig['flip_sin_to_cos'] = True
  with open(os.path.join(folder, interop.CONFIG_NAME), 'w') as f:
    json.dump(dconfig, f)
  proc = run('diffusion_jax.convert', 'from-diffusers', folder, '--workdir', str(tmp_path / 'w'))
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert lines[-1] == ('error: diffusers config: flip_sin_to_cos=True is not the DDPM layout; '
                       'it must be False.'), proc.stderr[-2000:]
  assert not os.path.exists(str(tmp_path / 'w'))
  proc = run('diffusion_jax.convert', 'sideways', folder, '--workdir', str(tmp_path / 'w'))
  assert proc.returncode == 2 and 'usage: python -m diffusion_jax.convert' in proc.stderr
