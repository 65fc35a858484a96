"""The host CPU as JAX devices: one CPU device per core.

XLA:CPU parallelises each operation over its thread pool, but the operations of
a small U-Net are too small to split well: a digits train step keeps two cores
busy only ~1.5x of the time. Presenting the cores as separate JAX devices
lets the jitted step shard the batch over them (the same ``data`` mesh axis as
on a TPU pod), so each core runs its half of every operation. The result does
not depend on the device count: t, the noise and dropout are drawn for the
global batch (``train.train_step``). Measured by ``benchmarks/bench_peer.py``.

Compile options are chosen per kind of program (:func:`cpu_compiler_options`).
The train step turns jaxlib 0.10's YNNPACK fusions off
(``xla_cpu_experimental_ynn_fusion_type=''``, a per-compile option). That was
reported 1.1-1.3x faster on an AVX-512 machine, and measured as fast as the
default on another. It computes the default's step to float32 rounding
(``tests/test_train.py``). Samplers keep them: with them off, XLA:CPU executes
the dots itself, and those dots inside a ``while`` loop race when two CPU
devices run at once, giving wrong images (``benchmarks/ynn_repro.py``,
``tests/test_host.py::test_two_cpu_devices_sample_what_one_device_samples``).
On a device per core the train step also keeps its loop fusions whole
(:data:`SERIAL_LOOPS`): split into pieces for the shared thread pool, they
waited behind the other device's work.

Only the CPU backend is affected (``jax_num_cpu_devices``); on GPU and TPU
hosts the accelerators are the devices either way. The count has to be set
before JAX initialises its backends, so the entry points call
:func:`configure_cpu_devices` first.

The command line's program also tells glibc's ``malloc`` to keep the step's
temporary buffers between calls instead of mapping them fresh each time
(:func:`configure_malloc`, ``training.cpu_malloc``), and has each device
compute its operations on one thread (:func:`configure_cpu_op_threads`,
``training.cpu_op_threads``), again before JAX starts.
"""

import functools
import os
import re

from absl import logging

# Set by the user: then the CPU device count is theirs (e.g. the multi-host
# rehearsal in launch/local_multihost.sh, or tests with 8 fake devices).
_USER_FLAG = 'xla_force_host_platform_device_count'


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


def user_cpu_devices() -> int | None:
  """The CPU device count the user fixed through the environment, else None.

  ``JAX_NUM_CPU_DEVICES``, then ``--xla_force_host_platform_device_count`` in
  ``XLA_FLAGS``.
  """
  count = os.environ.get('JAX_NUM_CPU_DEVICES', '').strip()
  if count.isdigit():
    return int(count)
  flag = re.search(_USER_FLAG + r'=(\d+)', os.environ.get('XLA_FLAGS', ''))
  return int(flag.group(1)) if flag else None


def user_set_cpu_devices() -> bool:
  """Whether XLA_FLAGS or JAX_NUM_CPU_DEVICES already fix the CPU device count."""
  return user_cpu_devices() is not None


