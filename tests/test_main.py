"""The command line answers every bad input with one line ``error: ...``, exit code 2, and writes nothing."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np

import pytest

from diffusion_jax import config_lib
from diffusion_jax import main
from diffusion_jax import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (flags, extra environment, the expected one line). The workdir is the test's tmp_path / 'run'.
CLI_CASES = {
    'unknown default_config key': (
        ['--default_config.training.bogus=1'], {},
        "error: unknown config key 'training.bogus'; training has: batch_size, "),
    'unknown config key': (
        [f'--config={ROOT / "configs" / "digits.py"}', '--config.x.bogus=1'], {},
        "error: unknown config key 'x.bogus'; the config has: data, diffusion, distill, edit, eval, inpaint, "),
    'missing config file': (
        ['--config=/nonexistent/cfg.py'], {},
        "error: config file '/nonexistent/cfg.py' (--config) does not exist"),
    'batch larger than the split': (
        ['--default_config.training.batch_size=100000'], {},
        "error: training.batch_size=100000 is larger than the training split of "
        "data.name='digits' ('train': 1500 images); use at most 1500."),
    'batch not divisible by devices': (
        ['--default_config.training.batch_size=12'],
        {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'},
        'error: training.batch_size=12 (global) must be divisible by the number of devices (8).'),
    'sample without checkpoint': (
        ['--mode=sample'], {}, 'error: no checkpoint in {workdir}/checkpoints: train first with'),
    'unwritable workdir': (
        ['--workdir=/proc/x'], {}, 'error: cannot write to --workdir /proc/x'),
    'bad enum': (
        ['--default_config.diffusion.schedule=cosinus'], {},
        "error: diffusion.schedule='cosinus' is not supported; allowed values: linear, cosine"),
    'bad mode': (['--mode=fit'], {}, 'error: flag --mode=fit: value should be one of'),
    'bad value type': (
        ['--default_config.training.batch_size=lots'], {},
        'error: flag --default_config.training.batch_size=lots: invalid literal for int()'),
    'unknown key without a config file': (
        ['--config.training.bogus=1'], {},
        "error: unknown config key 'training.bogus'; training has: batch_size, "),
    'override without a config file takes effect': (
        ['--config.diffusion.schedule=cosinus'], {},
        "error: diffusion.schedule='cosinus' is not supported; allowed values: linear, cosine"),
    'default_config next to a config file': (
        [f'--config={ROOT / "configs" / "digits.py"}', '--default_config.sampling.sampler=bogus'],
        {}, 'error: --default_config.sampling.sampler=bogus would not take effect next to '
        f'--config {ROOT / "configs" / "digits.py"}: --default_config. overrides only the '
        'embedded default config; write it as --config.sampling.sampler=bogus.'),
}


@pytest.fixture(scope='module')
def cli_results(tmp_path_factory):
  """Runs every CLI case at once (they are independent processes): {name: (rc, output, workdir)}."""
  procs = {}
  for name, (flags, env, _) in CLI_CASES.items():
    workdir = tmp_path_factory.mktemp('cli') / 'run'
    procs[name] = (subprocess.Popen(
        [sys.executable, '-m', 'diffusion_jax.main', f'--workdir={workdir}', *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, JAX_PLATFORMS='cpu', **env)), workdir)
  return {name: (p.wait(timeout=600), p.stdout.read(), w) for name, (p, w) in procs.items()}


@pytest.mark.parametrize('name', list(CLI_CASES))
def test_cli_bad_input_is_one_line_and_exit_2(cli_results, name):
  rc, output, workdir = cli_results[name]
  expected = CLI_CASES[name][2].format(workdir=workdir)
  assert rc == 2, output
  assert output.strip().splitlines() == [output.strip()], output   # exactly one line
  assert output.startswith(expected), output
  assert not workdir.exists()   # nothing was created


def _tiny_digits(**overrides):
  config = config_lib.digits_config()
  for key, value in overrides.items():
    section, field = key.split('.')
    config[section][field] = value
  return config


@pytest.mark.parametrize('overrides,mode,expected', [
    ({'diffusion.schedule': 'cosinus'}, 'train', "diffusion.schedule='cosinus' is not supported"),
    ({'diffusion.mean_type': 'score'}, 'train', "diffusion.mean_type='score' is not supported"),
    ({'diffusion.var_type': 'learned'}, 'train', "diffusion.var_type='learned' is not supported"),
    ({'diffusion.loss_type': 'l1'}, 'train', "diffusion.loss_type='l1' is not supported"),
    ({'sampling.sampler': 'euler'}, 'sample', "sampling.sampler='euler' is not supported"),
    ({'data.name': 'imagenet'}, 'train', "data.name='imagenet' is not supported"),
    ({'data.image_size': 6}, 'train', 'data.image_size=6 must be divisible by'),
    ({}, 'eval', 'no checkpoint in'),
    ({'inpaint.missing': 'nose'}, 'inpaint',
     "inpaint.missing='nose' is not supported; allowed values: bottom_half, top_half"),
    ({'inpaint.method': 'magic'}, 'inpaint', "inpaint.method='magic' is not supported"),
    ({'inpaint.eta': -0.5}, 'inpaint', 'inpaint.eta must be -1 (the ancestral step) or >= 0'),
    ({'inpaint.missing': 'mask'}, 'inpaint', "inpaint.missing='mask' needs inpaint.mask_path"),
    ({'inpaint.split': 'validation'}, 'inpaint', "inpaint.split='validation': split 'validation'"),
    ({'edit.strength': 0.0}, 'edit', 'edit.strength must be in (0, 1]'),
    ({'edit.strength': 1.5}, 'edit', 'edit.strength must be in (0, 1]'),
    ({'edit.split': 'validation'}, 'edit', "edit.split='validation'"),
    ({'sampling.sampler': 'ode'}, 'edit', "sampling.sampler='ode' is not supported by --mode edit"),
    ({}, 'inpaint', 'no checkpoint in'),
    ({}, 'edit', 'no checkpoint in'),
    ({'distill.start_steps': 48}, 'distill', 'distill.start_steps must be a power of two'),
    ({'distill.final_steps': 128}, 'distill', 'must be smaller than distill.start_steps'),
    ({'distill.student_mean_type': 'eps'}, 'distill', "distill.student_mean_type='eps'"),
    ({'distill.teacher_steps': 3}, 'distill', 'distill.teacher_steps must be a power of two >= 2'),
    ({'distill.teacher_steps': 4, 'distill.start_steps': 32}, 'distill',
     'distill.start_steps=32 / distill.final_steps=1 must be a power of distill.teacher_steps=4'),
    ({}, 'distill', 'no checkpoint in'),
])
def test_bad_config_or_mode_is_one_line_and_exit_2(tmp_path, capsys, overrides, mode, expected):
  workdir = tmp_path / 'run'
  with pytest.raises(SystemExit) as exit_info:
    main.run(_tiny_digits(**overrides), mode, str(workdir))
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and expected in err and err.count('\n') == 1, err
  assert not workdir.exists()


def test_workdir_that_is_a_file(tmp_path, capsys):
  (tmp_path / 'file').write_text('x')
  with pytest.raises(SystemExit):
    main.run(_tiny_digits(), 'train', str(tmp_path / 'file'))
  assert f'--workdir {tmp_path / "file"} is a file, not a folder' in capsys.readouterr().err


def test_unknown_key_message_names_the_section_and_its_keys():
  config = config_lib.digits_config()
  assert config_lib.unknown_key_message(config, 'training.batch_size') is None
  assert "unknown config key 'optim.lrate'; optim has: b1, b2, ema_decay" in (
      config_lib.unknown_key_message(config, 'optim.lrate'))
  assert "'seed' is a value, not a section" in config_lib.unknown_key_message(config, 'seed.x')


# --- one config flag ------------------------------------------------------------------------


def _resolved(tmp_path, *flags):
  """The config the command line runs with for ``flags`` on a new workdir."""
  return main.config_from_argv(['main', f'--workdir={tmp_path / "new"}', *flags])


def test_config_overrides_work_without_a_config_file(tmp_path):
  config = _resolved(tmp_path, '--config.sampling.sampler=dpm_solver',
                     '--config.sampling.num_steps=10', '--config.model.ch_mult=(1,2)',
                     '--config.model.remat')
  assert (config.sampling.sampler, config.sampling.num_steps) == ('dpm_solver', 10)
  assert config.model.ch_mult == (1, 2) and config.model.remat is True
  expected = config_lib.digits_config().to_dict()
  expected['sampling'].update(sampler='dpm_solver', num_steps=10)
  expected['model'].update(ch_mult=(1, 2), remat=True)
  assert config.to_dict() == expected
  assert _resolved(tmp_path).to_dict() == config_lib.digits_config().to_dict()


def test_config_overrides_work_with_a_config_file(tmp_path):
  config = _resolved(tmp_path, f'--config={ROOT / "configs" / "cifar10.py"}',
                     '--config.sampling.sampler=dpm_solver', '--config.sampling.num_steps=10')
  assert (config.sampling.sampler, config.sampling.num_steps) == ('dpm_solver', 10)
  assert config.data.name == 'cifar10' and config.model.ch == 128


def test_default_config_is_an_alias_without_a_config_file(tmp_path):
  config = _resolved(tmp_path, '--default_config.sampling.sampler=dpm_solver',
                     '--config.sampling.num_steps=10', '--nodefault_config.sampling.use_ema')
  assert (config.sampling.sampler, config.sampling.num_steps) == ('dpm_solver', 10)
  assert config.sampling.use_ema is False and config.data.name == 'digits'
  with pytest.raises(ValueError, match='would not take effect next to --config'):
    _resolved(tmp_path, f'--config={ROOT / "configs" / "digits.py"}',
              '--default_config.sampling.num_steps=10')


# --- the workdir's config.json is the model's config ------------------------------------------

TINY_FLAGS = [
    '--config.model.ch=8', '--config.model.ch_mult=(1,)', '--config.model.num_res_blocks=1',
    '--config.model.num_groups=4', '--config.model.attn_resolutions=()',
    '--config.diffusion.num_timesteps=20',
    '--config.training.batch_size=16', '--config.training.num_train_steps=2',
    '--config.training.checkpoint_every_steps=2', '--config.training.log_every_steps=1',
    '--config.training.sample_every_steps=1000', '--config.optim.warmup_steps=1',
    '--config.sampling.num_samples=4', '--config.sampling.batch_size=4',
    '--config.sampling.num_steps=5',
]


def _main(*flags):
  return subprocess.run([sys.executable, '-m', 'diffusion_jax.main', *flags], capture_output=True,
                        text=True, timeout=900, env=dict(os.environ, JAX_PLATFORMS='cpu'))


def _error_line(proc) -> str:
  """The one ``error:`` line of a failed run (orbax may log warnings before it)."""
  lines = [l for l in proc.stderr.splitlines() if l.strip() and not re.match(r'[IW]\d{4} ', l)]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A workdir trained for 2 steps by the command line with a non-default tiny model."""
  workdir = tmp_path_factory.mktemp('trained') / 'run'
  proc = _main(f'--workdir={workdir}', *TINY_FLAGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.listdir(workdir / 'checkpoints') == ['2']
  return workdir


def test_a_trained_workdir_samples_with_its_own_config(trained):
  proc = _main(f'--workdir={trained}', '--mode=sample')   # no override repeated
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(trained / 'samples' / 'samples_ddim_5.npz') as f:   # sampling.num_steps=5 saved
    images = f['images']
  assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8   # sampling.num_samples=4


@pytest.mark.parametrize('mode', ['sample', 'eval', 'inpaint', 'edit'])
def test_every_mode_runs_with_the_workdirs_config_and_the_overrides(trained, mode):
  config = main.config_from_argv(['main', f'--workdir={trained}', f'--mode={mode}',
                                  '--config.eval.parts=bpd', '--config.inpaint.num_images=3',
                                  '--config.model.ch=8', '--config.model.dtype=bfloat16'])
  assert config.model.ch == 8 and config.model.ch_mult == (1,) and config.model.num_groups == 4
  assert config.diffusion.num_timesteps == 20 and config.sampling.num_steps == 5
  assert config.eval.parts == 'bpd' and config.inpaint.num_images == 3
  assert config.model.dtype == 'bfloat16' and config.data.name == 'digits'
  main.preflight(config, mode, str(trained))   # the checks of the run itself pass


def test_train_resumes_with_the_saved_config_and_writes_the_merged_one_back(trained, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  config = main.config_from_argv(['main', f'--workdir={workdir}',
                                  '--config.training.num_train_steps=3'])
  assert config.training.num_train_steps == 3 and config.model.ch == 8
  main.preflight(config, 'train', str(workdir))
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['training']['num_train_steps'] == 3 and saved['model']['ch'] == 8
  assert saved['model']['ch_mult'] == [1] and saved['sampling']['num_steps'] == 5


def test_a_config_file_on_a_trained_workdir_is_used_as_given(trained):
  config = main.config_from_argv(['main', f'--workdir={trained}',
                                  f'--config={ROOT / "configs" / "digits.py"}'])
  assert config.model.ch == 32 and config.to_dict() == config_lib.digits_config().to_dict()


@pytest.mark.parametrize('flag', ['--config.model.ch=64', '--default_config.model.ch=64'])
def test_a_changed_network_on_a_trained_workdir_is_one_line_and_exit_2(trained, flag):
  before = (trained / 'config.json').read_text()
  line = _error_line(_main(f'--workdir={trained}', '--mode=sample', flag))
  assert line == ('error: model.ch=64 would not match the trained network (model.ch=8); train a '
                  'new model in a new workdir instead.')
  assert (trained / 'config.json').read_text() == before


def test_a_changed_schedule_of_a_trained_workdir_is_refused(trained):
  with pytest.raises(ValueError, match=r"^diffusion.num_timesteps=500 would not match the "
                     'trained schedule and output'):
    main.config_from_argv(['main', f'--workdir={trained}', '--mode=eval',
                           '--config.diffusion.num_timesteps=500'])
  config = main.config_from_argv(['main', f'--workdir={trained}', '--mode=eval',
                                  '--config.diffusion.var_type=fixed_small'])
  assert config.diffusion.var_type == 'fixed_small'   # the other fixed variance: same network


def _fake_workdir(tmp_path, config_json=None, *, checkpoint=True):
  workdir = tmp_path / 'run'
  if checkpoint:
    (workdir / 'checkpoints' / '2').mkdir(parents=True)
  workdir.mkdir(exist_ok=True)
  if config_json is not None:
    (workdir / 'config.json').write_text(config_json)
  return workdir


@pytest.mark.parametrize('checkpoint', [True, False])
def test_a_damaged_config_json_is_one_line_naming_the_file(tmp_path, checkpoint):
  workdir = _fake_workdir(tmp_path, '{"model": {"ch": 8', checkpoint=checkpoint)
  line = _error_line(_main(f'--workdir={workdir}', '--mode=train'))
  assert line.startswith(f'error: {workdir}/config.json is damaged: not JSON ('), line
  assert line.endswith(f'it is the config of the model in {workdir}: pass the config it was '
                       'trained with as --config FILE.'), line
  assert (workdir / 'config.json').read_text() == '{"model": {"ch": 8'   # nothing written
  assert sorted(os.listdir(workdir)) == (['checkpoints', 'config.json'] if checkpoint
                                         else ['config.json'])


def test_a_checkpoint_without_config_json_asks_for_the_config_file(tmp_path):
  workdir = _fake_workdir(tmp_path)
  with pytest.raises(workdir_lib.WorkdirConfigError) as info:
    main.config_from_argv(['main', f'--workdir={workdir}', '--mode=sample'])
  assert str(info.value) == (f'{workdir}/config.json does not exist; it is the config of the '
                             f'model in {workdir}: pass the config it was trained with as '
                             '--config FILE.')
  config = main.config_from_argv(['main', f'--workdir={workdir}', '--mode=sample',
                                  f'--config={ROOT / "configs" / "digits.py"}'])
  assert config.model.ch == 32


def test_a_config_json_without_a_checkpoint_may_change_the_network(tmp_path):
  saved = config_lib.digits_config()
  saved.model.ch = 8
  workdir = _fake_workdir(tmp_path, saved.to_json_best_effort(), checkpoint=False)
  config = main.config_from_argv(['main', f'--workdir={workdir}', '--config.model.ch=16'])
  assert config.model.ch == 16


@pytest.mark.parametrize('flag,expected', [
    ('--config.eval.parts=bogus', "error: eval.parts: unknown part(s) ['bogus']; allowed: bpd, rd,"),
    ('--config.eval.sample_sets=ddim', "error: eval.sample_sets: bad entry 'ddim'"),
    ('--config.eval.nfe_calls=0,5', "error: eval.nfe_calls='0,5' must be a comma-separated list"),
])
def test_a_bad_eval_setting_ends_before_the_checkpoint_is_restored(trained, flag, expected):
  """The settings are read before any restore: one line, and no eval/ folder is created."""
  proc = _main(f'--workdir={trained}', '--mode=eval', flag)
  assert _error_line(proc).startswith(expected)
  assert not (trained / 'eval').exists()
