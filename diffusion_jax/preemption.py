"""Preemption: SIGTERM (a cloud TPU VM or a spot GPU being reclaimed) or Ctrl-C saves a checkpoint, then stops.

Multi-host runs use JAX's preemption service through orbax
(``CheckpointManager.reached_preemption``), which needs ``jax.distributed``;
the single-process path, the README's, needs the signal handler below.
"""

import os
import signal

from absl import logging


class Preemption:
  """SIGTERM / SIGINT -> save a checkpoint, then exit cleanly.

  One process: a handler sets a flag that the loop checks after every call.
  Several processes: JAX's preemption service (``jax.distributed.initialize``
  starts it; it catches SIGTERM itself) picks a step that every host reaches,
  and ``CheckpointManager.reached_preemption`` (JAX's
  ``reached_preemption_sync_point``) is true on all hosts at that same call, so
  they save the same step together. Installing a Python SIGTERM handler there
  would replace JAX's, so only SIGINT (Ctrl-C) is handled, by re-sending it as
  SIGTERM to this process.
  """

  def __init__(self, manager, *, multi_host: bool):
    self.signal = None
    self._manager = manager
    self._multi_host = multi_host
    self._old = {}

  def __enter__(self):
    sigs = (signal.SIGINT,) if self._multi_host else (signal.SIGTERM, signal.SIGINT)
    for sig in sigs:
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave the handlers alone
        pass
    return self

  def _handle(self, signum, frame):
    if self.signal is not None:  # a second signal: stop at once
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum).name
    logging.warning('Received %s: saving a checkpoint and stopping.', self.signal)
    if self._multi_host:
      os.kill(os.getpid(), signal.SIGTERM)   # to JAX's preemption notifier

  def should_stop(self, call_index: int) -> bool:
    """Whether to save and stop after call ``call_index`` (0, 1, 2, ... on every host)."""
    if self._multi_host:
      return bool(self._manager.reached_preemption(call_index))
    return self.signal is not None

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
