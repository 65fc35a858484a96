"""One writer per workdir (diffusion_jax/claim.py): the claim file, its expiry, and the CLI."""

import dataclasses
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
from jax.experimental import multihost_utils
import numpy as np
import pytest

from diffusion_jax import checkpoint as ckpt
from diffusion_jax import claim
from diffusion_jax import config_lib
from diffusion_jax import main
from diffusion_jax import storage
from diffusion_jax import train
from diffusion_jax import workdir as workdir_lib
from test_reliability import fake_gcs  # noqa: F401  (a fixture: gs:// through epath, no network)
from test_train import tiny_config

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TIMEOUT = 600.0


def _dead_pid() -> int:
  """The pid of a process of this host that has exited (and been reaped)."""
  proc = subprocess.Popen([sys.executable, '-c', 'pass'])
  proc.wait()
  return proc.pid


def _holder(**fields) -> claim.Holder:
  """A claim of this host and process renewed now, with ``fields`` replaced."""
  return dataclasses.replace(claim.me(command='python -m diffusion_jax.main --workdir x'),
                             **fields)


def _write(workdir, holder: claim.Holder) -> bytes:
  os.makedirs(workdir, exist_ok=True)
  data = claim.to_json(holder)
  with open(os.path.join(workdir, claim.CLAIM_FILE), 'wb') as f:
    f.write(data)
  return data


def _read(workdir) -> claim.Holder:
  with open(os.path.join(workdir, claim.CLAIM_FILE), 'rb') as f:
    return claim.from_json(f.read())


def _file_bytes(workdir) -> bytes:
  with open(os.path.join(workdir, claim.CLAIM_FILE), 'rb') as f:
    return f.read()


# --- acquire, renew, release -----------------------------------------------------------------


def test_acquire_writes_who_holds_it_and_release_removes_it(tmp_path):
  workdir = tmp_path / 'new' / 'run'   # created by the claim
  before = time.time()
  held = claim.acquire(str(workdir), TIMEOUT, command='python -m diffusion_jax.main')
  assert os.listdir(workdir) == ['claim.json']   # no temporary file left
  fields = json.loads(_file_bytes(workdir))
  assert fields['host'] == socket.gethostname() and fields['pid'] == os.getpid()
  assert before <= fields['started'] == fields['renewed'] <= time.time()
  assert fields['command'] == 'python -m diffusion_jax.main'
  assert fields['token'] == held.holder.token and len(fields['token']) == 32
  assert fields['started_utc'] == claim.utc(fields['started'])
  if os.path.exists('/proc/self/stat'):   # Linux: pid reuse and reboots can be told apart
    assert fields['pid_start'] > 0 and fields['boot_id'] and fields['pid_ns'].startswith('pid:')
  assert held.release() is True
  assert os.listdir(workdir) == []
  claim.acquire(str(workdir), TIMEOUT).release()   # free again


def test_a_live_claim_refuses_a_second_writer_in_one_line_naming_it(tmp_path):
  held = claim.acquire(str(tmp_path), TIMEOUT, command='python -m diffusion_jax.main\n --x=1')
  before = _file_bytes(tmp_path)
  with pytest.raises(claim.ClaimHeldError) as e:
    claim.acquire(str(tmp_path), TIMEOUT)
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith(f'--workdir {tmp_path} is in use by another run: host '
                            f'{socket.gethostname()}, pid {os.getpid()}, since '
                            f'{claim.utc(held.holder.started)} (it runs on this host; '
                            'command: python -m diffusion_jax.main --x=1). Wait for it')
  assert 'stop that process, or use another --workdir' in message
  assert isinstance(e.value, workdir_lib.WorkdirError)   # main: exit code 2
  assert _file_bytes(tmp_path) == before and os.listdir(tmp_path) == ['claim.json']


