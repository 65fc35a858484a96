"""Checkpoints: an orbax ``CheckpointManager`` in ``workdir/checkpoints``.

Each checkpoint holds two items: ``state`` (the whole train state: step,
params, optimiser state, EMA parameters, RNG, and the timestep-sampler history)
and ``data`` (the input iterator's position, JSON), so that a resumed run sees
exactly the batches it would have seen. Orbax writes into a temporary folder
and renames it when complete, so an interrupted save never damages the
checkpoints already on disk.
"""

import os
from typing import Any

from absl import logging
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def create_manager(workdir: str, *, max_to_keep: int = 3) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=('state', 'data'))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: Any) -> None:
  """Saves (asynchronously); call ``manager.wait_until_finished()`` before exiting."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state if data_state is not None else {})), force=True)


def restore_latest(manager: ocp.CheckpointManager, target_state: Any):
  """Restores the latest checkpoint onto ``target_state``'s structure and shardings.

  Returns:
    (step, state, data_state), or None when the directory holds no checkpoint.
  """
  step = manager.latest_step()
  if step is None:
    return None
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target_state), data=ocp.args.JsonRestore()))
  logging.info('Restored checkpoint %s/%d', manager.directory, step)
  return step, restored['state'], restored['data']


def restore_params(workdir: str, target_state: Any, *, step: int | None = None):
  """The train state of a checkpoint (latest by default), for sampling and evaluation."""
  directory = checkpoint_dir(workdir)
  with ocp.CheckpointManager(directory, item_names=('state', 'data')) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(
          f'No checkpoint in {directory}: train first with '
          f'`python -m diffusion_jax.main --workdir {workdir}` (the same --config).')
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target_state)))
  return step, restored['state']