def configure_cpu_devices(config) -> int | None:
  """Sets ``jax_num_cpu_devices`` from ``training.cpu_devices`` before JAX starts.

  Does nothing (returns None) when the user set the count through the
  environment, for multi-host runs (their hosts' batches are set by the
  launcher), when ``training.cpu_devices < 0``, or when JAX's backends are
  already initialised. Returns the count it set otherwise.
  """
  tr = config.training
  requested = int(tr.cpu_devices)
  if (requested < 0 or user_set_cpu_devices() or tr.distributed
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


# XLA:CPU's LLVM optimisation level (``xla_backend_optimization_level``; XLA's
# default is 3). Most of a small U-Net's compile is LLVM optimising hundreds of
# small fusions, while its run time is in the convolution and matmul kernels,
# which are library code that LLVM does not compile.
CPU_OPT_LEVEL_RUN_ONCE = 0   # programs that run once (the initial state)
CPU_OPT_LEVEL = 1            # programs that run many times (the train step, samplers)


# Per kind of program, options beyond the optimisation level, each kept only where
# its results equal those of XLA's defaults (tests/test_train.py, tests/test_host.py).
# YNNPACK fusions off (jaxlib >= 0.10): the train step computes the same step, as
# fast or faster (benchmarks/RESULTS.md); a sampler on two devices did not
# (docs/performance.md, benchmarks/ynn_repro.py), so samplers and evaluation
# passes keep them.
YNN_OFF = {'xla_cpu_experimental_ynn_fusion_type': ''}
CPU_KIND_OPTIONS = {'train_step': YNN_OFF, 'sampler': {}, 'evaluation': {}, 'other': {}}

# Loop fusions left whole (no ``outer_dimension_partitions``): XLA:CPU's parallel
# task assignment splits large elementwise fusions into pieces for the thread
# pool that all of a process's CPU devices share. Where every core is a device
# of its own (single_thread_ops), one device's pieces only wait behind the other
# devices' work: the digits train step on 2 devices ran 10-17% faster with the
# pass off and computed the same bits (benchmarks/RESULTS.md, tests/test_host.py).
# The train step only, and only then; with fewer devices than cores the pieces
# are what keeps the other cores busy.
SERIAL_LOOPS = {'xla_disable_hlo_passes': 'cpu-parallel-task-assigner'}


@functools.cache
def xla_accepts(name: str, value) -> bool:
  """Whether this jaxlib's XLA:CPU knows the compile option ``name`` (compiles a tiny program)."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    one = jax.device_put(1.0, jax.devices('cpu')[0])
    jax.jit(lambda x: x + 1).lower(one).compile(compiler_options={name: value})
  except Exception:  # pylint: disable=broad-except
    return False
  return True


def cpu_compiler_options(devices, *, runs_once: bool = False,
                         kind: str = 'other') -> dict | None:
  """XLA compile options for a ``kind`` of program on ``devices`` (a Mesh or a list of devices).

  On the CPU, a lower LLVM optimisation level: for the digits README job the
  train step compiles in 28-33 s instead of 33-43 s (fresh processes) and runs
  as fast (A/B in one process: medians within 5% either way,
  ``benchmarks/ab_compile_options.py``), the DDIM-100 sampler in ~3.7 s
  instead of 5-6 s. Level 0 would double the step's run time, so only the
  initial state (``runs_once``) uses it. No fast-math is involved: the
  results equal those of XLA's default options up to float32 rounding (the
  digits step and the initial state bit for bit; a 1-ulp difference in a
  few optimiser moments was seen on a smaller U-Net; ``tests/test_train.py``,
  ``tests/test_sampling.py``). ``kind`` ('train_step', 'sampler',
  'evaluation' or 'other') adds :data:`CPU_KIND_OPTIONS` that this jaxlib
  knows, and a train step on a device per core :data:`SERIAL_LOOPS`. On GPU
  and TPU, None (XLA's defaults).
  """
  if kind not in CPU_KIND_OPTIONS:
    raise ValueError(f'kind={kind!r} is not supported; allowed values: '
                     + ', '.join(CPU_KIND_OPTIONS))
  devices = getattr(devices, 'devices', devices)   # a Mesh: its device array
  devices = list(getattr(devices, 'flat', devices))
  if devices[0].platform != 'cpu':
    return None
  options = {'xla_backend_optimization_level':
             CPU_OPT_LEVEL_RUN_ONCE if runs_once else CPU_OPT_LEVEL}
  extra = dict(CPU_KIND_OPTIONS[kind])
  if kind == 'train_step' and single_thread_ops(len(devices)):
    extra.update(SERIAL_LOOPS)
  options.update({k: v for k, v in extra.items() if xla_accepts(k, v)})
  return options


# --- one thread per CPU device -------------------------------------------------------------

CPU_OP_THREADS = ('device', 'pool')   # training.cpu_op_threads
MULTI_THREAD_OPS_FLAG = 'xla_cpu_multi_thread_eigen'


def single_thread_ops(devices: int, cores: int | None = None) -> bool:
  """Whether ``devices`` CPU devices should each compute their operations on one thread.

  True when every core is a device of its own (at least two): the devices
  then keep the cores busy, and an operation split over the shared pool only
  makes the devices wait for each other's pieces.
  """
  cores = cores or available_cores()
  return devices >= max(2, cores)


def configure_cpu_op_threads(config) -> bool:
  """Each CPU device computes its convolutions and dots on one thread; before JAX starts.

  XLA:CPU splits a convolution or a dot over one thread pool that all of a
  process's CPU devices share (``--xla_cpu_multi_thread_eigen``, on by
  default). With one device per core (:func:`configure_cpu_devices`) both
  devices' pieces queue on the same threads, and each device waits for
  pieces that the other device's work holds up: on 2 AVX-512 cores the
  digits train step took a median 102.3 ms with the pool and 90.4 ms with
  one thread per device, in alternating fresh processes
  (``benchmarks/bench_threads.py``). Four train steps compute the same
  numbers to float32 rounding, and samplers draw the same images
  (``tests/test_host.py``).

  Called by the command line's program next to :func:`configure_cpu_devices`:
  XLA reads the flag when its CPU backend starts, so it goes into
  ``XLA_FLAGS`` first. Does nothing (returns False) with
  ``training.cpu_op_threads='pool'``, when JAX will not run on the CPU, when
  the devices are fewer than the cores (:func:`single_thread_ops`), when
  ``XLA_FLAGS`` already sets the flag, or once JAX's backends have started.
  """
  if config.training.cpu_op_threads != 'device' or not cpu_backend_expected():
    return False
  flags = os.environ.get('XLA_FLAGS', '')
  if MULTI_THREAD_OPS_FLAG in flags or not single_thread_ops(planned_cpu_devices(config)):
    return False
  from jax._src import xla_bridge   # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    logging.info('CPU op threads left as they are: JAX has started its backends')
    return False
  os.environ['XLA_FLAGS'] = f'{flags} --{MULTI_THREAD_OPS_FLAG}=false'.strip()
  return True


# --- glibc malloc for the CPU training program ---------------------------------------------

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8
THREAD_HEAP_BYTES = 64 << 20   # glibc's largest thread-arena heap (HEAP_MAX_SIZE, 64-bit)
CPU_MALLOCS = ('reuse', 'default')   # training.cpu_malloc


def reuse_malloc_settings(devices: int, cores: int | None = None) -> dict:
  """``mallopt`` values under which a CPU step's temporary buffers are reused, not re-faulted.

  XLA:CPU allocates a train step's temporaries (116 MB for the digits step on
  one device) with ``malloc`` on every call. Above glibc's largest ``mmap``
  threshold (32 MiB) that is a fresh ``mmap``, unmapped when
  the call ends, so the kernel faults every page in again: about 30,000
  minor faults per digits step. No fresh ``mmap`` (``M_MMAP_MAX=0``) and no
  returning freed memory below 1 GiB (``M_TRIM_THRESHOLD``) keep them in the
  process: ``benchmarks/bench_malloc.py`` counts single-digit faults per step.

  A thread that glibc gives a thread arena allocates from heaps of at most
  64 MiB. A buffer that does not fit the heap in use gets a new heap, which
  ``free`` deletes again as soon as it is empty, whatever the trim threshold:
  on two devices the digits step's 62 MB per device was faulted in afresh on
  every call (about 15,000 faults per step) in some runs of the same job and
  not in others. A top pad of a whole heap (``M_TOP_PAD``) keeps an emptied
  heap for the next call (``benchmarks/bench_arena.py``). A buffer larger
  than a heap (over 64 MiB in one allocation) is still mapped afresh on such
  a thread: glibc has no setting for that.

  Arenas: glibc's own limit, 8 per core (``cores``, default
  ``os.cpu_count()``), and at least 2 per device, so that XLA's threads need
  not share one. The threads that run the operations allocate on every dot
  (oneDNN's packing buffers, ``posix_memalign``) and on every operation
  (XLA's completion events). Sharing two arenas, they queued on the arenas'
  locks and spent 12% of their time in ``malloc``; the two-device digits
  step took 82 ms against 68 ms with glibc's limit (``bench_malloc.py``).
  """
  cores = max(1, int(cores or os.cpu_count() or 1))
  return {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 1 << 30, M_TOP_PAD: THREAD_HEAP_BYTES,
          M_ARENA_MAX: max(8 * cores, 2 * int(devices))}


def accelerator_plugins_installed() -> bool:
  """Whether a JAX plugin for an accelerator (CUDA, ROCm, TPU) is installed; JAX not started."""
  import importlib.metadata   # pylint: disable=g-import-not-at-top
  import importlib.util   # pylint: disable=g-import-not-at-top
  import pkgutil   # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec('libtpu') is not None:
    return True
  if importlib.metadata.entry_points(group='jax_plugins'):
    return True
  try:
    import jax_plugins   # pylint: disable=g-import-not-at-top  (a namespace package)
  except ImportError:
    return False
  return any(pkgutil.iter_modules(jax_plugins.__path__))


def cpu_backend_expected(platforms: str | None = None) -> bool:
  """Whether JAX will compute on the CPU, judged before it starts.

  The first of ``platforms`` (default: ``jax_platforms``, i.e.
  ``JAX_PLATFORMS``) when that is set, else whether no accelerator plugin is
  installed.
  """
  if platforms is None:
    import jax   # pylint: disable=g-import-not-at-top  (importing does not start a backend)
    platforms = jax.config.jax_platforms or ''
  if platforms.strip():
    return platforms.split(',')[0].strip() == 'cpu'
  return not accelerator_plugins_installed()


def planned_cpu_devices(config) -> int:
  """The CPU device count this process will have: the user's setting, else the config's."""
  count = user_cpu_devices()
  if count is not None:
    return count
  requested = int(config.training.cpu_devices)
  return 1 if requested < 0 else cpu_device_count(int(config.training.batch_size), requested)


def configure_malloc(config) -> dict:
  """Sets :func:`reuse_malloc_settings` when ``training.cpu_malloc='reuse'``, before JAX starts.

  Called by the command line's program (``python -m diffusion_jax.main``)
  next to :func:`configure_cpu_devices`: glibc gives each thread its arena at
  its first allocation, so the setting has to come before JAX's threads
  exist (set later, the step's buffers still fault in). A library never sets
  it, since it changes the allocator of the whole process. Does nothing (and
  returns {}) with ``cpu_malloc='default'``, when JAX will not run on the CPU
  (:func:`cpu_backend_expected`), or where the C library is not glibc.
  Returns the values it set.
  """
  import ctypes   # pylint: disable=g-import-not-at-top
  import platform   # pylint: disable=g-import-not-at-top
  tr = config.training
  if (tr.cpu_malloc != 'reuse' or platform.libc_ver()[0] != 'glibc'
      or not cpu_backend_expected()):
    return {}
  values = reuse_malloc_settings(planned_cpu_devices(config))
  libc = ctypes.CDLL('libc.so.6')
  for param, value in values.items():
    if libc.mallopt(param, value) != 1:
      logging.warning('mallopt(%d, %d) refused; malloc left as it was', param, value)
      return {}
  return values
