"""Checkpoints: an orbax ``CheckpointManager`` in ``workdir/checkpoints``.

Each checkpoint holds two items: ``state`` (the whole train state: step,
params, optimiser state, EMA parameters, RNG, and the timestep-sampler history)
and ``data`` (the input iterator's position, JSON), so that a resumed run sees
exactly the batches it would have seen. Orbax writes into a temporary folder
and renames it when complete, so an interrupted save (even ``kill -9``) never
damages the checkpoints already on disk; leftover temporary folders are removed
when the next training run starts.

A save that fails for lack of space (:class:`Saver`) ends training with one
:class:`storage.StorageFullError`: the half-written ``<step>.orbax-checkpoint-tmp``
folder is removed, the earlier checkpoints stay as they were, and the message
names the newest intact one.

Damaged checkpoints (a truncated or missing file, bad metadata): restoring
falls back to the next older checkpoint, printing one line per damaged step.
Training moves a damaged checkpoint aside to ``checkpoints/damaged/<step>``
(never deletes it); sampling and evaluation leave the folder untouched.
"""

import time
from typing import Any, Callable, Optional

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from diffusion_jax import storage
from diffusion_jax import workdir as workdir_lib

DAMAGED_DIR = 'damaged'
TMP_MARKER = '.orbax-checkpoint-tmp'   # orbax's folder of a save in progress


class NoCheckpointError(FileNotFoundError):
  """The workdir holds no (readable) checkpoint; the message says what to do."""


class CheckpointMismatchError(ValueError):
  """A checkpoint was written by a different model or optimiser than the config describes."""


def checkpoint_dir(workdir) -> epath.Path:
  return workdir_lib.as_path(workdir) / 'checkpoints'


def _handlers() -> dict:
  return {'state': ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler()}


def create_manager(workdir, *, max_to_keep: int = 3,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """The manager of ``workdir/checkpoints``; ``read_only`` creates and cleans up nothing."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                         read_only=read_only,
                                         cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=('state', 'data'), item_handlers=_handlers())


def latest_step(workdir) -> Optional[int]:
  """The newest checkpoint step in ``workdir`` (None if none), creating nothing."""
  directory = checkpoint_dir(workdir)
  if not directory.exists():
    return None
  with create_manager(workdir, read_only=True) as manager:
    return manager.latest_step()


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: Any) -> None:
  """Saves (asynchronously); call ``manager.wait_until_finished()`` before exiting."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state if data_state is not None else {})), force=True)


def state_bytes(state: Any) -> int:
  """Bytes of ``state``'s arrays: about the size of one checkpoint on disk."""
  return int(sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)
                 if hasattr(x, 'shape')))


def _step_of(name: str) -> Optional[int]:
  """The step of a checkpoint folder name (``30``, ``30.orbax-checkpoint-tmp-1234``), else None."""
  head = name.split('.', 1)[0]
  return int(head) if head.isdigit() else None


def _folders(directory: epath.Path) -> list:
  return list(directory.iterdir()) if directory.exists() else []


def intact_steps(directory) -> list:
  """Steps of the complete checkpoint folders in ``directory`` (named by their step), sorted."""
  return sorted(int(p.name) for p in _folders(epath.Path(directory)) if p.name.isdigit())


def remove_partial_saves(directory, *, settle_s: float = 0.5) -> list:
  """Removes the folders of saves that never completed (``<step>.orbax-checkpoint-tmp*``).

  Call once no save is in flight. Tensorstore may still finish a write it had
  started into such a folder (and recreate it), so the folder is looked for
  again after ``settle_s`` seconds. Process 0 only.

  Returns:
    The steps whose folders were removed, sorted.
  """
  directory = epath.Path(directory)
  removed = set()
  if jax.process_index() != 0:
    return []
  for _ in range(3):
    partial = [p for p in _folders(directory)
               if TMP_MARKER in p.name and _step_of(p.name) is not None]
    if not partial:
      break
    for p in partial:
      p.rmtree(missing_ok=True)
      removed.add(_step_of(p.name))
    time.sleep(settle_s)
  return sorted(removed)


