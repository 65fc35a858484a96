r"""Entry point: ``python -m diffusion_jax.main [--config configs/<name>.py] --workdir DIR``.

Modes: ``train`` (default; resumes automatically from ``DIR/checkpoints``),
``sample`` (images from the EMA parameters of the latest checkpoint),
``eval`` (bits/dim, rate-distortion, progressive figures, FID), ``inpaint``
(RePaint completions of a split's images, config section ``inpaint``) and
``edit`` (SDEdit, section ``edit``; :mod:`diffusion_jax.editing_cli`) and ``distill``
(progressive distillation into ``DIR/distilled/steps_<N>/``, section ``distill``;
:mod:`diffusion_jax.distill`).

One config flag: ``--config`` is a ``configs/<name>.py`` file, by default the
embedded digits config, and ``--config.section.key=value`` overrides any key,
with or without a file (``--default_config.section.key=value`` is accepted as
an alias when no ``--config`` file is given). Without a ``--config`` file, a
workdir that holds a ``config.json`` (written by training) runs with that
config, the overrides applied on top (``config_lib.apply_overrides``): every
mode, training too (it resumes with the saved config and writes the merged one
back). Overrides that would change the network or the diffusion process of a
trained workdir (``config_lib.FROZEN_KEYS``) are refused.

Bad input (flags, config keys and values, a missing config file or data set,
an unusable workdir, sample/eval without a checkpoint) ends with one line
``error: ...`` on stderr and exit code 2, before anything is written into the
workdir. ``DIR`` is any path ``etils.epath`` accepts (local or ``gs://...``).
A full disk while writing (a checkpoint, a PNG, an output file) ends with one
line ``error: no space left ...`` and exit code 1 (``diffusion_jax/storage.py``).
"""

import contextlib
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from diffusion_jax import config_lib

FLAGS = flags.FLAGS
MODES = ('train', 'sample', 'eval', 'inpaint', 'edit', 'distill')
USAGE_EXIT_CODE = 2
_OVERRIDE = re.compile(r'^--?(no)?(config|default_config)\.([\w.]+)')
_ALIAS = re.compile(r'^(--?(?:no)?)default_config\.')
# The default of --config: a config file whose get_config() is config_lib.digits_config().
EMBEDDED_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'embedded_config.py')


def _define_flags(flag_values, argv) -> None:
  """Defines the flags once; ml_collections reads the ``--config.*`` overrides from ``argv``."""
  if 'workdir' in flag_values:
    return
  flags.DEFINE_string('workdir', 'runs/digits',
                      'Directory (any etils.epath path, e.g. gs://...) for checkpoints, samples '
                      'and logs.', flag_values=flag_values)
  flags.DEFINE_enum('mode', 'train', list(MODES), 'What to do.', flag_values=flag_values)
  config_flags.DEFINE_config_file(
      'config', EMBEDDED_CONFIG,
      'A configs/<name>.py file (default: the embedded digits config). Override any key with '
      '--config.section.key=value, with or without a file. Without a file, a --workdir that '
      'holds a config.json uses that config (the overrides apply on top; network and schedule '
      'keys of a trained workdir cannot change). --default_config.section.key=value is an '
      'alias of --config.section.key=value when no --config file is given.',
      flag_values=flag_values, lock_config=True, sys_argv=argv)


def fail(message, code: int = USAGE_EXIT_CODE):
  """Prints ``error: <message>`` as one line on stderr and exits with ``code``."""
  print('error: ' + ' '.join(str(message).split()), file=sys.stderr, flush=True)
  sys.exit(code)


def _config_file_arg(argv) -> str | None:
  """The value of ``--config`` in ``argv`` (None if absent)."""
  for i, arg in enumerate(argv):
    m = re.match(r'^--?config(=(.*))?$', arg)
    if m:
      return m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else '')
  return None


def _unaliased(arg: str) -> str:
  """``--default_config.KEY...`` as ``--config.KEY...`` (``--no`` kept); other args unchanged."""
  return _ALIAS.sub(lambda m: m.group(1) + 'config.', arg)


def aliased_argv(argv) -> list:
  """``argv`` with ``--default_config.KEY`` written as ``--config.KEY`` (the old spelling).

  Raises ValueError for ``--default_config.KEY`` next to a ``--config`` file,
  where it would not take effect.
  """
  config_file = _config_file_arg(argv)
  for arg in argv:
    if _ALIAS.match(arg) and config_file is not None:
      raise ValueError(f'{arg} would not take effect next to --config {config_file}: '
                       '--default_config. overrides only the embedded default config; write '
                       f'it as {_unaliased(arg)}.')
  return [_unaliased(arg) for arg in argv]