def test_without_hard_links_the_claim_is_created_exclusively(tmp_path, monkeypatch):
  def no_links(src, dst):
    raise PermissionError(1, 'Operation not permitted')   # gcsfuse, some network file systems

  monkeypatch.setattr(os, 'link', no_links)
  held = claim.acquire(str(tmp_path), TIMEOUT)
  assert _read(tmp_path) == held.holder and os.listdir(tmp_path) == ['claim.json']
  with pytest.raises(claim.ClaimHeldError, match='is in use by another run'):
    claim.acquire(str(tmp_path), TIMEOUT)
  assert held.release() and os.listdir(tmp_path) == []


def test_renew_rewrites_only_the_renewal_time(tmp_path):
  held = claim.acquire(str(tmp_path), TIMEOUT)
  first = _read(tmp_path)
  assert held.renew(now=first.renewed + 42.5) is True
  renewed = _read(tmp_path)
  assert renewed == dataclasses.replace(first, renewed=first.renewed + 42.5)
  assert json.loads(_file_bytes(tmp_path))['renewed_utc'] == claim.utc(first.renewed + 42.5)
  assert os.listdir(tmp_path) == ['claim.json']


def test_release_and_renew_never_touch_another_runs_claim(tmp_path):
  held = claim.acquire(str(tmp_path), TIMEOUT)
  theirs = _write(tmp_path, _holder(host='other-host', pid=77, token='f' * 32))
  assert held.release() is False
  assert held.renew() is False and held.lost
  assert _file_bytes(tmp_path) == theirs


@pytest.mark.parametrize('make_error', [lambda: RuntimeError('boom'), KeyboardInterrupt,
                                        lambda: SystemExit(2)])
def test_hold_releases_on_any_exit_it_sees(tmp_path, make_error):
  error = make_error()
  with pytest.raises(type(error)):
    with claim.hold(str(tmp_path), TIMEOUT) as held:
      assert held.is_ours()
      raise error
  assert os.listdir(tmp_path) == []


# --- dead claims expire ----------------------------------------------------------------------


def test_a_dead_local_pid_is_taken_over_at_once_with_one_line(tmp_path):
  pid = _dead_pid()
  stale = _holder(pid=pid, pid_start=None, started=time.time() - 5, renewed=time.time())
  _write(tmp_path, stale)
  said = []
  held = claim.acquire(str(tmp_path), TIMEOUT, say=said.append)   # no waiting for a timeout
  assert said == [f'Taking over the claim of host {stale.host}, pid {pid} (since '
                  f'{claim.utc(stale.started)}) on {tmp_path}: pid {pid} on this host '
                  f'({stale.host}) is no longer running.']
  assert _read(tmp_path).token == held.holder.token
  assert sorted(os.listdir(tmp_path)) == ['claim.json']   # the old claim is not kept aside


def test_a_reused_pid_a_reboot_and_a_zombie_count_as_dead():
  here = claim.me(command='')
  assert claim.assess(here, timeout_s=TIMEOUT, here=here)[0]   # this very process: live
  if here.pid_start is None:
    pytest.skip('no /proc: pid reuse, reboots and zombies are not told apart here')
  reused = dataclasses.replace(here, pid_start=here.pid_start + 1)
  assert claim.assess(reused, timeout_s=TIMEOUT, here=here) == (
      False, f'pid {here.pid} on this host ({here.host}) is no longer running')
  rebooted = dataclasses.replace(here, boot_id='another-boot')
  assert claim.assess(rebooted, timeout_s=TIMEOUT, here=here)[0] is False
  child = subprocess.Popen([sys.executable, '-c', 'pass'])
  try:
    deadline = time.time() + 60
    while claim._proc_stat(child.pid)[0] != 'Z' and time.time() < deadline:  # pylint: disable=protected-access
      time.sleep(0.01)
    os.kill(child.pid, 0)   # a zombie still has its pid
    zombie = dataclasses.replace(here, pid=child.pid, pid_start=None)
    assert claim.assess(zombie, timeout_s=TIMEOUT, here=here)[0] is False
  finally:
    child.wait()


