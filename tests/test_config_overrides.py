"""A saved config.json completed with today's defaults; overrides set with type checks and frozen keys."""

import json

import ml_collections
import pytest

from diffusion_jax import config_lib


def _saved(config=None) -> dict:
  """A config as training writes it into config.json, read back with json."""
  return json.loads((config or config_lib.digits_config()).to_json_best_effort(indent=2))


def test_complete_round_trips_a_saved_config_exactly():
  for config in (config_lib.digits_config(), config_lib.base_config()):
    completed = config_lib.complete(_saved(config))
    assert completed.to_dict() == config.to_dict()
    assert json.loads(completed.to_json_best_effort()) == _saved(config)
  completed = config_lib.complete(_saved())
  assert completed.model.ch_mult == (1, 2, 2) and isinstance(completed.model.ch_mult, tuple)
  assert completed.model.attn_resolutions == (4,)


def test_complete_fills_keys_an_older_file_lacks_from_base_config():
  saved = _saved()
  del saved['sampling']['solver_order'], saved['edit'], saved['diffusion']['loss_weighting']
  saved['model']['ch'] = 8
  completed = config_lib.complete(saved)
  base = config_lib.base_config()
  assert completed.sampling.solver_order == base.sampling.solver_order == 2
  assert completed.edit.to_dict() == base.edit.to_dict()
  assert completed.diffusion.loss_weighting == 'none'
  assert completed.model.ch == 8 and completed.data.name == 'digits'


def test_complete_keeps_the_optional_paths_typed_and_is_locked():
  completed = config_lib.complete(_saved())
  assert completed.data.data_dir is None and completed.eval.inception_path is None
  completed.data.data_dir = '/data'   # still a str field
  assert completed.data.data_dir == '/data'
  with pytest.raises(TypeError):
    completed.eval.fid_stats_path = 3
  assert completed.is_locked
  with pytest.raises(AttributeError):
    completed.model.new_key = 1
  saved = _saved()
  saved['data']['data_dir'] = '/tfds'
  assert config_lib.complete(saved).data.data_dir == '/tfds'


def test_complete_takes_a_config_dict_and_coerces_like_ml_collections():
  config = config_lib.digits_config()
  assert config_lib.complete(config).to_dict() == config.to_dict()
  saved = _saved()
  saved['optim']['lr'] = 1   # an int for a float field
  completed = config_lib.complete(saved)
  assert completed.optim.lr == 1.0 and isinstance(completed.optim.lr, float)


@pytest.mark.parametrize('edit,message', [
    (lambda d: d['model'].update(width=3), "unknown config key 'model.width'; model has: "),
    (lambda d: d.update(extra={}), "unknown config key 'extra'; the config has: data, diffusion"),
    (lambda d: d.update(model=3), "the section 'model' must be a mapping of keys to values, got int"),
    (lambda d: d['model'].update(ch='wide'), "config key 'model.ch' takes an int, got 'wide'"),
    (lambda d: d['model'].update(ch=True), "config key 'model.ch' takes an int, got True"),
    (lambda d: d['model'].update(ch=None), "config key 'model.ch' takes an int, got None"),
    (lambda d: d['model'].update(ch_mult=[1, 'x']), "config key 'model.ch_mult' takes a tuple"),
    (lambda d: d['data'].update(data_dir=3), "config key 'data.data_dir' takes a str or None, got 3"),
    (lambda d: d['model'].update(remat=1), "config key 'model.remat' takes a bool, got 1"),
])
def test_complete_names_the_bad_key(edit, message):
  saved = _saved()
  edit(saved)
  with pytest.raises(ValueError) as info:
    config_lib.complete(saved)
  assert str(info.value).startswith(message), info.value


def test_complete_refuses_a_config_that_is_not_a_mapping():
  with pytest.raises(ValueError, match='the config must be a mapping of keys to values, got list'):
    config_lib.complete([1, 2])


def test_frozen_keys_are_the_network_and_schedule_keys_of_the_schema():
  assert set(config_lib.FROZEN_KEYS) == {
      'model.name', 'model.ch', 'model.ch_mult', 'model.num_res_blocks', 'model.attn_resolutions',
      'model.resamp_with_conv', 'model.num_groups', 'model.num_classes', 'diffusion.schedule',
      'diffusion.num_timesteps', 'diffusion.beta_start', 'diffusion.beta_end',
      'diffusion.mean_type', 'diffusion.var_type'}
  base = config_lib.base_config()
  assert all(config_lib.unknown_key_message(base, key) is None for key in config_lib.FROZEN_KEYS)


