"""The workdir: any path ``etils.epath`` accepts (a local folder, ``gs://bucket/run``, ...).

Everything written into a workdir goes through ``epath`` (orbax's own path
library), never through ``open``, ``os.path`` or ``os.makedirs``, so that a
remote workdir works exactly like a local one (the one exception: the claim's
exclusive create on a local disk, in ``claim.py``). Layout::

  DIR/claim.json       while a run writes (trains) here: who (host, pid, since when); see claim.py
  DIR/config.json      the resolved config (written before training starts)
  DIR/checkpoints/     orbax, one folder per step; damaged ones in checkpoints/damaged/<step>
  DIR/tensorboard/     event files
  DIR/samples/         PNG grids and .npz files
  DIR/eval/            evaluation outputs
"""

from etils import epath

from diffusion_jax import storage

CONFIG_FILE = 'config.json'


class WorkdirError(OSError):
  """The workdir cannot be used (not writable, not a folder, ...); the message says why."""


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


def unwritable_error(path, error: Exception) -> WorkdirError:
  """The one-line error for a workdir that cannot be created or written."""
  return WorkdirError(f'cannot write to --workdir {path} ({type(error).__name__}: '
                      f'{_first_line(error)}); pass a writable folder (local or gs://...).')


def _first_line(error: Exception) -> str:
  text = str(error).strip() or type(error).__name__
  return text.splitlines()[0]
