"""The command line answers every bad input with one line ``error: ...``, exit code 2, and writes nothing."""

import os
import pathlib
import subprocess
import sys

import pytest

from diffusion_jax import config_lib
from diffusion_jax import main

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (flags, extra environment, the expected one line). The workdir is the test's tmp_path / 'run'.
CLI_CASES = {
    'unknown default_config key': (
        ['--default_config.training.bogus=1'], {},
        "error: unknown config key 'training.bogus'; training has: batch_size, "),
    'unknown config key': (
        [f'--config={ROOT / "configs" / "digits.py"}', '--config.x.bogus=1'], {},
        "error: unknown config key 'x.bogus'; the config has: data, diffusion, edit, eval, inpaint, "),
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
