"""Tests for configs/*.py: schema, the paper's values, model sizes and shapes.

Parameter counts use ``jax.eval_shape`` (no memory, no compute). Forward
passes run at reduced width (``ch=32``) and small images, with random
parameters built from the eval_shape'd tree (no slow initialisation).
"""

import importlib.util
import pathlib
import subprocess
import sys
import warnings

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from diffusion_jax import models

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs'
PAPER_256 = ('celeba_hq256', 'lsun_church256', 'lsun_bedroom256', 'lsun_cat256')
PAPER = ('cifar10',) + PAPER_256
SMALL = ('mnist', 'digits', 'folder_small')
ALL = PAPER + SMALL

# Measured with jax.eval_shape; the reference implementation's counts.
PARAM_COUNTS = {'cifar10': 35_746_307, **{n: 113_673_219 for n in PAPER_256}}
# Measured with jax.eval_shape: digits' U-Net with 3 channels in and out.
FOLDER_SMALL_PARAMS = 1_113_955


def load_config(name: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(
      f'configs_{name}', CONFIG_DIR / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _abstract_variables(model, config, batch=1, size=None):
  size = size or config.data.image_size
  x = jax.ShapeDtypeStruct((batch, size, size, config.data.num_channels),
                           jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape),
                         jnp.zeros(t.shape, jnp.int32)))
  return variables, x, t


# --- schema -------------------------------------------------------------------

BINDING_KEYS = (
    'seed', 'data.name', 'data.image_size', 'data.data_dir', 'model.ch',
    'model.ch_mult', 'model.num_res_blocks', 'model.attn_resolutions',
    'model.dropout', 'diffusion.schedule', 'diffusion.num_timesteps',
    'diffusion.mean_type', 'diffusion.var_type', 'diffusion.loss_type',
    'optim.lr', 'optim.warmup_steps', 'optim.grad_clip', 'optim.ema_decay',
    'training.batch_size', 'training.num_train_steps',
    'training.checkpoint_every_steps', 'training.log_every_steps',
    'training.sample_every_steps', 'sampling.sampler', 'sampling.num_steps',
    'sampling.eta', 'sampling.num_samples')


@pytest.mark.parametrize('name', ALL)
def test_config_has_schema(name):
  config = load_config(name)
  assert isinstance(config, ml_collections.ConfigDict)
  for section in ('data', 'model', 'diffusion', 'optim', 'training',
                  'sampling', 'eval'):
    assert section in config, section
  for key in BINDING_KEYS:
    node = config
    for part in key.split('.'):
      assert part in node, f'{name}: missing {key}'
      node = node[part]
  assert config.model.name == 'unet'
  assert config.model.dtype in models.DTYPES


@pytest.mark.parametrize('name', ALL)
def test_config_passes_project_validation(name, tmp_path):
  """The other sections are checked by their owners' validators."""
  from diffusion_jax import config_lib  # pylint: disable=g-import-not-at-top
  from diffusion_jax import data  # pylint: disable=g-import-not-at-top
  config = load_config(name)
  if config.data.name == 'image_folder':   # the folder is given on the command line
    config.data.data_dir = str(tmp_path)
  config_lib.validate_config(config)
  data.validate_data_config(config, process_count=1, num_devices=1)
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # every attn resolution is reached
    models.create_model(config)


# --- the paper's values (Ho et al. 2020, appendix B) --------------------------

@pytest.mark.parametrize('name', PAPER)
def test_paper_shared_settings(name):
  config = load_config(name)
  d, o = config.diffusion, config.optim
  assert (d.schedule, d.num_timesteps) == ('linear', 1000)
  assert (d.beta_start, d.beta_end) == (1e-4, 0.02)
  assert (d.mean_type, d.var_type, d.loss_type) == ('eps', 'fixed_large', 'simple')
  assert o.optimizer == 'adam' and (o.b1, o.b2) == (0.9, 0.999)
  assert o.warmup_steps == 5000 and o.grad_clip == 1.0
  assert o.ema_decay == 0.9999
  m = config.model
  assert m.ch == 128 and m.num_res_blocks == 2 and m.num_groups == 32
  assert tuple(m.attn_resolutions) == (16,) and m.resamp_with_conv


def test_paper_cifar10():
  config = load_config('cifar10')
  assert config.data.name == 'cifar10' and config.data.image_size == 32
  assert config.data.random_flip
  assert tuple(config.model.ch_mult) == (1, 2, 2, 2)
  assert config.model.dropout == 0.1
  assert config.optim.lr == 2e-4
  assert config.training.batch_size == 128
  assert config.training.num_train_steps == 800_000


@pytest.mark.parametrize('name,data_name,flip,steps', [
    ('celeba_hq256', 'celeb_a_hq', True, 500_000),
    ('lsun_church256', 'lsun/church_outdoor', True, 1_200_000),
    ('lsun_bedroom256', 'lsun/bedroom', False, 2_400_000),
    ('lsun_cat256', 'lsun/cat', True, 1_800_000),
])
def test_paper_256(name, data_name, flip, steps):
  config = load_config(name)
  assert config.data.name == data_name
  assert config.data.image_size == 256 and config.data.num_channels == 3
  assert config.data.random_flip == flip
  assert tuple(config.model.ch_mult) == (1, 1, 2, 2, 4, 4)
  assert config.model.dropout == 0.0
  assert config.optim.lr == 2e-5
  assert config.training.batch_size == 64
  assert config.training.num_train_steps == steps