def test_another_hosts_claim_is_honoured_until_claim_timeout_s(tmp_path):
  now = time.time()
  theirs = _holder(host='tpu-vm-7', pid=4242, started=now - 3600, renewed=now - 100)
  data = _write(tmp_path, theirs)
  with pytest.raises(claim.ClaimHeldError) as e:
    claim.acquire(str(tmp_path), 600, now=lambda: now)
  assert 'host tpu-vm-7, pid 4242' in str(e.value)
  assert '(another host; renewed 100 s ago;' in str(e.value)
  assert _file_bytes(tmp_path) == data
  said = []
  held = claim.acquire(str(tmp_path), 99, say=said.append, now=lambda: now)
  assert said == [f'Taking over the claim of host tpu-vm-7, pid 4242 (since '
                  f'{claim.utc(now - 3600)}) on {tmp_path}: it was last renewed 100 s ago, '
                  'more than training.claim_timeout_s=99.']
  assert _read(tmp_path).token == held.holder.token


def test_another_pid_namespace_is_another_host():
  """A container with this host's name cannot see the other's pids: only the timeout counts."""
  here = claim.me(command='')
  theirs = dataclasses.replace(here, pid=_dead_pid(), pid_ns='pid:[1]')
  assert claim.assess(theirs, timeout_s=TIMEOUT, here=here) == (
      True, 'another host; renewed 0 s ago')
  old = dataclasses.replace(theirs, renewed=theirs.renewed - TIMEOUT - 1)
  assert claim.assess(old, timeout_s=TIMEOUT, here=here)[0] is False


@pytest.mark.parametrize('data,reason', [
    (b'{"host": "a", "pid": 1, "started"', 'not JSON'),
    (b'[1, 2]', 'not a JSON object'),
    (b'', 'not JSON'),
    (b'{"host": "a", "pid": "12", "started": 1, "renewed": 1, "token": "t"}',
     "field 'pid' missing or not an integer"),
    (b'{"host": "a", "pid": 5, "started": 1, "renewed": 1, "token": "t", "command": 3}',
     "field 'command' missing or not a string"),
    (b'{"host": "a", "pid": 0, "started": 1, "renewed": 1, "token": "t"}', 'pid must be positive'),
    (b'{"host": "a", "pid": 5, "started": 1, "token": "t"}', "field 'renewed' missing"),
])
def test_a_damaged_claim_file_is_named_and_expires_by_its_age(tmp_path, data, reason):
  """Damaged: a run may still hold it (one line naming the file) until it is claim_timeout_s old."""
  with pytest.raises(claim.DamagedClaimError, match=reason):
    claim.from_json(data)
  path = tmp_path / claim.CLAIM_FILE
  path.write_bytes(data)
  with pytest.raises(claim.ClaimHeldError) as e:
    claim.acquire(str(tmp_path), TIMEOUT)
  message = str(e.value)
  assert message.startswith(f'{path} is damaged ({reason}') and '\n' not in message
  assert message.endswith(f'or delete it if no run writes to {tmp_path}.')
  assert path.read_bytes() == data
  old = time.time() - TIMEOUT - 60
  os.utime(path, (old, old))
  said = []
  held = claim.acquire(str(tmp_path), TIMEOUT, say=said.append)
  assert len(said) == 1 and said[0].startswith(f'Taking over the damaged claim file {path} on ')
  assert _read(tmp_path).token == held.holder.token


# --- the race: exactly one wins ----------------------------------------------------------------


def test_threads_racing_for_one_workdir_exactly_one_wins(tmp_path):
  for round_ in range(10):
    workdir = str(tmp_path / str(round_))
    barrier, results = threading.Barrier(8), []

    def race():
      barrier.wait()
      try:
        results.append(claim.acquire(workdir, TIMEOUT))
      except claim.ClaimHeldError as e:
        results.append(e)

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    winners = [r for r in results if isinstance(r, claim.Claim)]
    assert len(winners) == 1 and len(results) == 8, results
    assert _read(workdir).token == winners[0].holder.token
    assert os.listdir(workdir) == ['claim.json']


_RACER = """
import sys, time
from diffusion_jax import claim
workdir, start = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
try:
  held = claim.acquire(workdir, 600, say=lambda line: print('SAID', line, flush=True))
  print('WON', flush=True)
  time.sleep(3)   # alive while the others look at the claim
  held.release()
except claim.ClaimHeldError as e:
  print('HELD', e, flush=True)
"""