class Saver:
  """Asynchronous checkpoint saves of a training run; a full disk becomes one StorageFullError.

  ``save`` returns as soon as the arrays are copied to the host; orbax writes
  them in the background. A write that fails for lack of space surfaces at
  the next ``save`` or at ``close``: the saves in flight are waited for, the
  half-written folders removed (:func:`remove_partial_saves`), and
  :class:`storage.StorageFullError` raised, naming the step that failed, the
  space it needs and the newest intact checkpoint. Any other error passes
  unchanged.
  """

  def __init__(self, manager: ocp.CheckpointManager):
    self.manager = manager
    self._failed = None   # the StorageFullError already raised: close() then does nothing
    self._last_step = None
    self._needed = None

  def save(self, step: int, state: Any, data_state: Any) -> None:
    """Starts saving ``state`` (and the input position ``data_state``) as checkpoint ``step``."""
    self._last_step, self._needed = step, state_bytes(state)
    self._guard(save, self.manager, step, state, data_state)

  def close(self) -> None:
    """Completes the save in flight and closes the manager (nothing to do after a full disk)."""
    if self._failed is None:
      self._guard(self.manager.wait_until_finished)
      self.manager.close()

  def _guard(self, fn, *args) -> None:
    try:
      fn(*args)
    except Exception as e:  # pylint: disable=broad-except  (tensorstore's ValueError, OSError, ...)
      if not storage.is_out_of_space(e):
        raise
      self._failed = self._full_disk_error()
      raise self._failed from e

  def _full_disk_error(self) -> storage.StorageFullError:
    """Waits for the saves in flight, removes their partial folders, returns the one-line error."""
    storage.silence_async_noise()
    try:
      self.manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-except  (the error being reported)
      pass
    directory = epath.Path(self.manager.directory)
    failed = remove_partial_saves(directory)
    step = failed[0] if failed else self._last_step
    intact = [s for s in intact_steps(directory) if s < step]
    kept = (f'checkpoint {intact[-1]} is intact' if intact
            else 'no checkpoint was saved yet (the rerun starts from step 0)')
    figures = storage.space_figures(directory, self._needed)
    workdir = directory.parent
    return storage.StorageFullError(
        f'no space left in {workdir} while saving checkpoint {step}'
        + (f' ({figures})' if figures else '') + f'; {kept}; {storage.RERUN}.')


def _shapes(tree) -> list:
  """Sorted (shape, dtype) of a tree's array leaves: its signature, independent of key names."""
  leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, 'shape')]
  return sorted((tuple(x.shape), np.dtype(x.dtype).name) for x in leaves)


def _check_matches(manager: ocp.CheckpointManager, step: int, target_state: Any) -> None:
  """Raises CheckpointMismatchError when step's arrays are not the target's (another config)."""
  metadata = manager.item_metadata(step)['state']
  saved, wanted = _shapes(metadata), _shapes(target_state)
  if saved != wanted:
    diff = sorted(set(saved) ^ set(wanted))[:2]
    raise CheckpointMismatchError(
        f'checkpoint {manager.directory}/{step} holds {len(saved)} arrays, the config gives '
        f'{len(wanted)} (first differences, (shape, dtype): {diff}): it was written with another '
        'model/optimiser config. Drop --config so that the workdir\'s own config '
        f'({workdir_lib.as_path(manager.directory).parent / workdir_lib.CONFIG_FILE}) is used, '
        'or pass a new --workdir.')


def _restore_step(manager, step: int, target_state: Any, check_data: Optional[Callable]):
  """(state, data_state) of one step; raises on any damage."""
  _check_matches(manager, step, target_state)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target_state), data=ocp.args.JsonRestore()))
  state, data_state = restored['state'], restored['data']
  saved_step = getattr(state, 'step', None)
  if saved_step is not None and int(saved_step) != step:
    raise ValueError(f'the folder is named {step} but its state holds step {int(saved_step)}')
  if check_data is not None:
    check_data(data_state)
  return state, data_state


