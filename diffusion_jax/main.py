r"""Entry point: ``python -m diffusion_jax.main --config configs/<name>.py --workdir DIR``.

Modes: ``train`` (default; resumes automatically from ``DIR/checkpoints``),
``sample`` (images from the EMA parameters of the latest checkpoint),
``eval`` (bits/dim, rate-distortion, progressive figures, FID), ``inpaint``
(RePaint completions of a split's images, config section ``inpaint``) and
``edit`` (SDEdit, section ``edit``; :mod:`diffusion_jax.editing_cli`) and ``distill``
(progressive distillation into ``DIR/distilled/steps_<N>/``, section ``distill``;
:mod:`diffusion_jax.distill`). With no
``--config`` the embedded digits configuration is used. Override any key with
``--config.section.key=value``.

Bad input (flags, config keys and values, a missing config file or data set,
an unusable workdir, sample/eval without a checkpoint) ends with one line
``error: ...`` on stderr and exit code 2, before anything is written into the
workdir. ``DIR`` is any path ``etils.epath`` accepts (local or ``gs://...``).
A full disk while writing (a checkpoint, a PNG, an output file) ends with one
line ``error: no space left ...`` and exit code 1 (``diffusion_jax/storage.py``).
"""

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


def _define_flags() -> None:
  """Defines the flags once. ml_collections applies config overrides from sys.argv here already."""
  if 'workdir' in FLAGS:
    return
  flags.DEFINE_string('workdir', 'runs/digits',
                      'Directory (any etils.epath path, e.g. gs://...) for checkpoints, samples '
                      'and logs.')
  flags.DEFINE_enum('mode', 'train', list(MODES), 'What to do.')
  config_flags.DEFINE_config_file('config', None, 'Path to a configs/<name>.py file.',
                                  lock_config=True)
  config_flags.DEFINE_config_dict('default_config', config_lib.digits_config(),
                                  'The embedded default (digits), used when --config is not given.')


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
  return text[0] if text else type(error).__name__


def selected_config():
  """``--config`` if given, else ``--default_config`` (the embedded digits config)."""
  return FLAGS.config if FLAGS.config is not None else FLAGS.default_config


def parse_flags(argv):
  """absl's flag parsing, with every failure as one ``error:`` line and exit code 2."""
  try:
    _define_flags()
    rest = FLAGS(argv)
    selected_config().get('seed')   # a --config file that failed to load raises here
  except (flags.Error, KeyError, AttributeError, OSError, TypeError, ValueError) as e:
    fail(_flag_error_message(e, argv))
  if len(rest) > 1:
    fail(f'unexpected arguments {rest[1:]}; flags are --name=value.')
  return rest


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


def preflight(config, mode: str, workdir) -> None:
  """Every check that can fail on bad input, before any work; raises ValueError or OSError.

  Config values, model, data set and batch size first (nothing is written),
  then the workdir: every mode but train needs a checkpoint (nothing is created), train
  creates the workdir and writes ``config.json`` (WorkdirError if it cannot).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from diffusion_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  from diffusion_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from diffusion_jax import models  # pylint: disable=g-import-not-at-top
  from diffusion_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  config_lib.validate_config(config)
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
  if mode != 'train':
    if ckpt.latest_step(workdir) is None:
      raise ckpt.no_checkpoint_error(workdir)
  elif jax.process_index() == 0:
    workdir_lib.prepare(workdir, config.to_json_best_effort(indent=2, sort_keys=True))


def run(config, mode: str, workdir) -> None:
  """Runs ``mode`` after :func:`preflight`; bad input and known failures end in one line."""
  from diffusion_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  from diffusion_jax import storage  # pylint: disable=g-import-not-at-top
  try:
    preflight(config, mode, workdir)
  except storage.StorageFullError as e:   # config.json did not fit: not bad input
    fail(e, code=1)
  except (ValueError, OSError) as e:   # DatasetNotFoundError, WorkdirError, NoCheckpointError
    fail(e)
  try:
    if mode == 'train':
      from diffusion_jax import train  # pylint: disable=g-import-not-at-top
      train.train_and_evaluate(config, workdir)
    elif mode == 'distill':
      from diffusion_jax import distill  # pylint: disable=g-import-not-at-top
      distill.distill(config, workdir)
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
  config = selected_config()
  from diffusion_jax import host  # pylint: disable=g-import-not-at-top
  host.configure_cpu_devices(config)   # before JAX starts its backends
  initialize_distributed(config)
  run(config, FLAGS.mode, FLAGS.workdir)


def entry():
  """``python -m diffusion_jax.main``."""
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  entry()