def _flag_error_message(error: Exception, argv) -> str:
  """One line for a flag-parsing failure: the unknown key, missing file, or absl's own message."""
  config_file = _config_file_arg(argv)
  if config_file is not None and not os.path.isfile(config_file.split(':')[0]):
    return (f'config file {config_file!r} (--config) does not exist; pass a file such as '
            'configs/cifar10.py.')
  schema = config_lib.base_config() if config_file is not None else config_lib.digits_config()
  for arg in argv:
    m = _OVERRIDE.match(arg)
    if m:
      message = config_lib.unknown_key_message(schema, m.group(3))
      if message:
        return f'{message} (in {arg})'
  text = str(error).strip().splitlines()
  text = text[0] if text else type(error).__name__
  for arg in argv:   # absl names the flag as parsed: put back the user's --default_config.KEY
    name = arg.split('=', 1)[0]
    if _ALIAS.match(name):
      text = text.replace(_unaliased(name), name)
  return text


def parse_flags(argv):
  """absl's flag parsing, with every failure as one ``error:`` line and exit code 2."""
  try:
    argv = FLAGS.read_flags_from_files(argv, force_gnu=False)   # --flagfile
    aliased = aliased_argv(argv)
  except (flags.Error, OSError, ValueError) as e:
    fail(e)
  try:
    _define_flags(FLAGS, aliased)
    rest = FLAGS(aliased)
    FLAGS.config.get('seed')   # a --config file that failed to load raises here
  except (flags.Error, KeyError, AttributeError, OSError, TypeError, ValueError) as e:
    fail(_flag_error_message(e, argv))
  if len(rest) > 1:
    fail(f'unexpected arguments {rest[1:]}; flags are --name=value.')
  return rest


def _has_checkpoint(workdir) -> bool:
  """Whether ``workdir`` holds a checkpoint (False where it cannot be looked at: preflight says why)."""
  from diffusion_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  try:
    return bool(ckpt.intact_steps(ckpt.checkpoint_dir(workdir)))
  except Exception:  # pylint: disable=broad-except  (epath backends raise many types)
    return False


def _exists(path) -> bool:
  try:
    return path.exists()
  except Exception:  # pylint: disable=broad-except  (as _has_checkpoint)
    return False


def resolve_config(flag_config, overrides, *, config_file: bool, workdir):
  """The config a run uses; raises ValueError with a one-line message.

  * a ``--config`` file (``config_file``): ``flag_config``, that file with the
    overrides (the workdir's checkpoint must match it);
  * else a workdir with a ``config.json``: that config (the model's) with
    ``overrides`` (``{'section.key': value}``) set by
    ``config_lib.apply_overrides``, refusing a changed network or schedule
    when the workdir holds a checkpoint;
  * else ``flag_config``: the embedded digits config with the overrides
    (a new workdir). A checkpoint without ``config.json`` is an error.
  """
  if config_file:
    return flag_config
  from diffusion_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  trained = _has_checkpoint(workdir)
  path = workdir_lib.as_path(workdir) / workdir_lib.CONFIG_FILE
  try:
    if not _exists(path):
      if trained:
        raise workdir_lib.WorkdirConfigError(f'{path} does not exist')
      return flag_config
    saved = workdir_lib.read_config(workdir)
  except workdir_lib.WorkdirConfigError as e:
    raise workdir_lib.WorkdirConfigError(
        f'{e}; it is the config of the model in {workdir_lib.as_path(workdir)}: pass the config '
        'it was trained with as --config FILE.') from e
  return config_lib.apply_overrides(saved, overrides, trained=trained)


def command_line_config(flag_values=FLAGS):
  """:func:`resolve_config` for parsed flags (``--config``, its overrides, ``--workdir``)."""
  return resolve_config(flag_values.config, flag_values['config'].override_values,
                        config_file=bool(flag_values['config'].present),
                        workdir=flag_values.workdir)


def config_from_argv(argv):
  """The config ``python -m diffusion_jax.main`` runs with for ``argv`` (``argv[0]`` the program).

  Parses into a fresh set of flags (the process's flags stay as they are);
  raises what parsing or :func:`resolve_config` raises.
  """
  flag_values = flags.FlagValues()
  argv = aliased_argv(argv)
  _define_flags(flag_values, argv)
  flag_values(argv)
  return command_line_config(flag_values)


def initialize_distributed(config) -> None:
  """``jax.distributed.initialize()`` for multi-host runs.

  Used when ``training.distributed`` is true or ``JAX_COORDINATOR_ADDRESS`` is
  set. On cloud TPU VMs and SLURM/Open MPI clusters JAX finds the coordinator
  itself; elsewhere set ``JAX_COORDINATOR_ADDRESS`` (host:port),
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` on every host.
  """
  import jax  # pylint: disable=g-import-not-at-top
  address = os.environ.get('JAX_COORDINATOR_ADDRESS')
  if not (config.training.distributed or address):
    return
  kw = {}
  if address:
    kw['coordinator_address'] = address
  for env, key in (('JAX_NUM_PROCESSES', 'num_processes'), ('JAX_PROCESS_ID', 'process_id')):
    if os.environ.get(env):
      kw[key] = int(os.environ[env])
  jax.distributed.initialize(**kw)


