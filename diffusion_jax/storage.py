"""Storage faults: a full disk (or quota) ends a run in one line, never with a half-written file.

* :func:`is_out_of_space`: whether an error (or one it was raised from) is a
  lack of space: ``ENOSPC``, ``EDQUOT``, or tensorstore's ``RESOURCE_EXHAUSTED``
  on writing (how orbax reports a full disk).
* :func:`write_file`: every file written into the workdir (``config.json``,
  PNG grids, ``.npz``, JSON, CSV) goes to a temporary name next to it and is
  then renamed, through ``etils.epath`` (so ``gs://`` works); a failed write
  removes the temporary file, so the final name holds the old content or the
  new, never a part. A full disk raises :class:`StorageFullError`, whose
  message is the one line ``main`` prints.
* :func:`free_bytes`: free space of a local workdir's disk (None for a bucket,
  which does not say); :func:`low_space_warning` is the line printed before
  training when less than one checkpoint fits.
* :func:`silence_async_noise`: orbax writes checkpoints in background threads;
  when the disk fills they log the same error dozens of times (each with a
  traceback), and tensorstore's late callbacks hit orbax's closed asyncio loop
  ("Event loop is closed"). Those reports are dropped; the main thread turns
  the error into one line.
"""

import errno
import logging
import os
import re
import shutil
import sys
from typing import Optional

from etils import epath

_OUT_OF_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_OUT_OF_SPACE_TEXT = re.compile(
    r"No space left on device|Disk quota exceeded|os_error_code='(28|122)'"
    r'|RESOURCE_EXHAUSTED: Error writing')
RERUN = 'free space and rerun the same command'


class StorageFullError(OSError):
  """A write into the workdir failed for lack of space; the message is one line: what to do."""


def is_out_of_space(error: Optional[BaseException]) -> bool:
  """Whether ``error``, its cause/context chain or a group member is a lack of space on writing.

  Matches ``OSError`` with errno ``ENOSPC`` / ``EDQUOT`` and the text of
  tensorstore's errors (``RESOURCE_EXHAUSTED: Error writing ...: No space left
  on device [os_error_code='28']``); not an out-of-memory ``RESOURCE_EXHAUSTED``.
  """
  seen, stack = set(), [error]
  while stack:
    e = stack.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    if isinstance(e, StorageFullError):
      return True
    if isinstance(e, OSError) and e.errno in _OUT_OF_SPACE_ERRNOS:
      return True
    if _OUT_OF_SPACE_TEXT.search(str(e)):
      return True
    stack.extend([e.__cause__, e.__context__, *getattr(e, 'exceptions', ())])
  return False


def mib(num_bytes: float) -> str:
  """``12.3 MiB`` (one decimal)."""
  return f'{num_bytes / 2**20:.1f} MiB'


def free_bytes(path) -> Optional[int]:
  """Free bytes on the local disk holding ``path`` (or its nearest existing folder); None for a URI.

  A bucket (``gs://...``) has no free-space figure, so None.
  """
  text = os.fspath(path)
  if '://' in text:
    return None
  folder = epath.Path(text)
  while not folder.exists() and folder.parent != folder:
    folder = folder.parent
  try:
    return shutil.disk_usage(os.fspath(folder)).free
  except OSError:
    return None


def space_figures(path, needed: Optional[int]) -> str:
  """``about 12.0 MiB needed, 0.1 MiB free`` (the parts that are known; '' if none)."""
  parts = [] if needed is None else [f'about {mib(needed)} needed']
  free = free_bytes(path)
  if free is not None:
    parts.append(f'{mib(free)} free')
  return ', '.join(parts)


def file_full_error(path, needed: Optional[int]) -> StorageFullError:
  """The one-line error for a file that did not fit: which file, the figures, what to do."""
  figures = space_figures(epath.Path(path).parent, needed)
  return StorageFullError(
      f'no space left while writing {path}' + (f' ({figures})' if figures else '')
      + f'; nothing partial is left under that name; {RERUN}.')


def unwrapped_full_error(error: OSError) -> StorageFullError:
  """The one-line error for an out-of-space ``OSError`` raised outside :func:`write_file`."""
  where = f' while writing {error.filename}' if error.filename else ''
  return StorageFullError(f'no space left{where} ({error.strerror or error}); {RERUN}.')


def _remove_quietly(path: epath.Path) -> None:
  try:
    if path.exists():
      path.unlink()
  except OSError:
    pass


def write_file(path, data: bytes) -> None:
  """Writes ``data`` to ``path`` all-or-nothing: a temporary sibling, then a rename (via epath).

  Creates the parent folder. On any failure the temporary file is removed and
  ``path`` keeps its previous content (or stays absent).

  Raises:
    StorageFullError: the disk or quota is full (one line naming ``path``).
  """
  path = epath.Path(path)
  tmp = path.parent / f'.{path.name}.tmp'
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(data)
    tmp.replace(path)
  except Exception as e:  # pylint: disable=broad-except  (epath backends raise many types)
    _remove_quietly(tmp)
    if is_out_of_space(e):
      raise file_full_error(path, len(data)) from e
    raise


def low_space_warning(workdir, needed: int) -> Optional[str]:
  """The warning line when ``workdir``'s disk has less free space than ``needed`` (else None).

  None for a bucket, whose free space is unknown.
  """
  free = free_bytes(workdir)
  if free is None or free >= needed:
    return None
  return (f'warning: {mib(free)} free in {workdir}, less than one checkpoint (about '
          f'{mib(needed)}); training starts anyway, but its first save will fail unless '
          'space is freed.')


# --- the background threads' reports of a full disk -----------------------------------------


class _DropOutOfSpace(logging.Filter):
  """Drops log records reporting a lack of space (orbax's and asyncio's background threads)."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    try:
      text = record.getMessage()
    except Exception:  # pylint: disable=broad-except  (a malformed record: keep it)
      return True
    return not (is_out_of_space(error) or _OUT_OF_SPACE_TEXT.search(text))


def _is_async_noise(unraisable) -> bool:
  """An unraisable error of orbax's asyncio machinery after a failed write (or at exit).

  "Event loop is closed": tensorstore completing a write after orbax closed
  its loop; ImportError at interpreter exit: orbax coroutines finalised
  while Python shuts down; any out-of-space error.
  """
  e = unraisable.exc_value
  if isinstance(e, RuntimeError) and str(e) == 'Event loop is closed':
    return True
  if isinstance(e, ImportError) and sys.is_finalizing():
    return True
  return is_out_of_space(e)


def silence_async_noise() -> None:
  """Drops the background threads' reports of a full disk and of orbax's closed loop (idempotent).

  Installs :class:`_DropOutOfSpace` on the ``absl`` (orbax) and ``asyncio``
  loggers and a ``sys.unraisablehook`` that drops :func:`_is_async_noise`;
  every other record and unraisable error passes.
  """
  for name in ('absl', 'asyncio'):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _DropOutOfSpace) for f in logger.filters):
      logger.addFilter(_DropOutOfSpace())
  previous = sys.unraisablehook
  if getattr(previous, '_drops_async_noise', False):
    return

  def hook(unraisable):
    if not _is_async_noise(unraisable):
      previous(unraisable)

  hook._drops_async_noise = True  # pylint: disable=protected-access
  sys.unraisablehook = hook
