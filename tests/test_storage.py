"""A full disk: one line and exit code 1, nothing half-written left behind, the rerun resumes.

The disk is filled by monkeypatching: orbax's array writes fail in the
background on the third save (as tensorstore reports ENOSPC), and epath's
file writes fail once a byte budget is spent. A real tmpfs run (root only)
is the slow test at the end.
"""

import errno
import functools
import os
import re
import shutil
import struct
import subprocess
import sys

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboardX.proto import event_pb2

from diffusion_jax import checkpoint as ckpt
from diffusion_jax import images as image_lib
from diffusion_jax import main as main_lib
from diffusion_jax import metric_writers
from diffusion_jax import models
from diffusion_jax import storage
from diffusion_jax import train
from diffusion_jax import workdir as workdir_lib
from diffusion_jax.evaluation import runtime as rt
from test_train import TINY, tiny_config

TENSORSTORE_ENOSPC = ('RESOURCE_EXHAUSTED: Error writing "params.conv_in.kernel/0" in OCDBT '
                      'database at local file "/x/3.orbax-checkpoint-tmp/state/": Failed to write '
                      "2644945 bytes to file 7: No space left on device [os_error_code='28']")


# --- what counts as a full disk ---------------------------------------------------------------


def test_out_of_space_is_enospc_quota_or_tensorstore_write_not_out_of_memory():
  assert storage.is_out_of_space(OSError(errno.ENOSPC, 'No space left on device'))
  assert storage.is_out_of_space(OSError(errno.EDQUOT, 'Disk quota exceeded'))
  assert storage.is_out_of_space(ValueError(TENSORSTORE_ENOSPC))
  try:   # found through the chain of causes
    try:
      raise OSError(errno.ENOSPC, 'full')
    except OSError as e:
      raise RuntimeError('save failed') from e
  except RuntimeError as e:
    assert storage.is_out_of_space(e)
  assert not storage.is_out_of_space(OSError(errno.EACCES, 'Permission denied'))
  assert not storage.is_out_of_space(
      ValueError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB'))
  assert not storage.is_out_of_space(None)


# --- files: PNG, JSON, config.json, TensorBoard -------------------------------------------------


@pytest.fixture
def disk(monkeypatch):
  """Local epath writes share a byte budget (unlimited until set); past it they write what fits
  and raise ENOSPC, as a full disk does."""
  budget = {'left': None}
  path_type = type(epath.Path('/'))
  original = path_type.open

  class FullDiskFile:
    def __init__(self, f):
      self._f = f

    def write(self, data):
      left = budget['left']
      if left is not None and len(data) > left:
        self._f.write(data[:left])
        budget['left'] = 0
        raise OSError(errno.ENOSPC, 'No space left on device')
      if left is not None:
        budget['left'] = left - len(data)
      return self._f.write(data)

    def __getattr__(self, name):
      return getattr(self._f, name)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self._f.close()

  def open_(self, mode='r', **kwargs):
    f = original(self, mode, **kwargs)
    return FullDiskFile(f) if ('w' in mode or 'a' in mode) else f

  monkeypatch.setattr(path_type, 'open', open_)
  return budget


def _leftovers(folder) -> list:
  return sorted(p for p in os.listdir(folder) if 'tmp' in p)


def test_full_disk_during_a_png_keeps_the_old_grid_and_names_the_file(tmp_path, disk):
  path = tmp_path / 'samples' / 'grid.png'
  image_lib.save_grid(np.zeros((4, 8, 8, 1)), path)
  before = path.read_bytes()
  disk['left'] = 100
  with pytest.raises(storage.StorageFullError) as e:
    image_lib.save_grid(np.ones((4, 8, 8, 1)), path)
  message = str(e.value)
  assert message.startswith(f'no space left while writing {path} (about 0.0 MiB needed, ')
  assert message.endswith('nothing partial is left under that name; free space and rerun the '
                          'same command.') and '\n' not in message
  assert path.read_bytes() == before and _leftovers(path.parent) == []


def test_full_disk_during_json_and_npz_outputs_leaves_no_file(tmp_path, disk):
  disk['left'] = 10
  for write, name in ((lambda p: rt.write_json(p, {'bpd': 3.25}), 'bpd.json'),
                      (lambda p: rt.save_npz(p, images=np.zeros((8, 4, 4, 1), np.uint8)),
                       'samples.npz')):
    with pytest.raises(storage.StorageFullError, match=f'while writing {tmp_path}/eval/{name} '):
      write(str(tmp_path / 'eval' / name))
    assert os.listdir(tmp_path / 'eval') == []


def test_full_disk_writing_config_json_is_one_line_and_exit_1(tmp_path, disk, capsys,
                                                              monkeypatch):
  workdir = tmp_path / 'run'
  prepare = workdir_lib.prepare

  def fill_then_prepare(*args):   # the claim (claim.json) fitted; config.json does not
    disk['left'] = 0
    return prepare(*args)

  monkeypatch.setattr(workdir_lib, 'prepare', fill_then_prepare)
  with pytest.raises(SystemExit) as e:
    main_lib.run(tiny_config(), 'train', str(workdir))
  err = capsys.readouterr().err
  assert e.value.code == 1
  assert err.count('\n') == 1 and err.startswith(
      f'error: no space left while writing {workdir}/config.json (about ')
  assert os.listdir(workdir) == []   # and the claim was released


def test_full_disk_outside_the_file_writer_is_one_line_too(tmp_path, monkeypatch, capsys):
  def full(config, workdir):
    raise OSError(errno.ENOSPC, 'No space left on device', f'{workdir}/eval')

  monkeypatch.setattr(main_lib, 'preflight', lambda *args: None)
  monkeypatch.setattr('diffusion_jax.evaluation.evaluate.evaluate', full)
  with pytest.raises(SystemExit) as e:
    main_lib.run(tiny_config(), 'eval', str(tmp_path))
  assert e.value.code == 1
  assert capsys.readouterr().err == (f'error: no space left while writing {tmp_path}/eval (No '
                                     'space left on device); free space and rerun the same '
                                     'command.\n')


def _records(path) -> list:
  """The events of a TFRecord file, checking every length and CRC (ValueError if partial)."""
  data, events = path.read_bytes(), []
  while data:
    if len(data) < 12:
      raise ValueError('partial record header')
    (n,) = struct.unpack('<Q', data[:8])
    if struct.unpack('<I', data[8:12])[0] != metric_writers.masked_crc32c(data[:8]):
      raise ValueError('bad length CRC')
    body, crc = data[12:12 + n], data[12 + n:16 + n]
    if len(crc) < 4 or struct.unpack('<I', crc)[0] != metric_writers.masked_crc32c(body):
      raise ValueError('partial record')
    events.append(event_pb2.Event.FromString(body))
    data = data[16 + n:]
  return events


def test_full_disk_during_tensorboard_write_cuts_the_events_file_back(tmp_path, disk):
  writer = metric_writers.MetricWriter(tmp_path / 'tb')
  writer.write(1, {'loss': 0.5, 'mse': 0.25})
  (path,) = [tmp_path / 'tb' / p for p in os.listdir(tmp_path / 'tb')]
  disk['left'] = 20   # the next record (~60 bytes) only partly fits
  with pytest.raises(storage.StorageFullError, match=f'while writing {path} '):
    writer.write(2, {'loss': 0.4, 'mse': 0.2})
  events = _records(path)   # raises on a partial record
  assert events[0].file_version == 'brain.Event:2'
  assert [(e.step, [(v.tag, v.simple_value) for v in e.summary.value]) for e in events[1:]] == [
      (1, [('loss', 0.5), ('mse', 0.25)])]
  disk['left'] = None   # space freed: the writer goes on
  writer.write(3, {'loss': 0.3, 'mse': 0.125})
  assert [e.step for e in _records(path)[1:]] == [1, 3]


# --- checkpoints ---------------------------------------------------------------------------------


class _FailingFuture:
  """Waits for the real writes, then fails as tensorstore does on a full disk."""

  def __init__(self, futures):
    self._futures = futures or []

  def result(self, timeout=None):
    for f in self._futures:
      f.result(timeout=timeout)
    raise ValueError(TENSORSTORE_ENOSPC)


@pytest.fixture
def full_on_third_save(monkeypatch):
  monkeypatch.setattr(ckpt, '_handlers', _third_save_fails())


def test_saver_full_disk_removes_the_partial_save_and_names_the_intact_one(
    tmp_path, full_on_third_save):
  state = {'w': np.arange(64 * 1024, dtype=np.float32), 'b': np.ones((3, 5), np.int32)}
  saver = ckpt.Saver(ckpt.create_manager(str(tmp_path / 'run')))
  for step in (2, 4, 6):
    saver.save(step, {**state, 'b': state['b'] * step}, {'next_index': step})
  with pytest.raises(storage.StorageFullError) as e:
    saver.close()
  directory = tmp_path / 'run' / 'checkpoints'
  assert str(e.value).startswith(f'no space left in {tmp_path}/run while saving checkpoint 6 '
                                 '(about 0.3 MiB needed, ')
  assert str(e.value).endswith('; checkpoint 4 is intact; free space and rerun the same command.')
  assert sorted(os.listdir(directory)) == ['2', '4']   # no 6.orbax-checkpoint-tmp
  saver.close()   # after the error: nothing more to report
  step, restored = ckpt.restore_params(str(tmp_path / 'run'), state)
  assert step == 4
  np.testing.assert_array_equal(restored['b'], state['b'] * 4)
  np.testing.assert_array_equal(restored['w'], state['w'])


def test_low_space_warning_says_the_free_space_and_not_for_a_bucket(tmp_path):
  free = storage.free_bytes(tmp_path)
  assert free > 0 and storage.low_space_warning(tmp_path, 1) is None
  line = storage.low_space_warning(tmp_path, free + 2**30)
  assert line.startswith(f'warning: {storage.mib(free)[:-5]}') and '\n' not in line
  assert f'free in {tmp_path}, less than one checkpoint (about ' in line
  assert storage.free_bytes('gs://bucket/run') is None
  assert storage.low_space_warning('gs://bucket/run', 2**60) is None


def _visible_lines(text: str) -> list:
  """What a terminal shows: each line's last carriage-return segment, progress bars dropped."""
  lines = [line.split('\r')[-1] for line in text.split('\n')]
  return [line for line in lines if line.strip() and 'step/s' not in line and '/it]' not in line
          and 's/step' not in line]


@pytest.mark.slow   # three short training runs: ~1 minute on 2 cores
def test_full_disk_on_third_save_one_line_then_rerun_resumes_and_equals_uninterrupted(
    tmp_path, monkeypatch, capfd):
  config = tiny_config(**{'training.num_train_steps': 8, 'training.checkpoint_every_steps': 2,
                          'training.log_every_steps': 2, 'training.sample_every_steps': 100})
  straight = jax.device_get(train.train_and_evaluate(config, str(tmp_path / 'straight')))
  capfd.readouterr()
  workdir = tmp_path / 'run'
  with monkeypatch.context() as m:
    m.setattr(ckpt, '_handlers', _third_save_fails())
    with pytest.raises(SystemExit) as e:
      main_lib.run(config, 'train', str(workdir))
  out, err = capfd.readouterr()
  assert e.value.code == 1
  lines = _visible_lines(err)
  assert len(lines) == 1 and lines[0].startswith(
      f'error: no space left in {workdir} while saving checkpoint 6 (about '), (out, err)
  assert lines[0].endswith('; checkpoint 4 is intact; free space and rerun the same command.')
  assert 'Traceback' not in out + err and 'Event loop' not in out + err
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  resumed = jax.device_get(train.train_and_evaluate(config, str(workdir)))
  assert 'Resuming from checkpoint' in capfd.readouterr().out
  assert int(resumed.step) == 8
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)


