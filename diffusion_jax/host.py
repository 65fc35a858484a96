"""The host CPU as JAX devices: one CPU device per core, and XLA:CPU's kernel choice.

XLA:CPU parallelises each operation over its thread pool, but the operations of
a small U-Net are too small to split well: a digits train step keeps two cores
busy only ~1.5x of the time. Presenting the cores as separate JAX devices
lets the jitted step shard the batch over them (the same ``data`` mesh axis as
on a TPU pod), so each core runs its half of every operation. The result does
not depend on the device count: t, the noise and dropout are drawn for the
global batch (``train.train_step``). Measured by ``benchmarks/bench_peer.py``.

XLA:CPU in jaxlib 0.10 runs dots and convolutions through its experimental
YNNPACK fusions by default; on the U-Net's small, oddly shaped layers its
older Eigen kernels are faster (the same arithmetic; about 1.15x on the digits
step, ``benchmarks/bench_peer.py``), so :func:`configure_cpu` turns the YNN
fusions off there, unless ``XLA_FLAGS`` already says otherwise. The flag is
only passed to jaxlib versions known to have it (an unknown flag in
``XLA_FLAGS`` aborts the process).

Only the CPU backend is affected (``jax_num_cpu_devices``, ``xla_cpu_*``
flags); on GPU and TPU hosts the accelerators are the devices either way.
Both have to be set before JAX initialises its backends, so the entry points
call :func:`configure_cpu` first.
"""

import os

from absl import logging

# Set by the user: then the CPU device count is theirs (e.g. the multi-host
# rehearsal in launch/local_multihost.sh, or tests with 8 fake devices).
_USER_SETTINGS = ('xla_force_host_platform_device_count',)


def available_cores() -> int:
  """CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:   # not on Linux
    return os.cpu_count() or 1


def cpu_device_count(batch_size: int, requested: int = 0, cores: int | None = None) -> int:
  """How many CPU devices to use for a global batch.

  Args:
    batch_size: the global batch; it must split evenly over the devices.
    requested: ``training.cpu_devices``; > 0 is used as given, 0 means one
      device per core, reduced to the largest count that divides the batch.
    cores: available cores (default: :func:`available_cores`).
  """
  if requested > 0:
    return requested
  cores = cores or available_cores()
  return max(d for d in range(1, max(cores, 1) + 1) if batch_size % d == 0)


def user_set_cpu_devices() -> bool:
  """Whether XLA_FLAGS or JAX_NUM_CPU_DEVICES already fix the CPU device count."""
  flags = os.environ.get('XLA_FLAGS', '')
  return (any(s in flags for s in _USER_SETTINGS)
          or bool(os.environ.get('JAX_NUM_CPU_DEVICES')))


# jaxlib versions (major, minor) whose XLA:CPU has the YNN fusion flag, and its "off" value.
_YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type'
_YNN_OFF_VERSIONS = ((0, 10),)


def _jaxlib_version() -> tuple[int, ...]:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    return tuple(int(p) for p in metadata.version('jaxlib').split('.')[:2])
  except (metadata.PackageNotFoundError, ValueError):
    return ()


def configure_xla_cpu_flags() -> bool:
  """Adds ``--xla_cpu_experimental_ynn_fusion_type=`` (no YNN fusion types: off) to XLA_FLAGS.

  Only for the jaxlib versions in ``_YNN_OFF_VERSIONS`` and when the user has
  not set the flag. Returns whether it was added.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  if _YNN_FLAG in flags or _jaxlib_version() not in _YNN_OFF_VERSIONS:
    return False
  os.environ['XLA_FLAGS'] = (flags + ' ' + _YNN_FLAG + '=').strip()
  return True


def configure_cpu(config) -> int | None:
  """Everything this module sets, before JAX starts: kernel flags, then the device count."""
  configure_xla_cpu_flags()
  return configure_cpu_devices(config)


def configure_cpu_devices(config) -> int | None:
  """Sets ``jax_num_cpu_devices`` from ``training.cpu_devices`` before JAX starts.

  Does nothing (returns None) when the user set the count through the
  environment, for multi-host runs (their hosts' batches are set by the
  launcher), when ``training.cpu_devices < 0``, or when JAX's backends are
  already initialised. Returns the count it set otherwise.
  """
  tr = config.training
  requested = int(tr.get('cpu_devices', 0))
  if (requested < 0 or user_set_cpu_devices() or tr.get('distributed', False)
      or os.environ.get('JAX_COORDINATOR_ADDRESS')):
    return None
  import jax  # pylint: disable=g-import-not-at-top
  count = cpu_device_count(int(tr.batch_size), requested)
  try:
    jax.config.update('jax_num_cpu_devices', count)
  except RuntimeError as e:   # backends already initialised: keep what they have
    logging.info('CPU device count left as is: %s', e)
    return None
  return count
