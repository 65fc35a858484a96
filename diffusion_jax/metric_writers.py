"""Training metrics off the device: fetched, checked finite, averaged, written as TensorBoard scalars.

:func:`fetch` brings a call's stacked per-step metrics to the host,
:func:`check_finite` is the non-finite guard, :func:`summarise` averages
the steps since the last log line and :class:`MetricWriter` writes them.
Not clu's ``metric_writers``: their TensorBoard writer is TensorFlow's
``tf.summary``, and this project installs no TensorFlow.

The scalars are written synchronously through ``etils.epath``, all-or-nothing per write.

One ``events.out.tfevents.<time>.<host>`` file per run in the logdir (the
format of tensorboardX / TensorFlow: length, masked CRC, ``Event`` proto,
masked CRC per record). Unlike tensorboardX's ``SummaryWriter`` there is no
background thread, so a full disk is an error of the call that wrote, never
a dead thread and a queue that blocks:

* a local logdir is appended to; when an append fails the file is cut back to
  its last complete record (no partial record is left);
* a URI logdir (``gs://...``), whose objects cannot be appended to, is
  rewritten whole through :func:`storage.write_file` (temporary name, then
  rename); scalars only, kilobytes to a few megabytes.

A full disk raises :class:`storage.StorageFullError` naming the file.
"""

import socket
import struct
import time

from etils import epath
import jax
import numpy as np
from tensorboardX.proto import event_pb2
from tensorboardX.proto import summary_pb2
from tensorboardX.record_writer import masked_crc32c

from diffusion_jax import storage


def record(event: event_pb2.Event) -> bytes:
  """One TFRecord: length, its masked CRC-32C, the serialised event, its masked CRC-32C."""
  data = event.SerializeToString()
  header = struct.pack('<Q', len(data))
  return (header + struct.pack('<I', masked_crc32c(header)) + data
          + struct.pack('<I', masked_crc32c(data)))


def scalars_event(step: int, scalars: dict, wall_time: float) -> event_pb2.Event:
  """An ``Event`` holding one simple-value summary per scalar."""
  values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
  return event_pb2.Event(wall_time=wall_time, step=int(step),
                         summary=summary_pb2.Summary(value=values))


class EventFile:
  """An events file that holds only complete records, whatever fails while it is written."""

  def __init__(self, logdir):
    logdir = epath.Path(logdir)
    now = time.time()
    self.path = logdir / f'events.out.tfevents.{int(now):010d}.{socket.gethostname()}'
    self._remote = '://' in str(logdir)
    self._length = 0          # bytes of complete records on disk
    self._content = b''       # the whole file (kept for URI logdirs only)
    storage.write_file(self.path, b'')
    self.append(record(event_pb2.Event(wall_time=now, file_version='brain.Event:2')))

  def append(self, data: bytes) -> None:
    """Appends complete records; on failure the file keeps only the records before them."""
    if self._remote:
      storage.write_file(self.path, self._content + data)
      self._content += data
    else:
      self._append_local(data)
    self._length += len(data)

  def _append_local(self, data: bytes) -> None:
    try:
      with self.path.open('ab') as f:
        f.write(data)
    except Exception as e:  # pylint: disable=broad-except
      self._cut_back()
      if storage.is_out_of_space(e):
        raise storage.file_full_error(self.path, len(data)) from e
      raise

  def _cut_back(self) -> None:
    """Truncates a local file to its complete records (frees what a failed append wrote)."""
    try:
      with self.path.open('ab') as f:   # epath opens 'r', 'w' or 'a'; append mode may truncate
        f.truncate(self._length)
    except OSError:
      pass


class MetricWriter:
  """TensorBoard scalars from process 0 only (other processes write nothing)."""

  def __init__(self, logdir):
    self._file = EventFile(logdir) if jax.process_index() == 0 else None

  def write(self, step: int, scalars: dict) -> None:
    if self._file is not None:
      self._file.append(record(scalars_event(step, scalars, time.time())))

  def close(self) -> None:
    """Nothing is buffered: every ``write`` is complete on return."""


def check_finite(history: list, step: int):
  """The non-finite guard: a FloatingPointError naming the first step whose loss or gradient was not finite."""
  if any(m['finite'] < 1 for m in history):
    bad = next(i for i, m in enumerate(history) if m['finite'] < 1)
    raise FloatingPointError(
        f'Non-finite loss or gradient at step {step - len(history) + bad + 1}; stopping. '
        'The state was not updated by that step and nothing non-finite was saved. '
        'Try a lower optim.lr, a smaller optim.grad_clip, or model.dtype=float32.')


def summarise(history: list) -> dict:
  """The mean of every metric over the steps since the last log line (``finite`` left out)."""
  return {k: float(np.mean([m[k] for m in history])) for k in history[0] if k != 'finite'}


def fetch(pending: list) -> list:
  """Per-step metric dicts (device arrays, stacked over steps_per_call) -> list of floats."""
  out = []
  for m in jax.device_get(pending):
    n = len(next(iter(m.values())))
    out.extend({k: float(v[i]) for k, v in m.items()} for i in range(n))
  return out