def _third_save_fails():
  """A ``checkpoint._handlers``: the array writes fail in the background from the third save on."""

  def handlers():
    handler = ocp.StandardCheckpointHandler()
    real_save, saves = handler.async_save, []

    async def async_save(*args, **kwargs):
      futures = await real_save(*args, **kwargs)
      saves.append(1)
      return [_FailingFuture(futures)] if len(saves) >= 3 else futures

    handler.async_save = async_save
    return {'state': handler, 'data': ocp.JsonCheckpointHandler()}

  return handlers


# --- a real full disk: a small tmpfs (root only) ------------------------------------------------


def _tmpfs(path, size_bytes: int) -> bool:
  """Mounts a tmpfs of ``size_bytes`` at ``path``; False where this is not allowed (not root)."""
  if not hasattr(os, 'geteuid') or os.geteuid() != 0 or not shutil.which('mount'):
    return False
  path.mkdir()
  return subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size_bytes}', 'tmpfs', str(path)],
                        capture_output=True, check=False).returncode == 0


def _cli(workdir, *flags):
  args = [f'--default_config.{k}={v}'.replace(' ', '') for k, v in TINY.items()]
  return subprocess.run([sys.executable, '-m', 'diffusion_jax.main', f'--workdir={workdir}', *args,
                         *flags], capture_output=True, text=True, timeout=1800, check=False,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))