def _reason(error: Exception) -> str:
  text = ' '.join(str(error).split()) or type(error).__name__
  return f'{type(error).__name__}: {text[:300]}'


def _move_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves ``checkpoints/<step>`` to ``checkpoints/damaged/<step>`` (process 0; all hosts wait).

  Returns where it went, for the report line. A file system that cannot rename
  folders leaves it in place (the next run reports it again).
  """
  directory = epath.Path(manager.directory)
  target = directory / DAMAGED_DIR / str(step)
  where = f'moved to {target}'
  if jax.process_index() == 0:
    try:
      target.parent.mkdir(parents=True, exist_ok=True)
      if target.exists():  # damaged twice at the same step: keep both
        target = target.parent / f'{step}.{len(list(target.parent.iterdir()))}'
        where = f'moved to {target}'
      (directory / str(step)).rename(target)
    except OSError as e:
      where = f'left in place (moving it failed: {_reason(e)})'
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'checkpoint_moved_aside_{step}')
  manager.reload()
  return where


def restore_latest(manager: ocp.CheckpointManager, target_state: Any, *,
                   move_damaged: bool = True, check_data: Optional[Callable] = None,
                   say: Callable[[str], None] = print):
  """Restores the newest readable checkpoint onto ``target_state``'s structure and shardings.

  A checkpoint that fails to restore (missing or truncated files, bad metadata,
  a data position ``check_data`` rejects) is reported in one line (``say``),
  moved to ``checkpoints/damaged/<step>`` when ``move_damaged``, and the next
  older one is tried.

  Returns:
    (step, state, data_state), or None when the directory holds no checkpoint.

  Raises:
    NoCheckpointError: there are checkpoints but none is readable.
    CheckpointMismatchError: the newest checkpoint was written with another model config.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  damaged = []
  for step in steps:
    try:
      state, data_state = _restore_step(manager, step, target_state, check_data)
    except CheckpointMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (any damage: tensorstore, JSON, ...)
      storage.silence_async_noise()   # the failed read's late tensorstore callbacks
      damaged.append(step)
      where = f'; {_move_aside(manager, step)}' if move_damaged else ''
      say(f'warning: checkpoint step {step} is damaged ({_reason(e)}){where}.')
      continue
    logging.info('Restored checkpoint %s/%d', manager.directory, step)
    if damaged:
      say(f'Falling back to checkpoint step {step} (newer steps {damaged} are damaged).')
    return step, state, data_state
  if damaged:
    aside = (f'; they were moved to {epath.Path(manager.directory) / DAMAGED_DIR} and the next '
             'run starts from step 0' if move_damaged else '')
    raise NoCheckpointError(f'no readable checkpoint in {manager.directory}: steps {damaged} '
                            f'are damaged{aside}.')
  return None


def restore_params(workdir, target_state: Any, *, step: int | None = None):
  """The train state of a checkpoint (newest readable by default), for sampling and evaluation.

  Reads only: creates nothing in ``workdir`` and moves no damaged checkpoint.

  Raises:
    NoCheckpointError: ``workdir`` holds no (readable) checkpoint.
  """
  if not checkpoint_dir(workdir).exists():
    raise no_checkpoint_error(workdir)
  with create_manager(workdir, read_only=True) as manager:
    if step is not None:
      return step, _restore_step(manager, step, target_state, None)[0]
    restored = restore_latest(manager, target_state, move_damaged=False)
  if restored is None:
    raise no_checkpoint_error(workdir)
  return restored[0], restored[1]


def no_checkpoint_error(workdir) -> NoCheckpointError:
  """The error for a workdir without checkpoints: where we looked and what to do."""
  return NoCheckpointError(
      f'no checkpoint in {checkpoint_dir(workdir)}: train first with '
      f'`python -m diffusion_jax.main --workdir {workdir}` (the same --config).')
