"""kill -9 at any instant, remote-style workdirs (everything through epath)."""

import builtins
import glob
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from diffusion_jax import checkpoint as ckpt
from diffusion_jax import data as data_lib
from diffusion_jax import images as image_lib
from diffusion_jax import metric_writers
from diffusion_jax import train
from diffusion_jax import workdir as workdir_lib
from test_train import TINY, tiny_config

PACKAGE_DIR = os.path.dirname(os.path.abspath(train.__file__))


# --- nothing but epath touches the workdir ---------------------------------------------------

_AUDITED = {builtins: ('open',), os: ('makedirs', 'mkdir', 'replace', 'rename', 'remove',
                                      'listdir', 'scandir', 'walk'),
            os.path: ('abspath', 'exists', 'isdir', 'isfile', 'join', 'expanduser')}


def _audit(monkeypatch, workdir: str) -> list:
  """Records calls of open / os.* / os.path.* made from diffusion_jax code on a path in workdir."""
  calls = []

  def wrap(module, name):
    original = getattr(module, name)

    def audited(*args, **kwargs):
      caller = sys._getframe(1).f_code.co_filename  # pylint: disable=protected-access
      if caller.startswith(PACKAGE_DIR) and any(workdir in str(a) for a in args):
        calls.append(f'{name}{args} from {os.path.relpath(caller, PACKAGE_DIR)}')
      return original(*args, **kwargs)

    monkeypatch.setattr(module, name, audited)

  for module, names in _AUDITED.items():
    for name in names:
      wrap(module, name)
  return calls


def test_training_touches_the_workdir_only_through_epath(tmp_path, monkeypatch):
  workdir = str(tmp_path / 'run')
  config = tiny_config(**{'training.num_train_steps': 2, 'training.checkpoint_every_steps': 2,
                          'training.log_every_steps': 1, 'training.sample_every_steps': 2})
  calls = _audit(monkeypatch, workdir)
  train.train_and_evaluate(config, workdir)
  assert calls == []
  assert sorted(os.listdir(workdir)) == ['checkpoints', 'config.json', 'samples', 'tensorboard']
  assert os.listdir(os.path.join(workdir, 'samples')) == ['samples_00000002.png']
  # The audit does see such calls: data.list_image_files uses os.path on its folder.
  with pytest.raises(data_lib.DatasetNotFoundError):
    data_lib.list_image_files(workdir + '/samples/none')
  assert any(c.startswith('isdir(') and c.endswith('from data/sources.py') for c in calls), calls


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs://bucket/... resolved by epath to tmp_path/bucket/... (no network): a stand-in for GCS."""
  from etils.epath import gpath
  from etils.epath import testing as epath_testing
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)

  def local(path):
    path = os.fspath(path)
    if path.startswith(str(tmp_path)):   # the backend calling itself on a mapped path
      return path
    assert path.startswith('gs://'), path   # every call made on the workdir is a gs:// one
    return str(tmp_path / path[len('gs://'):])

  def redirect(fn, path, *args, **kwargs):
    return fn(local(path), *args, **kwargs)

  def redirect2(fn, path, dst, *args, **kwargs):
    return fn(local(path), local(dst), *args, **kwargs)

  with epath_testing.mock_epath(open=redirect, exists=redirect, isdir=redirect, mkdir=redirect,
                                makedirs=redirect, listdir=redirect, stat=redirect,
                                replace=redirect2, rename=redirect2, glob=redirect,
                                remove=redirect):
    yield tmp_path / 'bucket'