def test_small_configs_fit_a_cpu():
  for name in ('mnist', 'digits'):
    config = load_config(name)
    assert config.data.num_channels == 1 and not config.data.random_flip
    assert config.model.ch <= 32
  mnist = load_config('mnist')
  assert mnist.data.name == 'mnist' and mnist.data.image_size == 28
  assert tuple(mnist.model.ch_mult) == (1, 2, 2)  # 28 -> 14 -> 7


def test_folder_small_is_the_digits_model_on_16x16_rgb():
  """configs/folder_small.py: digits' U-Net and recipe on an image folder, DDIM grids."""
  config, digits = load_config('folder_small'), load_config('digits')
  assert config.data.name == 'image_folder' and config.data.data_dir is None
  assert (config.data.image_size, config.data.num_channels) == (16, 3)
  for key in ('ch', 'ch_mult', 'num_res_blocks', 'attn_resolutions', 'dropout'):
    assert config.model[key] == digits.model[key], key
  assert config.optim.to_dict() == digits.optim.to_dict()
  assert config.diffusion.to_dict() == digits.diffusion.to_dict()
  assert 1_000 <= config.training.num_train_steps <= 5_000   # a few thousand
  assert (config.sampling.sampler, config.sampling.num_steps) == ('ddim', 50)
  variables, _, _ = _abstract_variables(models.create_model(config), config)
  count = models.count_params(variables['params'])
  assert count == FOLDER_SMALL_PARAMS, count
  # Only the channels of the image differ from digits' (1 -> 3): the first conv
  # (3x3, C -> 32) gains 2 x 9 x 32 weights, the last (3x3, 32 -> C, a bias per
  # output channel) 2 x (9 x 32 + 1).
  assert count - models.count_params(
      _abstract_variables(models.create_model(digits), digits)[0]['params']) == (
          2 * 3 * 3 * 32 + 2 * (3 * 3 * 32 + 1))


@pytest.mark.slow
def test_folder_small_readme_command_trains_on_a_folder(tmp_path):
  """The README's own-images command, as written, for 2 steps on a folder of 64 PNGs."""
  folder = tmp_path / 'images'
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(64):   # not square and not 16x16: cropped and resized
    Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(
        folder / f'{i:02d}.png')
  workdir = tmp_path / 'mine'
  proc = subprocess.run(
      [sys.executable, '-m', 'diffusion_jax.main', '--config', str(CONFIG_DIR / 'folder_small.py'),
       '--workdir', str(workdir), f'--config.data.data_dir={folder}',
       '--config.training.num_train_steps=2'],
      capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (workdir / 'checkpoints' / '2').is_dir()
  grid = Image.open(workdir / 'samples' / 'samples_00000002.png')
  # An 8x8 grid of 16x16 RGB images with 1-pixel borders, scaled by an integer.
  assert grid.mode == 'RGB' and grid.size[0] == grid.size[1]
  assert grid.size[0] % (8 * (16 + 1) + 1) == 0, grid.size


# --- model size and output shapes ---------------------------------------------

@pytest.mark.parametrize('name', PAPER)
def test_paper_parameter_counts(name):
  config = load_config(name)
  variables, _, _ = _abstract_variables(models.create_model(config), config)
  count = models.count_params(variables['params'])
  assert count == PARAM_COUNTS[name], count
  if name == 'cifar10':
    assert abs(count - 35.7e6) <= 0.01 * 35.7e6   # App. B: 35.7M
  else:
    assert abs(count - 114e6) <= 0.02 * 114e6     # App. B: 114M


@pytest.mark.parametrize('name', ALL)
def test_full_size_output_shapes(name):
  """Abstract forward at the config's own size, C and 2C channels."""
  for var_type, mult in (('fixed_large', 1), ('learned_range', 2)):
    config = load_config(name)
    config.diffusion.var_type = var_type
    model = models.create_model(config)
    variables, x, t = _abstract_variables(model, config, batch=2)
    out = jax.eval_shape(
        lambda v, x, t: model.apply(v, x, t, train=False), variables, x, t)
    c = config.data.num_channels
    assert out.shape == x.shape[:3] + (mult * c,)
    assert out.dtype == jnp.float32


# Small image sizes that still reach every level and the 16x16 attention.
_REDUCED_SIZE = {'cifar10': 16, 'mnist': 28, 'digits': 8, 'folder_small': 16,
                 **{n: 32 for n in PAPER_256}}


def test_256_configs_share_one_model():
  model = load_config('celeba_hq256').model.to_dict()
  for name in PAPER_256[1:]:
    assert load_config(name).model.to_dict() == model, name


# One real forward per distinct architecture (the four 256x256 configs share
# one model section, checked above; all are covered by the abstract test).
@pytest.mark.parametrize('name', ('cifar10', 'celeba_hq256', 'mnist', 'digits'))
def test_reduced_forward(name):
  """A real forward pass at reduced width on a small image."""
  config = load_config(name)
  config.model.ch = 32
  config.data.image_size = _REDUCED_SIZE[name]
  model = models.create_model(config)
  abstract, x, t = _abstract_variables(model, config)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda s: (0.02 * rng.standard_normal(s.shape)).astype(np.float32),
      abstract['params'])
  x = jnp.asarray(rng.uniform(-1, 1, x.shape), jnp.float32)
  out = model.apply({'params': params}, x, jnp.array([10], jnp.int32),
                    train=False)
  chex.assert_shape(out, x.shape)
  chex.assert_tree_all_finite(out)
  assert np.abs(np.asarray(out)).max() > 0
