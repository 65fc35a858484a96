"""Tests for diffusion_jax.interop: diffusers UNet2DModel folders in the DDPM layout.

No torch here: the fixtures in tests/fixtures/ were made once by the real
diffusers (tests/fixtures/make_diffusers_fixture.py): a tiny UNet2DModel with
random non-zero weights, its inputs and outputs, and the tensor names and
shapes of the paper's CIFAR-10 and 256x256 models.
"""

import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from diffusion_jax import config_lib, interop, models

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FIXTURES = os.path.join(HERE, 'fixtures')
TINY = os.path.join(FIXTURES, 'diffusers_tiny_unet')
TINY_WEIGHTS = os.path.join(TINY, interop.WEIGHTS_NAME)


def load_config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny_dconfig():
  with open(os.path.join(TINY, interop.CONFIG_NAME)) as f:
    return json.load(f)


def write_folder(path, dconfig, tensors):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, interop.CONFIG_NAME), 'w') as f:
    json.dump(dconfig, f)
  st_numpy.save_file(tensors, os.path.join(path, interop.WEIGHTS_NAME))
  return path


@pytest.fixture(scope='module')
def tiny():
  return interop.load_diffusers_unet(TINY)


def test_fixture_is_small_and_in_the_ddpm_layout():
  assert 50_000 < os.path.getsize(TINY_WEIGHTS) < 400_000
  full = interop.check_ddpm_layout(tiny_dconfig())
  assert full['down_block_types'] == ['DownBlock2D', 'AttnDownBlock2D']
  tensors = st_numpy.load_file(TINY_WEIGHTS)
  assert all(np.abs(v).max() > 0 for v in tensors.values())   # random non-zero weights


def test_forward_pass_equals_diffusers(tiny):
  """Our U-Net with the imported weights gives diffusers' output (NCHW <-> NHWC)."""
  config, params = tiny
  assert (config.model.ch, tuple(config.model.ch_mult), config.model.num_res_blocks,
          tuple(config.model.attn_resolutions), config.model.num_groups) == (8, (1, 2), 1, (4,), 4)
  assert (config.data.name, config.data.image_size, config.data.num_channels) == ('digits', 8, 1)
  with np.load(os.path.join(FIXTURES, 'diffusers_tiny_unet_io.npz')) as f:
    x, t, expected = f['x'], f['t'], f['out']
  apply = jax.jit(models.create_model(config).apply)
  out = apply({'params': params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t, jnp.int32))
  out = np.asarray(out).transpose(0, 3, 1, 2)
  assert np.abs(expected).max() > 0.5
  rel = np.abs(out - expected).max() / np.abs(expected).max()
  assert rel < 1e-5, rel
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_export_then_import_is_exact(tiny, tmp_path):
  config, params = tiny
  out = interop.save_diffusers_unet(config, params, tmp_path / 'out')
  exported = st_numpy.load_file(str(out / interop.WEIGHTS_NAME))
  original = st_numpy.load_file(TINY_WEIGHTS)
  assert set(exported) == set(original)
  for name, value in original.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)
  with open(out / interop.CONFIG_NAME) as f:
    dconfig = json.load(f)
  assert dconfig['_class_name'] == 'UNet2DModel'
  for key, value in tiny_dconfig().items():
    if not key.startswith('_') and key != 'num_train_timesteps':
      assert dconfig[key] == value, key
  config2, params2 = interop.load_diffusers_unet(out)
  assert config2.model.to_dict() == config.model.to_dict()
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_a_model_made_here_exports_and_loads_back(tmp_path):
  """Random parameters of a config with a learned variance (2C outputs), three levels."""
  config = config_lib.digits_config()
  config.model.ch, config.model.ch_mult, config.model.num_groups = 8, (1, 2, 2), 4
  config.diffusion.var_type = 'learned_range'
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32) * 0.1,
                        interop.abstract_params(config))
  interop.save_diffusers_unet(config, params, tmp_path)
  loaded_config, loaded = interop.load_diffusers_unet(tmp_path)
  assert loaded_config.diffusion.var_type == 'learned_range'
  assert tuple(loaded_config.model.ch_mult) == (1, 2, 2)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  assert loaded['conv_out']['kernel'].shape == (3, 3, 8, 2)   # mean and variance channels
  assert (jax.tree.map(lambda x: x.shape, interop.abstract_params(loaded_config))
          == jax.tree.map(lambda x: x.shape, params))


@pytest.mark.parametrize('name,count', [('cifar10', 35_746_307), ('celeba_hq256', 113_673_219)])
def test_mapping_covers_the_paper_configs(name, count):
  """Every diffusers tensor (names and shapes listed by the real diffusers) is
  exactly one of our parameters with the converted shape, and back."""
  config = load_config(name)
  with open(os.path.join(FIXTURES, 'diffusers_names_shapes.json')) as f:
    expected = {k: tuple(v) for k, v in json.load(f)[name].items()}
  ours = interop.abstract_params(config)
  assert models.count_params(ours) == count
  mapping = interop.parameter_mapping(config, ours)
  assert {k: v[2] for k, v in mapping.items()} == expected
  paths = [v[0] for v in mapping.values()]
  assert len(set(paths)) == len(paths) == len(jax.tree.leaves(ours))
  assert sum(int(np.prod(s)) for s in expected.values()) == count
  # Back: zeros of the diffusers shapes convert to our shapes.
  tensors = {k: np.zeros(s, np.float32) for k, s in expected.items()}
  params = interop.params_from_diffusers(config, tensors)
  assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(lambda x: x.shape, ours)
  dconfig = interop.diffusers_unet_config(config)
  assert interop.config_from_diffusers(dconfig).model.to_dict() == config.model.to_dict()


