r"""Entry point: ``python -m diffusion_jax.main --config configs/<name>.py --workdir DIR``.

Modes: ``train`` (default; resumes automatically from ``DIR/checkpoints``),
``sample`` (images from the EMA parameters of the latest checkpoint) and
``eval`` (bits/dim, rate-distortion, progressive figures, FID). With no
``--config`` the embedded digits configuration is used. Override any key with
``--config.section.key=value``.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from diffusion_jax import config_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_dict('default_config', config_lib.digits_config(),
                                'The embedded default (digits), used when --config is not given.')
config_flags.DEFINE_config_file('config', None, 'Path to a configs/<name>.py file.',
                                lock_config=True)
flags.DEFINE_string('workdir', 'runs/digits', 'Directory for checkpoints, samples and logs.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval'], 'What to do.')


def initialize_distributed(config) -> None:
  """``jax.distributed.initialize()`` for multi-host runs.

  Used when ``training.distributed`` is true or ``JAX_COORDINATOR_ADDRESS`` is
  set. On cloud TPU VMs and SLURM/Open MPI clusters JAX finds the coordinator
  itself; elsewhere set ``JAX_COORDINATOR_ADDRESS`` (host:port),
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` on every host.
  """
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax and grain are chatty at INFO
  config = FLAGS.config if FLAGS.config is not None else FLAGS.default_config
  initialize_distributed(config)
  logging.info('JAX process %d/%d, devices: %s', jax.process_index(), jax.process_count(),
               jax.devices())
  from diffusion_jax import data as data_lib
  from diffusion_jax import models
  try:  # a bad config or a missing data set: one clear line, no traceback
    config_lib.validate_config(config)
    data_lib.validate_data_config(config, num_devices=jax.device_count())
    models.create_model(config)
    if FLAGS.mode != 'sample':
      data_lib.get_source(config, config.data.train_split if FLAGS.mode == 'train'
                          else config.data.eval_split)
  except (ValueError, data_lib.DatasetNotFoundError) as e:
    sys.exit(f'error: {e}')
  if FLAGS.mode == 'train':
    from diffusion_jax import train
    train.train_and_evaluate(config, FLAGS.workdir)
  elif FLAGS.mode == 'sample':
    from diffusion_jax import evaluate
    evaluate.sample(config, FLAGS.workdir)
  else:
    from diffusion_jax import evaluate
    evaluate.evaluate(config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
