"""One writer per workdir: the claim file ``DIR/claim.json``.

A run that writes into a workdir (``--mode train``, ``train.train_and_evaluate``,
``convert from-diffusers``) holds the workdir's claim while it writes
(:func:`hold`); a second writer finds it and stops with one line naming the
holder, having written nothing. Readers (``--mode sample|eval|inpaint|edit``,
``convert to-diffusers``) take no claim: they restore only finished
checkpoints (orbax renames a checkpoint into place when it is complete) and
never block the writer. The claim is JSON: the holder's host, pid, the pid's
start time (``/proc/<pid>/stat``), the host's boot id and pid namespace, when
the run started and last renewed the claim, its command line, a random token.

* Acquire (:func:`acquire`): written under a temporary name, then linked to
  ``claim.json`` with ``os.link``, which fails if the name exists: of runs
  started at the same instant exactly one wins (without hard links,
  ``O_EXCL``). These are the only calls on a workdir that bypass
  ``etils.epath``, which has no exclusive create; a remote workdir (``gs://``)
  is best effort: write if absent, read back after ``settle_s``, keep if ours.
* Live or expired (:func:`assess`): a claim of this host (same host name and
  pid namespace; host names are assumed unique among the machines sharing a
  workdir) lives while its process runs (the pid exists, is no zombie, started
  at the recorded time, on this boot), however old: the claim of a run killed
  by ``kill -9``, OOM or a reboot is taken over at once. Another host's
  process cannot be checked: its claim lives until ``timeout_s``
  (``training.claim_timeout_s``) after its last renewal (hosts' clocks are
  assumed to agree to well within that). A damaged claim file counts as
  renewed when it was last modified.
* Takeover: one run at a time (an exclusive ``.claim.json.takeover`` file)
  re-reads the claim and, if it is still the one judged expired, renames its
  own over it, so the file never disappears; one line says whose claim was taken over.
* Renew: a daemon thread rewrites the renewal time every ``min(60 s,
  timeout_s / 4)`` (``storage.write_file``) while the process lives, also
  through a long compile or a hung step: a live process may still write, so
  it keeps its claim (stop it to free the workdir). If the claim was taken
  over, it stops renewing and prints one warning line.
* Release: leaving :func:`hold` in any way the process sees (the end, an
  error, SIGTERM or Ctrl-C through the preemption handler, a full disk)
  deletes the claim if it still carries this run's token, never another's. A
  process killed outright leaves its claim, which expires as above.

On several hosts process 0 alone claims, for all; the others learn the
outcome (``multihost_utils.broadcast_one_to_all``) and fail the same way.
"""

import contextlib
import dataclasses
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Callable, Optional

from etils import epath

from diffusion_jax import storage
from diffusion_jax import workdir as workdir_lib

CLAIM_FILE = 'claim.json'
RENEW_EVERY_S = 60.0
_COMMAND_CHARS = 200   # of the holder's command line in the one-line error


class ClaimHeldError(workdir_lib.WorkdirError):
  """Another live run holds the workdir's claim; the message names it and what to do."""


class DamagedClaimError(ValueError):
  """``claim.json`` is not a claim's JSON; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds a claim: the content of ``claim.json``."""
  host: str
  pid: int
  started: float            # unix time the run claimed the workdir
  renewed: float            # unix time of the last renewal
  token: str                # random; tells this run's claim from any other
  command: str = ''
  pid_start: Optional[int] = None   # /proc/<pid>/stat starttime (clock ticks since boot)
  boot_id: Optional[str] = None     # /proc/sys/kernel/random/boot_id
  pid_ns: Optional[str] = None      # /proc/self/ns/pid (containers share host names)


# --- this process --------------------------------------------------------------------------


def _read_proc(path: str) -> Optional[str]:
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return None


def _proc_stat(pid: int) -> Optional[tuple]:
  """(state letter, start time in clock ticks since boot) of ``pid`` from /proc, or None."""
  text = _read_proc(f'/proc/{pid}/stat')
  if not text or ')' not in text:
    return None
  fields = text[text.rindex(')') + 2:].split()   # after "pid (comm) "; fields 3, 4, ...
  try:
    return fields[0], int(fields[19])             # field 3 (state) and field 22 (starttime)
  except (IndexError, ValueError):
    return None


def _boot_id() -> Optional[str]:
  text = _read_proc('/proc/sys/kernel/random/boot_id')
  return text.strip() if text else None


def _pid_namespace() -> Optional[str]:
  try:
    return os.readlink('/proc/self/ns/pid')
  except OSError:
    return None


def command_line() -> str:
  """This process's command line (``python -m diffusion_jax.main --workdir ...``)."""
  text = _read_proc('/proc/self/cmdline')
  args = text.rstrip('\0').split('\0') if text else [sys.executable, *sys.argv]
  return ' '.join(args)