def _race(workdir, n=4) -> list:
  start = time.time() + 4   # after every interpreter has started
  procs = [subprocess.Popen([sys.executable, '-c', _RACER, str(workdir), str(start)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=REPO)) for _ in range(n)]
  return [(p.pid, p.communicate(timeout=120)[0]) for p in procs]


def test_processes_started_at_the_same_instant_exactly_one_wins(tmp_path):
  """Fresh workdir, then one whose claim is a dead process's: one winner each time."""
  fresh, stale = tmp_path / 'fresh', tmp_path / 'stale'
  _write(stale, _holder(pid=_dead_pid(), pid_start=None))
  for workdir in (fresh, stale):
    results = _race(workdir)
    won = [pid for pid, out in results if 'WON' in out]
    assert len(won) == 1, results
    for pid, out in results:
      if pid != won[0]:
        assert out.startswith(f'HELD --workdir {workdir} is in use by another run: host '
                              f'{socket.gethostname()}, pid {won[0]}, since '), results
    said = [out for _, out in results if 'SAID' in out]
    assert len(said) == (workdir == stale), results   # one takeover line, by the winner
    assert os.listdir(workdir) == []   # the winner released it


# --- renewal ---------------------------------------------------------------------------------


def test_the_claim_is_renewed_in_the_background_while_held(tmp_path):
  with claim.hold(str(tmp_path), 0.4) as held:   # renewed every 0.1 s
    assert held.renew_every_s() == pytest.approx(0.1)
    first = _read(tmp_path).renewed
    time.sleep(0.6)
    assert _read(tmp_path).renewed > first
    assert _read(tmp_path).started == held.holder.started
  assert os.listdir(tmp_path) == []
  assert claim.Claim(None, None, 600).renew_every_s() == claim.RENEW_EVERY_S


def test_a_claim_taken_over_is_no_longer_renewed_and_left_alone(tmp_path, capsys):
  with claim.hold(str(tmp_path), 0.4):
    theirs = _write(tmp_path, _holder(host='other-host', pid=9, token='e' * 32))
    time.sleep(0.5)
  assert _file_bytes(tmp_path) == theirs
  err = capsys.readouterr().err
  assert err == (f'warning: the claim {tmp_path}/claim.json was taken over by another run; this '
                 'run no longer renews it, and the two runs now write into the same workdir: '
                 'stop one of them.\n')


# --- several hosts: process 0 claims for all ---------------------------------------------------


@pytest.mark.parametrize('index,outcome', [(1, 1), (1, 0), (0, None)])
def test_on_several_hosts_process_0_claims_for_all(tmp_path, monkeypatch, index, outcome):
  told = []

  def broadcast(value):
    told.append(int(value))
    return np.int32(outcome if outcome is not None else value)

  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax, 'process_index', lambda: index)
  monkeypatch.setattr(multihost_utils, 'broadcast_one_to_all', broadcast)
  workdir = tmp_path / 'run'
  if index == 1 and outcome == 1:   # process 0 holds it: nothing to do here
    with claim.hold(str(workdir), TIMEOUT) as held:
      assert held is None
    assert not workdir.exists()
  elif index == 1:   # process 0 failed: this one stops too, writing nothing
    with pytest.raises(claim.ClaimHeldError, match=f'process 0 could not claim --workdir {workdir}'):
      with claim.hold(str(workdir), TIMEOUT):
        pass
    assert not workdir.exists()
  else:   # process 0 finds a live claim: it tells the others (0), then raises
    _write(workdir, _holder(host='other-host', pid=3))
    with pytest.raises(claim.ClaimHeldError, match='host other-host, pid 3'):
      with claim.hold(str(workdir), TIMEOUT):
        pass
  assert told == [1 if index == 1 else 0]


# --- gs://, a full disk, the config key ---------------------------------------------------------


