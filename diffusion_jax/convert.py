r"""Converting between diffusers ``UNet2DModel`` folders and our workdirs.

    python -m diffusion_jax.convert from-diffusers DIR --workdir W [--config configs/cifar10.py]
    python -m diffusion_jax.convert to-diffusers --workdir W OUT [--config configs/cifar10.py]

``from-diffusers`` reads a diffusers folder in the DDPM layout (e.g. a
downloaded ``google/ddpm-cifar10-32``; see :mod:`diffusion_jax.interop`) and
writes a step-0 checkpoint into ``W/checkpoints`` in the format of
:mod:`diffusion_jax.train` (items ``state``, a ``TrainState`` whose ``params``
and ``ema_params`` are the imported weights, and ``data``), plus
``W/config.json``. ``python -m diffusion_jax.main --workdir W --mode sample``
and ``--mode eval`` then run on W unchanged (without ``--config`` they use
``W/config.json``). The model section comes from the diffusers config, every
other setting from ``--config`` (default: the paper's, ``config_lib.base_config``).

``to-diffusers`` exports the EMA parameters of W's latest checkpoint as a
diffusers folder that ``UNet2DModel.from_pretrained(OUT)`` loads; the config
is ``--config`` if given, else ``W/config.json``.

A bad folder or config stops with one line ``error: ...`` and exit status 2, and
so does ``from-diffusers`` into a workdir that another run is writing (it
claims the workdir: :mod:`diffusion_jax.claim`); ``to-diffusers`` only reads
finished checkpoints and works while the workdir is being trained.
"""

import functools
import sys

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
from ml_collections import config_flags

from diffusion_jax import checkpoint as ckpt
from diffusion_jax import claim
from diffusion_jax import config_lib
from diffusion_jax import interop
from diffusion_jax import models
from diffusion_jax import runner
from diffusion_jax import train_state
from diffusion_jax import workdir as workdir_lib

COMMANDS = ('from-diffusers', 'to-diffusers')
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'configs/<name>.py: the settings besides the model '
    '(default: the paper\'s for from-diffusers, W/config.json for to-diffusers).',
    lock_config=False)
flags.DEFINE_string('workdir', None, 'The workdir written (from-diffusers) or read (to-diffusers).')


def write_config(config, workdir) -> epath.Path:
  """``workdir/config.json``: the resolved config, as ``--mode train`` writes it (temporary file, rename)."""
  path = workdir_lib.prepare(workdir, config.to_json_best_effort(indent=2, sort_keys=True))
  return path / workdir_lib.CONFIG_FILE


def read_config(workdir) -> ml_collections.ConfigDict:
  """The config a workdir was written with (``workdir/config.json``, completed with the defaults)."""
  return workdir_lib.read_config(workdir)


def initial_state(config, params):
  """A ``train_state.TrainState`` at step 0 whose ``params`` and ``ema_params`` are ``params``.

  It has the structure ``train.setup`` restores onto (``jax.eval_shape`` of
  ``train_state.create_train_state``, replicated over ``runner.make_mesh()``), with
  the optimiser's initial state for ``params`` and zeros elsewhere (the
  importance sampler's empty loss history); nothing is initialised randomly,
  so nothing large is compiled.
  """
  model = models.create_model(config)
  optimizer = train_state.create_optimizer(config)
  key = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(
      functools.partial(train_state.create_train_state, config, model, optimizer), key)
  if jax.tree.structure(params) != jax.tree.structure(abstract.params):
    raise ValueError('the imported parameters do not have the structure of the model.')
  replicated = NamedSharding(runner.make_mesh(), P())
  params = jax.device_put(params, replicated)
  zeros = jax.jit(lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract),
                  out_shardings=replicated)()
  return zeros.replace(params=params, ema_params=params,
                       opt_state=jax.jit(optimizer.init, out_shardings=replicated)(params),
                       rng=jax.device_put(jax.random.split(key, 3)[2], replicated))


def from_diffusers(model_dir, workdir, base=None) -> int:
  """Imports a diffusers folder into ``workdir`` as a step-0 checkpoint; returns the step (0).

  The checkpoint is the one training writes (items ``state`` and ``data``),
  so ``--mode sample`` / ``--mode eval`` restore it, and ``--mode train``
  fine-tunes from it.
  """
  config, params = interop.load_diffusers_unet(model_dir, base)
  config_lib.validate_config(config)
  state = initial_state(config, params)
  with claim.hold(workdir, config.training.claim_timeout_s):   # a writer: one per workdir
    if jax.process_index() == 0:
      write_config(config, workdir)
    manager = ckpt.create_manager(str(workdir), max_to_keep=config.training.keep_checkpoints)
    ckpt.save(manager, 0, state, None)
    manager.wait_until_finished()
    manager.close()
  return 0


def to_diffusers(workdir, out_dir, config=None) -> epath.Path:
  """Exports the EMA parameters of ``workdir``'s latest checkpoint to ``out_dir``."""
  from diffusion_jax.evaluation import runtime as eval_runtime  # pylint: disable=g-import-not-at-top
  config = (config if config is not None else read_config(workdir)).copy_and_resolve_references()
  config.sampling.use_ema = True
  interop.diffusers_unet_config(config)   # fails early for a model diffusers cannot express
  _, _, _, _, params = eval_runtime.restore_for_eval(config, str(workdir))
  return interop.save_diffusers_unet(config, jax.device_get(params), out_dir)


def main(argv):
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  args = argv[1:]
  try:
    if not args or args[0] not in COMMANDS or len(args) != 2:
      raise ValueError(f'usage: python -m diffusion_jax.convert {{{"|".join(COMMANDS)}}} '
                       'DIR --workdir W [--config CONFIG]; got arguments '
                       f'{" ".join(args) or "(none)"}.')
    if not FLAGS.workdir:
      raise ValueError('--workdir is required.')
    command, folder = args
    if command == 'from-diffusers':
      step = from_diffusers(folder, FLAGS.workdir, FLAGS.config)
      print(f'Wrote checkpoint step {step} (params and EMA = the weights of {folder}) and '
            f'config.json into {FLAGS.workdir}', flush=True)
    else:
      out = to_diffusers(FLAGS.workdir, folder, FLAGS.config)
      print(f'Wrote the EMA parameters of {FLAGS.workdir} as a diffusers UNet2DModel: {out}',
            flush=True)
  except (ValueError, FileNotFoundError, claim.ClaimHeldError) as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
