"""Damaged checkpoints: one line per damaged step, fall back to the next older one, never delete."""

import os
import shutil

import chex
import jax
import numpy as np
import pytest

from diffusion_jax import checkpoint as ckpt
from diffusion_jax import train
from test_train import tiny_config


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """A workdir with checkpoints at steps 2 and 4 of a tiny model (no training: distinct states)."""
  _, _, _, _, state = train.setup(tiny_config())
  workdir = tmp_path_factory.mktemp('pristine') / 'run'
  states = {}
  with ckpt.create_manager(str(workdir)) as manager:
    for step in (2, 4):
      states[step] = state.replace(
          step=jax.numpy.asarray(step, jax.numpy.int32),
          params=jax.tree.map(lambda x, s=step: x + s, state.params))
      ckpt.save(manager, step, states[step], {'next_index': step})
    manager.wait_until_finished()
  return workdir, state, jax.device_get(states)


def _copy(saved, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(saved[0], workdir)
  return workdir


def _files(step_dir, pattern):
  return sorted(step_dir.glob(pattern), key=lambda p: -p.stat().st_size)


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(path.stat().st_size // 2)


DAMAGE = {
    'truncated array file': lambda d: _truncate(_files(d, 'state/ocdbt.process_0/d/*')[0]),
    'missing array file': lambda d: _files(d, 'state/ocdbt.process_0/d/*')[0].unlink(),
    'truncated OCDBT manifest': lambda d: _truncate(d / 'state' / 'manifest.ocdbt'),
    'bad tree metadata': lambda d: (d / 'state' / '_METADATA').write_text('{"tree": '),
    'bad data position': lambda d: (d / 'data' / 'metadata').write_text('{not json'),
    'missing state item': lambda d: shutil.rmtree(d / 'state'),
}


@pytest.mark.parametrize('damage', list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_and_is_moved_aside(saved, tmp_path, damage):
  workdir = _copy(saved, tmp_path)
  DAMAGE[damage](workdir / 'checkpoints' / '4')
  lines = []
  with ckpt.create_manager(str(workdir)) as manager:
    step, state, data_state = ckpt.restore_latest(manager, saved[1], say=lines.append)
    assert manager.all_steps() == [2]   # the damaged folder does not confuse orbax
  assert step == 2 and data_state == {'next_index': 2}
  chex.assert_trees_all_equal(jax.device_get(state.params), saved[2][2].params)
  assert len(lines) == 2 and '\n' not in ''.join(lines), lines
  assert lines[0].startswith('warning: checkpoint step 4 is damaged (')
  assert lines[0].endswith(f'moved to {workdir}/checkpoints/damaged/4.')
  assert lines[1] == 'Falling back to checkpoint step 2 (newer steps [4] are damaged).'
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', 'damaged']
  assert os.listdir(workdir / 'checkpoints' / 'damaged') == ['4']   # kept, not deleted


def test_no_readable_checkpoint_is_one_line(saved, tmp_path):
  workdir = _copy(saved, tmp_path)
  for step in ('2', '4'):
    DAMAGE['truncated array file'](workdir / 'checkpoints' / step)
  with ckpt.create_manager(str(workdir)) as manager:
    with pytest.raises(ckpt.NoCheckpointError) as info:
      ckpt.restore_latest(manager, saved[1], say=lambda line: None)
  assert str(info.value) == (
      f'no readable checkpoint in {workdir}/checkpoints: steps [4, 2] are damaged; they were '
      f'moved to {workdir}/checkpoints/damaged and the next run starts from step 0.')
  assert sorted(os.listdir(workdir / 'checkpoints' / 'damaged')) == ['2', '4']


def test_sampling_falls_back_without_moving_anything(saved, tmp_path):
  workdir = _copy(saved, tmp_path)
  DAMAGE['truncated array file'](workdir / 'checkpoints' / '4')
  step, state = ckpt.restore_params(str(workdir), saved[1])
  assert step == 2 and int(state.step) == 2
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']


def test_sampling_without_checkpoint_creates_nothing(tmp_path):
  with pytest.raises(ckpt.NoCheckpointError, match='no checkpoint in'):
    ckpt.restore_params(str(tmp_path / 'run'), None)
  assert ckpt.latest_step(str(tmp_path / 'run')) is None
  assert not (tmp_path / 'run').exists()


def test_checkpoint_of_another_model_is_not_called_damaged(saved, tmp_path):
  workdir = _copy(saved, tmp_path)
  _, _, _, _, wider = train.setup(tiny_config(**{'model.ch': 64}))
  with ckpt.create_manager(str(workdir)) as manager:
    with pytest.raises(ckpt.CheckpointMismatchError, match='another model/optimiser config') as info:
      ckpt.restore_latest(manager, wider)
  assert str(info.value).endswith(f"Drop --config so that the workdir's own config "
                                  f'({workdir}/config.json) is used, or pass a new --workdir.')
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']   # nothing moved


@pytest.mark.slow
def test_training_resumes_past_a_damaged_checkpoint_and_matches(tmp_path, capsys):
  """A truncated newest checkpoint: the rerun resumes from the older one and ends equal."""
  config = tiny_config(**{'training.num_train_steps': 4, 'training.checkpoint_every_steps': 2,
                          'training.log_every_steps': 2, 'training.sample_every_steps': 100})
  straight = jax.device_get(train.train_and_evaluate(config, str(tmp_path / 'run')))
  DAMAGE['truncated array file'](tmp_path / 'run' / 'checkpoints' / '4')
  config.training.num_train_steps = 4
  resumed = jax.device_get(train.train_and_evaluate(config, str(tmp_path / 'run')))
  out = capsys.readouterr().out
  assert 'warning: checkpoint step 4 is damaged (' in out
  assert f'Resuming from checkpoint {tmp_path}/run/checkpoints/2 (step 2 of 4).' in out
  assert int(resumed.step) == 4
  for name in ('params', 'ema_params', 'opt_state', 'rng'):
    jax.tree.map(np.testing.assert_array_equal, getattr(resumed, name), getattr(straight, name))
  assert sorted(os.listdir(tmp_path / 'run' / 'checkpoints')) == ['2', '4', 'damaged']