def test_a_gs_workdir_is_claimed_through_epath(fake_gcs):  # noqa: F811
  held = claim.acquire('gs://bucket/run', TIMEOUT, settle_s=0)
  assert claim.from_json((fake_gcs / 'run' / 'claim.json').read_bytes()) == held.holder
  with pytest.raises(claim.ClaimHeldError, match='--workdir gs://bucket/run is in use'):
    claim.acquire('gs://bucket/run', TIMEOUT, settle_s=0)
  assert held.renew() and held.release()
  assert os.listdir(fake_gcs / 'run') == []


def test_a_full_disk_writing_the_claim_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
  path_type = type(workdir_lib.as_path(tmp_path))
  original = path_type.write_bytes

  def full(self, data):
    if self.name.startswith('.claim.json'):
      raise OSError(28, 'No space left on device')
    return original(self, data)

  monkeypatch.setattr(path_type, 'write_bytes', full)
  workdir = tmp_path / 'run'
  with pytest.raises(SystemExit) as e:
    main.run(tiny_config(), 'train', str(workdir))
  err = capsys.readouterr().err
  assert e.value.code == 1 and err.count('\n') == 1
  assert err.startswith(f'error: no space left while writing {workdir}/claim.json')
  assert os.listdir(workdir) == []


def test_claim_timeout_s_is_a_positive_number_of_seconds():
  assert config_lib.base_config().training.claim_timeout_s == 600
  config = tiny_config(**{'training.claim_timeout_s': 0.0})
  with pytest.raises(ValueError, match=r'^training.claim_timeout_s must be positive, got 0.0'):
    config_lib.validate_config(config)


# --- readers need no claim -------------------------------------------------------------------


def test_sampling_reads_a_workdir_being_written_and_touches_nothing(tmp_path):
  """A live claim and a save in progress: --mode sample reads the finished checkpoint only."""
  config = tiny_config(**{'model.ch': 8, 'model.num_groups': 4, 'sampling.num_samples': 4,
                          'sampling.batch_size': 4})
  workdir = tmp_path / 'run'
  _, _, _, _, state = train.setup(config)
  with ckpt.create_manager(str(workdir)) as manager:
    ckpt.save(manager, 2, state.replace(step=state.step + 2), {'next_index': 2})
    manager.wait_until_finished()
  in_progress = workdir / 'checkpoints' / '4.orbax-checkpoint-tmp-1234'
  in_progress.mkdir()
  (in_progress / 'half-written').write_bytes(b'x')
  held = claim.acquire(str(workdir), TIMEOUT)   # the trainer
  before = _file_bytes(workdir)
  from diffusion_jax.evaluation import samples  # pylint: disable=g-import-not-at-top
  result = samples.sample(config, str(workdir))
  assert result['step'] == 2
  assert os.path.exists(result['npz'])
  assert _file_bytes(workdir) == before and held.is_ours()
  assert (in_progress / 'half-written').read_bytes() == b'x'
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4.orbax-checkpoint-tmp-1234']


def test_convert_from_diffusers_is_a_writer_and_refuses_a_held_workdir(tmp_path):
  from diffusion_jax import convert  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  held = claim.acquire(str(workdir), TIMEOUT)   # a trainer
  tiny_unet = os.path.join(HERE, 'fixtures', 'diffusers_tiny_unet')
  with pytest.raises(claim.ClaimHeldError, match=f'--workdir {workdir} is in use by another run'):
    convert.from_diffusers(tiny_unet, str(workdir), tiny_config())
  assert os.listdir(workdir) == ['claim.json'] and held.is_ours()


# --- the command line ----------------------------------------------------------------------------

SMALL = {'model.ch': 8, 'model.ch_mult': '(1,2)', 'model.num_res_blocks': 1,
         'model.num_groups': 4, 'model.attn_resolutions': '(4,)', 'diffusion.num_timesteps': 20,
         'training.batch_size': 16, 'optim.warmup_steps': 2, 'sampling.sampler': 'ddim',
         'sampling.num_steps': 5, 'training.num_sample_images': 4,
         'training.cpu_devices': 1}