def preflight(config, mode: str, workdir, claims: contextlib.ExitStack | None = None) -> None:
  """Every check that can fail on bad input, before any work; raises ValueError or OSError.

  Config values, model, data set and batch size first (nothing is written),
  then the workdir: every mode but train needs a checkpoint (nothing is created), train
  and distill claim the workdir (entered into ``claims``, held until it closes; ClaimHeldError
  if another run holds it: ``diffusion_jax/claim.py``), then creates it and writes
  ``config.json`` (WorkdirError if it cannot).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from diffusion_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  from diffusion_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from diffusion_jax import models  # pylint: disable=g-import-not-at-top
  from diffusion_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from diffusion_jax import settings  # pylint: disable=g-import-not-at-top
  config_lib.validate_config(config)
  settings.check(config, mode)   # eval.parts, sample sets, sampler options: before any restore
  data_lib.validate_data_config(config, num_devices=jax.device_count())
  models.create_model(config)
  if mode == 'distill':
    config_lib.validate_distill(config)
  if mode in ('train', 'distill'):
    source = data_lib.get_source(config, config.data.train_split)
    data_lib.check_batch_fits(config, len(source), jax.process_count())
  elif mode == 'eval':
    data_lib.get_source(config, config.data.eval_split)
  elif mode in ('inpaint', 'edit'):
    from diffusion_jax import editing_cli  # pylint: disable=g-import-not-at-top
    (editing_cli.check_inpaint if mode == 'inpaint' else editing_cli.check_edit)(config)
  if mode != 'train' and ckpt.latest_step(workdir) is None:
    raise ckpt.no_checkpoint_error(workdir)
  if mode in ('train', 'distill') and claims is not None:   # one writer per workdir, first
    from diffusion_jax import claim  # pylint: disable=g-import-not-at-top
    claims.enter_context(claim.hold(workdir, config.training.claim_timeout_s))
  if mode == 'train' and jax.process_index() == 0:
    workdir_lib.prepare(workdir, config.to_json_best_effort(indent=2, sort_keys=True))


def run(config, mode: str, workdir) -> None:
  """Runs ``mode`` after :func:`preflight`; bad input and known failures end in one line.

  A writing mode's claim on the workdir is released however the run ends.
  """
  with contextlib.ExitStack() as claims:
    _run(config, mode, workdir, claims)


def _run(config, mode: str, workdir, claims: contextlib.ExitStack) -> None:
  from diffusion_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  from diffusion_jax import storage  # pylint: disable=g-import-not-at-top
  try:
    preflight(config, mode, workdir, claims)
  except storage.StorageFullError as e:   # config.json did not fit: not bad input
    fail(e, code=1)
  except (ValueError, OSError) as e:   # DatasetNotFoundError, WorkdirError, NoCheckpointError
    fail(e)
  try:
    if mode == 'train':
      from diffusion_jax import train  # pylint: disable=g-import-not-at-top
      train.train_and_evaluate(config, workdir, claimed=True)
    elif mode == 'distill':
      from diffusion_jax import distill  # pylint: disable=g-import-not-at-top
      distill.distill(config, workdir, claimed=True)
    elif mode in ('inpaint', 'edit'):
      from diffusion_jax import editing_cli  # pylint: disable=g-import-not-at-top
      (editing_cli.run_inpaint if mode == 'inpaint' else editing_cli.run_edit)(config, workdir)
    else:
      from diffusion_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
      (evaluate.sample if mode == 'sample' else evaluate.evaluate)(config, workdir)
  except (ckpt.NoCheckpointError, ckpt.CheckpointMismatchError) as e:
    fail(e)
  except (FloatingPointError, storage.StorageFullError) as e:   # non-finite guard; a full disk
    fail(e, code=1)
  except OSError as e:   # a full disk outside storage.write_file (a folder, a library's own file)
    if not storage.is_out_of_space(e):
      raise
    fail(storage.unwrapped_full_error(e), code=1)


def main(argv):
  del argv  # checked by parse_flags
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax and grain are chatty at INFO
  try:
    config = command_line_config(FLAGS)
  except ValueError as e:   # WorkdirConfigError, an unknown or refused override
    fail(e)
  from diffusion_jax import host  # pylint: disable=g-import-not-at-top
  host.configure_cpu_devices(config)   # before JAX starts its backends
  host.configure_malloc(config)   # likewise: the CPU step's buffers kept between calls
  host.configure_cpu_op_threads(config)   # likewise: each CPU device's ops on its own thread
  initialize_distributed(config)
  run(config, FLAGS.mode, FLAGS.workdir)


def entry():
  """``python -m diffusion_jax.main``."""
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  entry()
