"""workdir.read_config: the workdir's config.json as the model's config, or one line naming the file."""

import json

import pytest

from diffusion_jax import config_lib
from diffusion_jax import workdir as workdir_lib


def test_read_config_returns_the_saved_config_completed(tmp_path):
  config = config_lib.digits_config()
  config.model.ch = 8
  saved = json.loads(config.to_json_best_effort())
  del saved['inpaint']   # a file from before the section existed
  workdir_lib.prepare(tmp_path, json.dumps(saved))
  read = workdir_lib.read_config(tmp_path)
  assert read.to_dict() == config.to_dict() and read.is_locked
  assert read.model.ch == 8 and read.model.ch_mult == (1, 2, 2)


@pytest.mark.parametrize('text,message', [
    (None, 'config.json does not exist'),
    ('{"model": ', 'config.json is damaged: not JSON (Expecting value: line 1 column 11'),
    ('[1, 2]', 'config.json is damaged: the config must be a mapping of keys to values, got list'),
    ('{"model": {"ch": "x"}}', "config.json is damaged: config key 'model.ch' takes an int, got 'x'"),
    ('{"modle": {}}', "config.json is damaged: unknown config key 'modle'; the config has: data, "),
])
def test_read_config_missing_or_damaged_is_one_line_naming_the_file(tmp_path, text, message):
  if text is not None:
    (tmp_path / 'config.json').write_text(text)
  with pytest.raises(workdir_lib.WorkdirConfigError) as info:
    workdir_lib.read_config(tmp_path)
  assert isinstance(info.value, ValueError)
  assert str(info.value).startswith(f'{tmp_path}/{message}'), info.value
  assert '\n' not in str(info.value)