def _cli(workdir, *flags, **overrides):
  args = [f'--default_config.{k}={v}' for k, v in {**SMALL, **overrides}.items()]
  return subprocess.Popen([sys.executable, '-m', 'diffusion_jax.main', f'--workdir={workdir}',
                           *args, *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))


RUN_FILES = ['checkpoints', 'config.json', 'samples', 'tensorboard']
SHORT = {'training.num_train_steps': 4, 'training.checkpoint_every_steps': 2,
         'training.log_every_steps': 2, 'training.sample_every_steps': 4}


@pytest.mark.slow   # two training processes: a minute or more on 2 cores
def test_two_runs_a_second_apart_one_trains_the_other_exits_2_writing_nothing(tmp_path):
  workdir = tmp_path / 'run'
  first = _cli(workdir, **SHORT, seed=1)
  time.sleep(1)
  second = _cli(workdir, **SHORT, seed=2)
  outs = {seed: (p, p.communicate(timeout=900)[0]) for seed, p in ((1, first), (2, second))}
  codes = sorted(p.returncode for p, _ in outs.values())
  assert codes == [0, 2], outs
  (winner_seed, (winner, _)), = [(s, v) for s, v in outs.items() if v[0].returncode == 0]
  _, loser_out = [v for v in outs.values() if v[0].returncode == 2][0]
  assert loser_out.count('\n') == 1 and loser_out.startswith(
      f'error: --workdir {workdir} is in use by another run: host {socket.gethostname()}, '
      f'pid {winner.pid}, since '), loser_out
  assert 'stop that process, or use another --workdir' in loser_out
  # The workdir holds the winner's files only (its config.json; no claim left behind).
  assert sorted(os.listdir(workdir)) == RUN_FILES
  assert json.loads((workdir / 'config.json').read_text())['seed'] == winner_seed
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']


def test_cli_honours_another_hosts_claim_in_one_line_writing_nothing(tmp_path):
  workdir = tmp_path / 'run'
  now = time.time()
  data = _write(workdir, _holder(host='tpu-vm-3', pid=17, started=now - 60, renewed=now))
  refused = _cli(workdir, **SHORT)
  out = refused.communicate(timeout=600)[0]
  assert refused.returncode == 2 and out.count('\n') == 1, out
  assert out.startswith(f'error: --workdir {workdir} is in use by another run: host tpu-vm-3, '
                        f'pid 17, since {claim.utc(now - 60)} (another host; renewed ')
  assert os.listdir(workdir) == ['claim.json'] and _file_bytes(workdir) == data


@pytest.mark.slow
def test_cli_takes_another_hosts_claim_over_after_the_timeout_and_trains(tmp_path):
  workdir = tmp_path / 'run'
  now = time.time()
  _write(workdir, _holder(host='tpu-vm-3', pid=17, started=now - 60, renewed=now - 31))
  taker = _cli(workdir, **SHORT, **{'training.claim_timeout_s': 30})
  out = taker.communicate(timeout=900)[0]
  assert taker.returncode == 0, out
  lines = [line for line in out.splitlines() if 'Taking over' in line]
  assert len(lines) == 1 and lines[0].startswith(
      f'Taking over the claim of host tpu-vm-3, pid 17 (since {claim.utc(now - 60)}) on '
      f'{workdir}: it was last renewed '), out
  assert sorted(os.listdir(workdir)) == RUN_FILES


@pytest.mark.slow
def test_kill_9_then_the_same_command_takes_over_at_once_and_resumes(tmp_path):
  workdir = tmp_path / 'run'
  long_run = {**SHORT, 'training.num_train_steps': 100000}
  proc = _cli(workdir, **long_run)
  deadline = time.time() + 600
  while not ckpt.intact_steps(workdir / 'checkpoints') and time.time() < deadline:
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert _read(workdir).pid == proc.pid   # the claim outlived its process
  step = max(ckpt.intact_steps(workdir / 'checkpoints'))
  start = time.time()
  rerun = _cli(workdir, **{**long_run, 'training.num_train_steps': step + 2})
  out = rerun.communicate(timeout=900)[0]
  assert rerun.returncode == 0, out
  assert time.time() - start < TIMEOUT   # no waiting for claim_timeout_s
  assert f'Taking over the claim of host {socket.gethostname()}, pid {proc.pid} (since ' in out
  assert f'pid {proc.pid} on this host ({socket.gethostname()}) is no longer running.' in out
  assert f'(step {step} of {step + 2})' in out
  assert not (workdir / 'claim.json').exists()