def test_gs_workdir_config_samples_and_tensorboard_go_through_epath(fake_gcs):
  """A gs:// workdir: config.json, PNG grids and TensorBoard events are written through epath."""
  workdir = workdir_lib.prepare('gs://bucket/run', '{"seed": 0}')
  assert str(workdir) == 'gs://bucket/run'
  assert (fake_gcs / 'run' / 'config.json').read_text() == '{"seed": 0}'
  image_lib.save_grid(np.zeros((4, 8, 8, 1)), workdir / 'samples' / 'grid.png')
  assert (fake_gcs / 'run' / 'samples' / 'grid.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  writer = metric_writers.MetricWriter(workdir / 'tensorboard')
  writer.write(1, {'loss': 0.5})
  sizes = [os.path.getsize(p) for p in glob.glob(str(fake_gcs / 'run' / 'tensorboard' / 'events.*'))]
  writer.write(2, {'loss': 0.25})
  writer.close()
  events = glob.glob(str(fake_gcs / 'run' / 'tensorboard' / 'events.*'))
  assert len(sizes) == len(events) == 1 and os.path.getsize(events[0]) > sizes[0] > 0
  assert not os.path.exists('gs:')   # no local folder named after the scheme


# --- kill -9 --------------------------------------------------------------------------------

KILL_STEPS = 40
KILL_FLAGS = [f'--default_config.{k}={v}'.replace(' ', '') for k, v in TINY.items()] + [
    f'--default_config.training.num_train_steps={KILL_STEPS}',
    '--default_config.training.checkpoint_every_steps=4',
    '--default_config.training.log_every_steps=4',
    '--default_config.training.sample_every_steps=1000',
    '--default_config.model.dropout=0.1',
    # One CPU device, as in this pytest process, which restores the checkpoints to compare
    # them (the CLI's default splits the CPU into one device per core: diffusion_jax/host.py).
    '--default_config.training.cpu_devices=1']


def _start(workdir, cache_dir):
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  return subprocess.Popen([sys.executable, '-m', 'diffusion_jax.main', f'--workdir={workdir}',
                           *KILL_FLAGS], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env)


def _saving(workdir) -> bool:
  """Whether orbax is writing a checkpoint now (its temporary folder exists)."""
  try:
    return any('tmp' in name for name in os.listdir(os.path.join(workdir, 'checkpoints')))
  except FileNotFoundError:
    return False


def _training(workdir) -> bool:
  return bool(glob.glob(os.path.join(workdir, 'tensorboard', 'events.*')))


def _kill_at(proc, workdir, *, in_save: bool, rng: random.Random):
  """SIGKILLs ``proc`` inside a save window or at a random moment of training.

  Returns:
    (killed, whether a checkpoint was being written at that instant).
  """
  deadline = time.time() + 1200
  ready = (lambda: _saving(workdir)) if in_save else (lambda: _training(workdir))
  while not ready() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.001)
  time.sleep(rng.uniform(0.0, 0.01) if in_save else rng.uniform(0.0, 2.0))
  if proc.poll() is not None:
    return False, False
  saving = _saving(workdir)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  return True, saving


def _all_checkpoints(workdir) -> dict:
  """{step: restored items} of every checkpoint on disk (raises if one is unreadable)."""
  with ckpt.create_manager(str(workdir), read_only=True) as manager:
    return {step: jax.device_get(dict(manager.restore(step))) for step in manager.all_steps()}


@pytest.mark.slow
def test_kill_9_at_random_moments_then_rerun_equals_an_uninterrupted_run(tmp_path):
  cache = tmp_path / 'jax_cache'
  reference = _start(tmp_path / 'ref', cache)
  out, _ = reference.communicate(timeout=1800)
  assert reference.returncode == 0, out
  workdir = tmp_path / 'killed'
  rng = random.Random(11)
  killed, in_save, outputs = 0, 0, []
  for attempt in range(6):
    proc = _start(workdir, cache)
    was_killed, saving = _kill_at(proc, workdir, in_save=attempt % 2 == 0, rng=rng)
    if was_killed:
      killed += 1
      in_save += saving
    else:
      outputs.append(proc.communicate()[0])
    outputs.append(f'--- killed run {attempt}')
    _all_checkpoints(workdir)   # every checkpoint left on disk is readable
  final = _start(workdir, cache)
  out, _ = final.communicate(timeout=1800)
  assert final.returncode == 0, out
  assert killed >= 4 and in_save >= 1, (killed, in_save)
  assert 'damaged' not in out + ''.join(outputs)
  assert not os.path.exists(workdir / 'checkpoints' / 'damaged')
  ours, theirs = _all_checkpoints(workdir), _all_checkpoints(tmp_path / 'ref')
  assert max(ours) == max(theirs) == KILL_STEPS
  a, b = ours[KILL_STEPS], theirs[KILL_STEPS]
  assert a['data'] == b['data'] == {'next_index': KILL_STEPS}
  leaves_a, leaves_b = jax.tree.leaves(a['state']), jax.tree.leaves(b['state'])
  assert len(leaves_a) == len(leaves_b) > 100   # params, EMA, Adam moments, step, RNG
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=0)


# --- an error after a save ------------------------------------------------------------------

_FAIL_AFTER_SAVE = """
import sys
from diffusion_jax import train
from test_train import tiny_config

def broken_sampler(*args, **kwargs):
  raise RuntimeError('sampling failed on purpose')

train.save_sample_grid = broken_sampler
config = tiny_config(**{'training.num_train_steps': 4, 'training.checkpoint_every_steps': 2,
                        'training.log_every_steps': 2, 'training.sample_every_steps': 2})
train.train_and_evaluate(config, sys.argv[1])
"""


@pytest.mark.slow
def test_an_error_right_after_a_save_still_completes_that_checkpoint(tmp_path):
  """The loop raises while the asynchronous save of step 2 is in flight; the process exits
  with the error, and checkpoint 2 is complete and readable (not cut off at interpreter exit)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get('PYTHONPATH', '')]))
  proc = subprocess.run([sys.executable, '-c', _FAIL_AFTER_SAVE, str(tmp_path)], env=env,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
  assert proc.returncode == 1 and 'sampling failed on purpose' in proc.stdout, proc.stdout
  assert 'Event loop is closed' not in proc.stdout and 'interpreter shutdown' not in proc.stdout
  restored = _all_checkpoints(tmp_path)
  assert list(restored) == [2]
  assert restored[2]['data'] == {'next_index': 2}
  assert int(restored[2]['state']['step']) == 2