def me(command: Optional[str] = None, now: Optional[float] = None) -> Holder:
  """A new claim of this process (a fresh token), started and renewed ``now``."""
  now = time.time() if now is None else now
  pid = os.getpid()
  stat = _proc_stat(pid)
  return Holder(host=socket.gethostname(), pid=pid, started=now, renewed=now,
                token=uuid.uuid4().hex,
                command=command_line() if command is None else command,
                pid_start=stat[1] if stat else None, boot_id=_boot_id(),
                pid_ns=_pid_namespace())


# --- the file ----------------------------------------------------------------------------------


def utc(t: float) -> str:
  """``2026-12-02 03:40:12 UTC``."""
  return time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(t))


def to_json(holder: Holder) -> bytes:
  """The claim file's bytes (with readable UTC times next to the numbers)."""
  fields = dataclasses.asdict(holder)
  fields.update(started_utc=utc(holder.started), renewed_utc=utc(holder.renewed))
  return (json.dumps(fields, indent=2, sort_keys=True) + '\n').encode()


def from_json(data: bytes) -> Holder:
  """The claim in ``data``; raises DamagedClaimError if it is not one."""
  try:
    fields = json.loads(data.decode())
  except (UnicodeDecodeError, ValueError) as e:
    raise DamagedClaimError(f'not JSON ({type(e).__name__})') from None
  if not isinstance(fields, dict):
    raise DamagedClaimError('not a JSON object')
  number, none = (int, float), type(None)
  kinds = {'host': (str, 'a string'), 'pid': (int, 'an integer'), 'started': (number, 'a number'),
           'renewed': (number, 'a number'), 'token': (str, 'a string'),
           'command': ((str, none), 'a string'), 'pid_start': ((int, none), 'an integer'),
           'boot_id': ((str, none), 'a string'), 'pid_ns': ((str, none), 'a string')}
  for key, (kind, words) in kinds.items():
    value = fields.get(key, '' if key == 'command' else None)
    if isinstance(value, bool) or not isinstance(value, kind):
      raise DamagedClaimError(f'field {key!r} missing or not {words}')
  if fields['pid'] <= 0 or not fields['token']:
    raise DamagedClaimError('pid must be positive and token non-empty')
  known = {f.name for f in dataclasses.fields(Holder)}
  holder = Holder(**{k: v for k, v in fields.items() if k in known})
  return dataclasses.replace(holder, command=holder.command or '')


def _read_bytes(path: epath.Path) -> Optional[bytes]:
  """The file's bytes, or None if it does not exist."""
  try:
    return path.read_bytes()
  except FileNotFoundError:
    return None


def _age_of_file(path: epath.Path, now: float) -> float:
  try:
    return max(0.0, now - float(path.stat().mtime))
  except (OSError, TypeError, ValueError):
    return 0.0


# --- live or expired ----------------------------------------------------------------------