@pytest.mark.slow
def test_sample_while_training_reads_the_newest_checkpoint_and_the_trainer_goes_on(tmp_path):
  workdir = tmp_path / 'run'
  trainer = _cli(workdir, **{**SHORT, 'training.num_train_steps': 100000,
                             'training.checkpoint_every_steps': 20,
                             'training.log_every_steps': 20,
                             'training.sample_every_steps': 100000})
  deadline = time.time() + 600
  while not ckpt.intact_steps(workdir / 'checkpoints') and time.time() < deadline:
    time.sleep(0.2)
  holder = _read(workdir)
  sampler = _cli(workdir, '--mode=sample', **{'sampling.num_samples': 4,
                                              'sampling.batch_size': 4})
  out = sampler.communicate(timeout=600)[0]
  steps_after = ckpt.intact_steps(workdir / 'checkpoints')
  assert sampler.returncode == 0, out
  assert trainer.poll() is None   # undisturbed: still training
  sampled = int(out.split('of checkpoint step ')[1].split(':')[0])
  assert sampled % 20 == 0 and sampled <= max(steps_after), (out, steps_after)
  assert 'damaged' not in out and 'warning' not in out
  assert _read(workdir).token == holder.token   # the reader took no claim
  time.sleep(2)
  trainer.send_signal(signal.SIGTERM)   # the preemption handler saves, releases, exits 0
  out = trainer.communicate(timeout=300)[0]
  assert trainer.returncode == 0, out
  assert 'damaged' not in out and 'error' not in out
  assert not (workdir / 'claim.json').exists()
  assert max(ckpt.intact_steps(workdir / 'checkpoints')) > sampled


def test_on_two_hosts_a_held_workdir_stops_both_processes_with_exit_2(tmp_path):
  """launch/local_multihost.sh (2 processes over jax.distributed): process 0 finds the claim."""
  workdir = tmp_path / 'mh'
  data = _write(workdir, _holder(host='tpu-vm-5', pid=23))
  env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
  flags = [f'--default_config.{k}={v}' for k, v in {**SMALL, **SHORT}.items()
           if k != 'training.cpu_devices']
  proc = subprocess.run(['bash', os.path.join(REPO, 'launch', 'local_multihost.sh'),
                         str(workdir), *flags], capture_output=True, text=True, env=env,
                        timeout=600)
  assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
  lines = sorted(proc.stderr.strip().splitlines())
  assert len(lines) == 2, proc.stderr
  assert lines[0].startswith(f'error: --workdir {workdir} is in use by another run: host '
                             'tpu-vm-5, pid 23, since '), lines
  assert lines[1] == (f'error: process 0 could not claim --workdir {workdir} (its error line '
                      'says why); this process stops too.'), lines
  assert os.listdir(workdir) == ['claim.json'] and _file_bytes(workdir) == data


def test_a_takeover_lock_left_by_a_dead_taker_is_cleared(tmp_path):
  """A ``.claim.json.takeover`` older than TAKEOVER_LOCK_S does not block the takeover forever."""
  _write(tmp_path, _holder(pid=_dead_pid(), pid_start=None))
  lock = tmp_path / f'.{claim.CLAIM_FILE}.takeover'
  lock.write_text('someone')
  old = time.time() - claim.TAKEOVER_LOCK_S - 5
  os.utime(lock, (old, old))
  said = []
  held = claim.acquire(str(tmp_path), TIMEOUT, say=said.append)
  assert len(said) == 1 and said[0].startswith('Taking over the claim of host')
  assert not lock.exists() and _read(str(tmp_path)).token == held.holder.token
  held.release()
