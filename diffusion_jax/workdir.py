"""The workdir: any path ``etils.epath`` accepts (a local folder, ``gs://bucket/run``, ...).

Everything written into a workdir goes through ``epath`` (orbax's own path
library), never through ``open``, ``os.path`` or ``os.makedirs``, so that a
remote workdir works exactly like a local one (the one exception: the claim's
exclusive create on a local disk, in ``claim.py``). Layout::

  DIR/claim.json       while a run writes (trains) here: who (host, pid, since when); see claim.py
  DIR/config.json      the resolved config (written before training starts): the
                       model's config, read back by :func:`read_config`
  DIR/checkpoints/     orbax, one folder per step; damaged ones in checkpoints/damaged/<step>
  DIR/tensorboard/     event files
  DIR/samples/         PNG grids and .npz files
  DIR/eval/            evaluation outputs
"""

import json

from etils import epath
import ml_collections

from diffusion_jax import config_lib
from diffusion_jax import storage

CONFIG_FILE = 'config.json'


class WorkdirError(OSError):
  """The workdir cannot be used (not writable, not a folder, ...); the message says why."""


class WorkdirConfigError(ValueError):
  """A workdir's ``config.json`` is missing or damaged; the one-line message names the file."""


def as_path(workdir) -> epath.Path:
  """``workdir`` as an ``epath.Path``: local paths absolute (``~`` expanded), URIs as given."""
  path = epath.Path(workdir)
  if '://' in str(workdir):   # gs://, s3://, ...: already absolute, nothing local to expand
    return path
  return path.expanduser().absolute()


def write_text(path: epath.Path, text: str) -> None:
  """Writes ``text`` to ``path`` via a temporary file and a rename (:func:`storage.write_file`)."""
  storage.write_file(path, text.encode())


def create(workdir) -> epath.Path:
  """The workdir as an absolute ``epath.Path``, created if needed; WorkdirError if it cannot be."""
  path = as_path(workdir)
  try:
    if path.exists() and not path.is_dir():
      raise WorkdirError(f'--workdir {path} is a file, not a folder; pass a folder path.')
    path.mkdir(parents=True, exist_ok=True)
  except WorkdirError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (epath backends raise many types)
    raise unwritable_error(path, e) from e
  return path


def prepare(workdir, config_json: str) -> epath.Path:
  """Creates the workdir if needed and writes ``config.json``; raises WorkdirError if it cannot.

  A full disk raises :class:`storage.StorageFullError` instead (the folder is usable).

  Returns:
    The workdir as an absolute ``epath.Path``.
  """
  path = create(workdir)
  try:
    write_text(path / CONFIG_FILE, config_json)
  except storage.StorageFullError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (epath backends raise many types)
    raise unwritable_error(path, e) from e
  return path


def read_config(workdir) -> ml_collections.ConfigDict:
  """The workdir's ``config.json`` as a locked ConfigDict (completed by ``config_lib.complete``).

  Raises WorkdirConfigError (one line naming the file) when it is missing,
  unreadable, not JSON, or not a config (a wrong shape, an unknown key, a
  value of the wrong type).
  """
  path = as_path(workdir) / CONFIG_FILE
  try:
    if not path.exists():
      raise WorkdirConfigError(f'{path} does not exist')
    text = path.read_text()
  except WorkdirConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (epath backends raise many types)
    raise WorkdirConfigError(f'cannot read {path} ({type(e).__name__}: {_first_line(e)})') from e
  try:
    values = json.loads(text)
  except ValueError as e:
    raise WorkdirConfigError(f'{path} is damaged: not JSON ({_first_line(e)})') from e
  try:
    return config_lib.complete(values)
  except ValueError as e:
    raise WorkdirConfigError(f'{path} is damaged: {_first_line(e)}') from e


def unwritable_error(path, error: Exception) -> WorkdirError:
  """The one-line error for a workdir that cannot be created or written."""
  return WorkdirError(f'cannot write to --workdir {path} ({type(error).__name__}: '
                      f'{_first_line(error)}); pass a writable folder (local or gs://...).')


def _first_line(error: Exception) -> str:
  text = str(error).strip() or type(error).__name__
  return text.splitlines()[0]