def process_alive(pid: int, pid_start: Optional[int]) -> bool:
  """Whether process ``pid`` of this host runs and (if known) started at ``pid_start``."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # another user's process: it exists
    pass
  stat = _proc_stat(pid)
  if stat is None:   # no /proc: os.kill's answer
    return True
  state, start = stat
  if state in ('Z', 'X'):   # a zombie has exited; only its parent has not reaped it
    return False
  return pid_start is None or start == pid_start


def assess(holder: Holder, *, timeout_s: float, now: Optional[float] = None,
           here: Optional[Holder] = None) -> tuple:
  """(live, why): whether ``holder``'s claim is live, and the reason in words.

  ``here`` is this process's :func:`me` (the host, boot and pid namespace to
  compare with).
  """
  now = time.time() if now is None else now
  here = me(command='') if here is None else here
  same_host = holder.host == here.host and holder.pid_ns == here.pid_ns
  if same_host:
    if holder.boot_id and here.boot_id and holder.boot_id != here.boot_id:
      return False, f'host {holder.host} rebooted since, so pid {holder.pid} is gone'
    if not process_alive(holder.pid, holder.pid_start):
      return False, f'pid {holder.pid} on this host ({holder.host}) is no longer running'
    return True, 'it runs on this host'
  age = now - holder.renewed
  if age > timeout_s:
    return False, (f'it was last renewed {age:.0f} s ago, more than '
                   f'training.claim_timeout_s={timeout_s:g}')
  return True, f'another host; renewed {max(age, 0):.0f} s ago'


def held_message(path: epath.Path, holder: Holder, why: str, timeout_s: float) -> str:
  """The one line for a workdir that another live run holds: who, since when, what to do."""
  command = ' '.join(holder.command.split())
  command = command if len(command) <= _COMMAND_CHARS else command[:_COMMAND_CHARS] + '...'
  return (f'--workdir {path.parent} is in use by another run: host {holder.host}, pid '
          f'{holder.pid}, since {utc(holder.started)} ({why}; command: {command}). Wait for it '
          'to finish or stop that process, or use another --workdir; its claim '
          f'{path} is taken over as soon as that process is gone (a process on another host: '
          f'training.claim_timeout_s={timeout_s:g} s after its last renewal).')


# --- acquire, renew, release ---------------------------------------------------------------


def _is_local(path: epath.Path) -> bool:
  return '://' not in os.fspath(path)


def _create(path: epath.Path, mine: Holder, *, settle_s: float) -> bool:
  """Creates ``path`` holding ``mine`` if it does not exist; whether this call created it."""
  data = to_json(mine)
  if not _is_local(path):   # best effort: no exclusive create in epath
    if path.exists():
      return False
    storage.write_file(path, data)
    time.sleep(settle_s)
    current = _read_bytes(path)
    return current is not None and _token_of(current) == mine.token
  tmp = path.parent / f'.{path.name}.{mine.token}.tmp'
  try:
    try:
      tmp.write_bytes(data)
    except OSError as e:
      if storage.is_out_of_space(e):
        raise storage.file_full_error(path, len(data)) from e
      raise
    try:
      os.link(os.fspath(tmp), os.fspath(path))   # atomic; fails if path exists
    except FileExistsError:
      return False
    except OSError:   # no hard links (gcsfuse, some network file systems)
      return _create_exclusive(path, data)
    return True
  finally:
    tmp.unlink(missing_ok=True)


def _create_exclusive(path: epath.Path, data: bytes) -> bool:
  """``O_CREAT | O_EXCL`` (a local path; epath has no such mode). A reader may see the file
  empty for an instant: damaged and fresh, so held. Whether this call created it."""
  try:
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return False
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
  except BaseException:
    path.unlink(missing_ok=True)
    raise
  return True


def _token_of(data: bytes) -> Optional[str]:
  try:
    return from_json(data).token
  except DamagedClaimError:
    return None


ACQUIRE_ATTEMPTS, TAKEOVER_LOCK_S = 30, 30.0   # looks while others race; a dead taker's lock


def _take_over(path: epath.Path, stale: bytes, mine: Holder, *, settle_s: float) -> bool:
  """Replaces the expired claim ``stale`` by ``mine``: locally one run at a time (an exclusive
  ``.claim.json.takeover``), in one rename, so the file never disappears. Whether it worked."""
  if not _is_local(path):
    if _read_bytes(path) != stale:
      return False
    path.unlink(missing_ok=True)
    return _create(path, mine, settle_s=settle_s)
  lock = path.parent / f'.{path.name}.takeover'
  if not _create_exclusive(lock, mine.token.encode()):
    with contextlib.suppress(OSError):   # a taker that died holding it: it is milliseconds' work
      if time.time() - os.stat(os.fspath(lock)).st_mtime > TAKEOVER_LOCK_S:
        lock.unlink(missing_ok=True)
    return False
  try:
    if _read_bytes(path) != stale:   # renewed or replaced since it was judged
      return False
    storage.write_file(path, to_json(mine))   # a temporary file renamed over the claim
    return True
  finally:
    lock.unlink(missing_ok=True)


def acquire(workdir, timeout_s: float, *, command: Optional[str] = None,
            say: Callable[[str], None] = print, settle_s: float = 1.0,
            now: Callable[[], float] = time.time) -> 'Claim':
  """Claims ``workdir`` (creating the folder) or raises; see the module docstring.

  Raises:
    ClaimHeldError: another live run holds it (one line: who, since when, what to do).
    WorkdirError: the folder cannot be created or written.
    storage.StorageFullError: the disk is full.
  """
  folder = workdir_lib.create(workdir)
  path = folder / CLAIM_FILE
  here = me(command, now=now())
  for attempt in range(ACQUIRE_ATTEMPTS):
    if attempt:
      time.sleep(0.1)   # another run is creating or taking over the claim right now
    try:
      current = _read_bytes(path)
      if current is None:
        if _create(path, here, settle_s=settle_s):
          return Claim(path, here, timeout_s)
        continue
      try:
        holder = from_json(current)
      except DamagedClaimError as e:
        age = _age_of_file(path, now())
        if age <= timeout_s:
          raise ClaimHeldError(
              f'{path} is damaged ({e}) and was written {age:.0f} s ago, so a run may hold '
              f'--workdir {folder}; it is taken over once it is training.claim_timeout_s='
              f'{timeout_s:g} s old, or delete it if no run writes to {folder}.') from None
        taken, why = f'the damaged claim file {path}', f'{e}, written {age:.0f} s ago'
      else:
        live, why = assess(holder, timeout_s=timeout_s, now=now(), here=here)
        if live:
          raise ClaimHeldError(held_message(path, holder, why, timeout_s))
        taken = f'the claim of host {holder.host}, pid {holder.pid} (since {utc(holder.started)})'
      if _take_over(path, current, here, settle_s=settle_s):
        say(f'Taking over {taken} on {folder}: {why}.')
        return Claim(path, here, timeout_s)
    except (workdir_lib.WorkdirError, storage.StorageFullError):   # ClaimHeldError among them
      raise
    except OSError as e:
      if storage.is_out_of_space(e):
        raise storage.unwrapped_full_error(e) from e
      raise workdir_lib.unwritable_error(folder, e) from e
  raise ClaimHeldError(f'--workdir {folder}: other runs keep claiming it at this moment; '
                       'wait for them, or use another --workdir.')


class Claim:
  """A held claim: :meth:`renew`, :meth:`release`; as a context manager it renews in the background."""

  def __init__(self, path: epath.Path, holder: Holder, timeout_s: float):
    self.path = path
    self.holder = holder
    self.timeout_s = float(timeout_s)
    self.lost = False
    self._stop = threading.Event()
    self._thread = None

  def is_ours(self) -> bool:
    """Whether ``claim.json`` still carries this run's token."""
    data = _read_bytes(self.path)
    return data is not None and _token_of(data) == self.holder.token

  def renew(self, now: Optional[float] = None) -> bool:
    """Rewrites the renewal time; False (and nothing written) if the claim is no longer ours."""
    if not self.is_ours():
      self.lost = True
      return False
    self.holder = dataclasses.replace(self.holder, renewed=time.time() if now is None else now)
    storage.write_file(self.path, to_json(self.holder))
    return True

  def release(self) -> bool:
    """Deletes the claim if it is still ours (never another run's); whether it did."""
    if not self.is_ours():
      return False
    self.path.unlink(missing_ok=True)
    return True

  def renew_every_s(self) -> float:
    return min(RENEW_EVERY_S, self.timeout_s / 4)

  def _renew_loop(self, every_s: float) -> None:
    while not self._stop.wait(every_s):
      try:
        if not self.renew():
          print(f'warning: the claim {self.path} was taken over by another run; this run no '
                'longer renews it, and the two runs now write into the same workdir: stop '
                'one of them.', file=sys.stderr, flush=True)
          return
      except Exception:  # pylint: disable=broad-except  (a transient write error: next time)
        continue

  def start_renewing(self, every_s: Optional[float] = None) -> None:
    """Starts the daemon thread renewing every ``every_s`` (default :meth:`renew_every_s`)."""
    every_s = self.renew_every_s() if every_s is None else every_s
    self._thread = threading.Thread(target=self._renew_loop, args=(every_s,), daemon=True,
                                    name='workdir-claim')
    self._thread.start()

  def stop_renewing(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()

  def __enter__(self) -> 'Claim':
    self.start_renewing()
    return self

  def __exit__(self, *exc) -> None:
    self.stop_renewing()
    with contextlib.suppress(Exception):   # never hide the error the block is leaving with
      self.release()


def _agreed(acquire_fn: Callable[[], 'Claim'], workdir) -> Optional['Claim']:
  """``acquire_fn()`` on process 0; every process raises if it failed. None on the others."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return acquire_fn()
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  claim, error = None, None
  if jax.process_index() == 0:
    try:
      claim = acquire_fn()
    except Exception as e:  # pylint: disable=broad-except  (told to all, then raised)
      error = e
  ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
  if error is not None:
    raise error
  if not ok:
    raise ClaimHeldError(f'process 0 could not claim --workdir {workdir_lib.as_path(workdir)} '
                         '(its error line says why); this process stops too.')
  return claim


@contextlib.contextmanager
def hold(workdir, timeout_s: float, *, command: Optional[str] = None,
         say: Callable[[str], None] = print, settle_s: float = 1.0):
  """Holds ``workdir``'s claim for the ``with`` block: renewed in the background, then released.

  Every process of a run enters it; process 0 claims for all (the others get
  None). A writing mode wraps everything it writes::

      with claim.hold(workdir, config.training.claim_timeout_s):
        ...   # config.json, checkpoints, samples

  Raises:
    ClaimHeldError: another live run holds it (one line: who, since when, what to do).
    WorkdirError: the folder cannot be created or written.
    storage.StorageFullError: the disk is full.
  """
  claim = _agreed(lambda: acquire(workdir, timeout_s, command=command, say=say,
                                  settle_s=settle_s), workdir)
  if claim is None:
    yield None
    return
  with claim:
    yield claim