@pytest.mark.slow   # two CLI runs; needs root to mount a tmpfs (skipped otherwise)
def test_real_full_tmpfs_is_one_line_leaves_nothing_and_the_rerun_with_room_finishes(tmp_path):
  config = tiny_config()
  state = jax.eval_shape(functools.partial(train.create_train_state, config,
                                           models.create_model(config),
                                           train.create_optimizer(config)),
                         jax.random.PRNGKey(0))
  # Room for about two and a half checkpoints (orbax's files can be smaller than the arrays).
  size = (int(2.5 * ckpt.state_bytes(state)) // 4096 + 64) * 4096
  mount = tmp_path / 'small'
  if not _tmpfs(mount, size):
    pytest.skip('cannot mount a tmpfs here (needs root)')
  flags = ['--default_config.training.num_train_steps=8',
           '--default_config.training.checkpoint_every_steps=2',
           '--default_config.training.sample_every_steps=100',
           '--default_config.training.cpu_devices=1']
  try:
    full = _cli(mount / 'run', *flags)
    assert full.returncode == 1, full.stderr[-3000:]
    lines = _visible_lines(full.stderr)
    assert len(lines) == 1, full.stderr[-3000:]
    found = re.fullmatch(rf'error: no space left in {re.escape(str(mount))}/run while saving '
                         r'checkpoint (\d+) \(about 10\.7 MiB needed, [\d.]+ MiB free\); '
                         r'checkpoint (\d+) is intact; free space and rerun the same command\.',
                         lines[0])
    assert found, lines
    failed, intact = int(found.group(1)), int(found.group(2))
    assert failed - 2 == intact >= 2
    assert 'Traceback' not in full.stdout + full.stderr
    left = os.listdir(mount / 'run' / 'checkpoints')
    assert all(p.isdigit() for p in left) and max(map(int, left)) == intact, left   # no tmp folder
    shutil.copytree(mount / 'run', tmp_path / 'room')
  finally:
    subprocess.run(['umount', str(mount)], check=False)
  rerun = _cli(tmp_path / 'room', *flags)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f'(step {intact} of 8)' in rerun.stdout and 'damaged' not in rerun.stdout
  assert '8' in os.listdir(tmp_path / 'room' / 'checkpoints')