@pytest.mark.parametrize('field,value,required', [
    ('freq_shift', 0, '1'),
    ('flip_sin_to_cos', True, 'False'),
    ('attention_head_dim', 8, 'None'),
    ('norm_eps', 1e-5, '1e-06'),
    ('downsample_padding', 1, '0'),
    ('resnet_time_scale_shift', 'scale_shift', "'default'"),
    ('time_embedding_type', 'fourier', "'positional'"),
    ('up_block_types', ['UpBlock2D', 'UpBlock2D'], "['AttnUpBlock2D', 'UpBlock2D']"),
    ('down_block_types', ['DownBlock2D', 'CrossAttnDownBlock2D'], 'a list of'),
])
def test_non_ddpm_layout_is_one_line_naming_the_field(tmp_path, field, value, required):
  dconfig = tiny_dconfig()
  dconfig[field] = value
  folder = str(tmp_path)
  shutil.copy(TINY_WEIGHTS, folder)
  with open(os.path.join(folder, interop.CONFIG_NAME), 'w') as f:
    json.dump(dconfig, f)
  with pytest.raises(ValueError) as e:
    interop.load_diffusers_unet(folder)
  msg = str(e.value)
  assert '\n' not in msg and f'{field}={value!r}' in msg and f'must be {required}' in msg, msg


def test_omitted_fields_take_diffusers_defaults():
  """A config.json without freq_shift gets diffusers' default 0: not the DDPM layout."""
  dconfig = tiny_dconfig()
  del dconfig['freq_shift']
  with pytest.raises(ValueError, match=r'freq_shift=0 .* must be 1'):
    interop.check_ddpm_layout(dconfig)
  dconfig = tiny_dconfig()
  for key in ('add_attention', 'resnet_time_scale_shift', 'downsample_type', 'num_class_embeds'):
    del dconfig[key]   # their defaults are the DDPM layout
  assert interop.check_ddpm_layout(dconfig)['add_attention'] is True


def test_older_attention_names_and_mismatched_weights(tmp_path):
  tensors = st_numpy.load_file(TINY_WEIGHTS)
  legacy = {k.replace('.to_q.', '.query.').replace('.to_out.0.', '.proj_attn.'): v
            for k, v in tensors.items()}
  assert legacy.keys() != tensors.keys()
  _, params = interop.load_diffusers_unet(write_folder(str(tmp_path / 'legacy'),
                                                       tiny_dconfig(), legacy))
  _, reference = interop.load_diffusers_unet(TINY)
  jax.tree.map(np.testing.assert_array_equal, params, reference)
  missing = {k: v for k, v in tensors.items() if k != 'conv_in.bias'}
  with pytest.raises(ValueError, match=r"missing \['conv_in.bias'\]"):
    interop.load_diffusers_unet(write_folder(str(tmp_path / 'missing'), tiny_dconfig(), missing))
  wrong = dict(tensors, **{'conv_in.bias': np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match=r'conv_in.bias has shape \(3,\), expected \(8,\)'):
    interop.load_diffusers_unet(write_folder(str(tmp_path / 'wrong'), tiny_dconfig(), wrong))
  with pytest.raises(FileNotFoundError, match=interop.WEIGHTS_NAME):
    interop.load_diffusers_unet(str(tmp_path / 'nowhere'))


def test_config_from_diffusers_with_a_base_config():
  dconfig = tiny_dconfig()
  base = config_lib.digits_config()
  base.diffusion.num_timesteps = 20
  config = interop.config_from_diffusers(dconfig, base)
  assert config.diffusion.num_timesteps == 20 and config.model.ch == 8
  assert base.model.ch == 32   # the base is not modified
  with pytest.raises(ValueError, match=r'data.image_size=32 .* \(8\)'):
    interop.config_from_diffusers(dconfig, load_config('cifar10'))
  with pytest.raises(ValueError, match="diffusion.var_type='fixed_large'.*'learned_range'"):
    interop.config_from_diffusers(dict(dconfig, out_channels=2), base)
  with pytest.raises(ValueError, match='out_channels=3 .* must be in_channels=1 or 2'):
    interop.config_from_diffusers(dict(dconfig, out_channels=3), base)
  cifar = interop.config_from_diffusers(interop.diffusers_unet_config(load_config('cifar10')))
  assert cifar.data.name == 'cifar10' and cifar.diffusion.var_type == 'fixed_large'
  with pytest.raises(ValueError, match=r'model.ch_mult=\(2, 2\) must start with 1'):
    bad = config_lib.digits_config()
    bad.model.ch_mult = (2, 2)
    interop.diffusers_unet_config(bad)