def test_apply_overrides_sets_dotted_keys_on_a_copy():
  config = config_lib.complete(_saved())
  out = config_lib.apply_overrides(
      config, {'sampling.num_steps': 10, 'sampling.sampler': 'dpm_solver', 'seed': 3,
               'optim.lr': 1, 'data.data_dir': '/d', 'eval.inception_path': None},
      trained=True)
  assert (out.sampling.num_steps, out.sampling.sampler, out.seed) == (10, 'dpm_solver', 3)
  assert out.optim.lr == 1.0 and isinstance(out.optim.lr, float)
  assert out.data.data_dir == '/d' and out.is_locked
  assert config.sampling.num_steps == 100 and config.data.data_dir is None   # unchanged
  unlocked = config_lib.apply_overrides(config_lib.digits_config(), {'seed': 1}, trained=False)
  assert not unlocked.is_locked and unlocked.seed == 1


def test_apply_overrides_takes_a_plain_mapping():
  out = config_lib.apply_overrides(_saved(), {'model.ch_mult': [1, 2]}, trained=False)
  assert isinstance(out, ml_collections.ConfigDict) and out.model.ch_mult == (1, 2)


@pytest.mark.parametrize('key,value', [
    ('model.ch', 64), ('model.ch_mult', (1, 2)), ('model.num_res_blocks', 2),
    ('model.attn_resolutions', ()), ('model.resamp_with_conv', False), ('model.num_groups', 8),
    ('model.num_classes', 10), ('model.name', 'dit'), ('diffusion.schedule', 'cosine'),
    ('diffusion.num_timesteps', 100), ('diffusion.beta_start', 2e-4), ('diffusion.beta_end', 0.01),
    ('diffusion.mean_type', 'v'), ('diffusion.var_type', 'learned_range'),
])
def test_apply_overrides_refuses_a_changed_network_or_schedule_of_a_trained_model(key, value):
  config = config_lib.complete(_saved())
  what = 'network' if key.startswith('model.') else 'schedule and output'
  with pytest.raises(ValueError) as info:
    config_lib.apply_overrides(config, {key: value}, trained=True)
  assert str(info.value).startswith(f'{key}={value!r} would not match the trained {what} ('), info.value
  assert config_lib.apply_overrides(config, {key: value}, trained=False)[key.split('.')[0]][
      key.split('.')[1]] == value   # an untrained workdir may change it


def test_apply_overrides_allows_frozen_keys_at_their_saved_value_and_harmless_keys():
  config = config_lib.complete(_saved())
  same = {'model.ch': 32, 'model.ch_mult': [1, 2, 2], 'diffusion.beta_end': 0.02,
          'diffusion.num_timesteps': 1000, 'diffusion.mean_type': 'eps'}
  harmless = {'model.dtype': 'bfloat16', 'model.conv_impl': 'xla', 'model.attention_impl': 'xla',
              'model.remat': True, 'model.dropout': 0.2, 'diffusion.clip_denoised': False,
              'training.num_train_steps': 3000, 'sampling.sampler': 'ode', 'eval.parts': 'bpd',
              'inpaint.missing': 'center', 'edit.strength': 0.5}
  out = config_lib.apply_overrides(config, {**same, **harmless}, trained=True)
  assert out.model.ch_mult == (1, 2, 2) and out.model.remat and out.model.dropout == 0.2
  assert out.training.num_train_steps == 3000 and out.edit.strength == 0.5


@pytest.mark.parametrize('overrides,message', [
    ({'sampling.steps': 10}, "unknown config key 'sampling.steps'; sampling has: ancestral_steps"),
    ({'model': 3}, "config key 'model' is a section; override its keys (model.attention_impl, "),
    ({'sampling.num_steps': '10'}, "config key 'sampling.num_steps' takes an int, got '10'"),
    ({'sampling.num_steps': 1.5}, "config key 'sampling.num_steps' takes an int, got 1.5"),
    ({'sampling.use_ema': 0}, "config key 'sampling.use_ema' takes a bool, got 0"),
])
def test_apply_overrides_names_the_bad_key(overrides, message):
  with pytest.raises(ValueError) as info:
    config_lib.apply_overrides(config_lib.digits_config(), overrides, trained=False)
  assert str(info.value).startswith(message), info.value


def test_a_trained_model_may_switch_between_the_fixed_variances():
  """fixed_small and fixed_large share the network and its output; learned_range does not."""
  config = config_lib.complete(_saved())
  assert config.diffusion.var_type == 'fixed_large'
  out = config_lib.apply_overrides(config, {'diffusion.var_type': 'fixed_small'}, trained=True)
  assert out.diffusion.var_type == 'fixed_small'
  back = config_lib.apply_overrides(out, {'diffusion.var_type': 'fixed_large'}, trained=True)
  assert back.diffusion.var_type == 'fixed_large'
