"""Tests for diffusion_jax.host: the CPU device count, set before JAX starts."""

import os
import subprocess
import sys

import numpy as np
import pytest

from diffusion_jax import config_lib
from diffusion_jax import host


@pytest.mark.parametrize('batch,cores,want', [(128, 2, 2), (128, 6, 4), (100, 8, 5),
                                              (7, 4, 1), (128, 1, 1)])
def test_cpu_device_count_divides_the_batch(batch, cores, want):
  assert host.cpu_device_count(batch, 0, cores) == want
  assert batch % want == 0


def test_requested_count_is_used_as_given():
  assert host.cpu_device_count(128, 3, cores=2) == 3   # validated later against the batch


def test_user_settings_win(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  assert host.user_set_cpu_devices()
  assert host.configure_cpu_devices(config_lib.digits_config()) is None


def test_user_cpu_devices_reads_the_environment(monkeypatch):
  monkeypatch.delenv('JAX_NUM_CPU_DEVICES', raising=False)
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_enable_fast_math=false')
  assert host.user_cpu_devices() is None and not host.user_set_cpu_devices()
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=6')
  assert host.user_cpu_devices() == 6
  monkeypatch.setenv('JAX_NUM_CPU_DEVICES', '3')   # JAX's own setting comes first
  assert host.user_cpu_devices() == 3 and host.user_set_cpu_devices()


def _fresh_cpu_env() -> dict:
  """This environment for a child process on the CPU, minus the user's device-count settings."""
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES')}
  env['JAX_PLATFORMS'] = 'cpu'
  return env


_CHILD = """
import jax
from diffusion_jax import config_lib, host
config = config_lib.digits_config()
config.training.cpu_devices = {requested}
set_to = host.configure_cpu_devices(config)
print(set_to, jax.device_count(), jax.default_backend())
"""


@pytest.mark.parametrize('requested,want', [(0, None), (3, 3), (-1, 1)])
def test_configure_cpu_in_a_fresh_process(requested, want):
  """Before JAX starts, configure_cpu_devices sets the device count."""
  env = _fresh_cpu_env()
  out = subprocess.run([sys.executable, '-c', _CHILD.format(requested=requested)], env=env,
                       capture_output=True, text=True, timeout=120, check=True).stdout.split()
  expected = host.cpu_device_count(128) if want is None else want
  assert out[1] == str(expected) and out[2] == 'cpu'
  assert out[0] == ('None' if requested < 0 else str(expected))


_SAMPLER_CHILD = """
import jax, numpy as np
from diffusion_jax import config_lib, host, models, settings, schedule as schedule_lib
from diffusion_jax.evaluation import runtime as rt
config = config_lib.digits_config()
config.training.cpu_devices = 2
config.training.cpu_op_threads = '{op_threads}'
host.configure_cpu_devices(config)           # exactly what the CLI does before JAX starts
host.configure_cpu_op_threads(config)
config.sampling.num_steps = 20
model = models.create_model(config)
params = model.init(jax.random.PRNGKey(1), np.zeros((1, 8, 8, 1), np.float32),
                    np.zeros((1,), np.int32))['params']
params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
s = schedule_lib.schedule_from_config(config)
out = [np.asarray(settings.make_sampler(config, s, rt.apply_fn_for(model), batch_size=200,
                                        devices=devs)(params, jax.random.PRNGKey(0)))
       for devs in (jax.devices()[:2], jax.devices()[:1])]
print(jax.device_count(), np.abs(out[0] - out[1]).max())
import os; print('FLAGS', os.environ.get('XLA_FLAGS', ''))
"""


@pytest.mark.parametrize('op_threads', ['device', 'pool'])
def test_two_cpu_devices_sample_what_one_device_samples(op_threads):
  """The CLI's CPU setup (two devices) samples the same images as one device.

  Regression: with the YNN fusions turned off (a flag this module used to set
  on jaxlib 0.10 for every program) the first 3 images of each device's 100
  came out wrong (max difference 2.0); samplers keep XLA's defaults
  (``host.CPU_KIND_OPTIONS``, ``benchmarks/ynn_repro.py``). Checked with each
  device's operations on its own thread (the CLI's setting with a device per
  core) and on the shared pool. The flag goes in through ``XLA_FLAGS`` so that
  it applies whatever this machine's core count.
  """
  env = _fresh_cpu_env()
  if op_threads == 'device':
    env['XLA_FLAGS'] = f'--{host.MULTI_THREAD_OPS_FLAG}=false'
  out = subprocess.run([sys.executable, '-c', _SAMPLER_CHILD.format(op_threads=op_threads)],
                       env=env, capture_output=True, text=True, timeout=600,
                       check=True).stdout.split()
  assert out[0] == '2'
  assert float(out[1]) < 1e-3, out
  assert (host.MULTI_THREAD_OPS_FLAG in ' '.join(out[3:])) == (op_threads == 'device'), out


def test_compiler_options_lower_llvm_optimisation_on_the_cpu_only():
  import types

  import jax
  from jax.sharding import Mesh
  import numpy as np
  cpu = jax.devices('cpu')
  assert host.cpu_compiler_options(cpu) == {'xla_backend_optimization_level': 1}
  assert host.cpu_compiler_options(Mesh(np.asarray(cpu), ('data',)), runs_once=True) == {
      'xla_backend_optimization_level': 0}
  # Per kind: the train step also turns YNNPACK's fusions off (tests/test_train.py shows
  # it computes XLA's defaults' step); samplers and evaluation keep them (see below).
  serial = host.SERIAL_LOOPS if host.single_thread_ops(len(cpu)) else {}
  assert host.cpu_compiler_options(cpu, kind='train_step') == {
      'xla_backend_optimization_level': 1, 'xla_cpu_experimental_ynn_fusion_type': '', **serial}
  # With a device per core (at least two), the train step's loop fusions stay whole.
  per_core = [types.SimpleNamespace(platform='cpu')] * max(2, host.available_cores())
  assert host.cpu_compiler_options(per_core, kind='train_step') == {
      'xla_backend_optimization_level': 1, 'xla_cpu_experimental_ynn_fusion_type': '',
      'xla_disable_hlo_passes': 'cpu-parallel-task-assigner'}
  assert 'xla_disable_hlo_passes' not in host.cpu_compiler_options(per_core[:1], kind='train_step')
  assert 'xla_disable_hlo_passes' not in host.cpu_compiler_options(per_core, kind='sampler')
  for kind in ('sampler', 'evaluation', 'other'):
    assert host.cpu_compiler_options(cpu, kind=kind) == {'xla_backend_optimization_level': 1}
  with pytest.raises(ValueError, match="kind='sample' is not supported; allowed values: "
                                       'train_step, sampler, evaluation, other'):
    host.cpu_compiler_options(cpu, kind='sample')
  assert not host.xla_accepts('xla_cpu_experimental_ynn_fusion_type', 'no_such_fusion')
  for platform in ('gpu', 'cuda', 'tpu'):   # accelerators keep XLA's defaults
    fake = [types.SimpleNamespace(platform=platform)]
    assert host.cpu_compiler_options(fake) is None
    assert host.cpu_compiler_options(types.SimpleNamespace(devices=np.asarray(fake))) is None


def test_reuse_malloc_settings_keep_memory_with_an_arena_per_thread():
  for devices, cores, arenas in ((1, 2, 16), (2, 2, 16), (8, 2, 16), (16, 1, 32), (4, 64, 512)):
    assert host.reuse_malloc_settings(devices, cores) == {
        host.M_MMAP_MAX: 0, host.M_TRIM_THRESHOLD: 1 << 30, host.M_TOP_PAD: 64 << 20,
        host.M_ARENA_MAX: arenas}
  assert host.reuse_malloc_settings(2)[host.M_ARENA_MAX] == max(8 * os.cpu_count(), 4)


# Faults of touching a freshly malloc'ed 64 MiB block, the second time round: a
# fresh mmap under glibc's defaults (one fault per 4 KiB page), reused heap memory
# once configure_malloc has run.
_MALLOC_CHILD = """
import ctypes, resource
from diffusion_jax import config_lib, host
config = config_lib.digits_config()
config.training.cpu_malloc = {mode!r}
set_to = host.configure_malloc(config)
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
faults = []
for _ in range(2):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(set_to.items()), faults[1])
"""


# The same on a second thread, whose thread arena already holds 20 MB: a 60 MB block
# does not fit its first heap, so glibc makes a heap for it and, when it is freed,
# deletes that heap unless the top pad keeps it (values set by hand, as mallopt takes them).
_THREAD_ARENA_CHILD = """
import ctypes, resource, threading
from diffusion_jax import host
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
values = host.reuse_malloc_settings(2)
if {without_pad!r}:
  del values[host.M_TOP_PAD]
for param, value in values.items():
  assert libc.mallopt(param, value) == 1
size, faults = 60 * 10**6, []
def run():
  kept = [libc.malloc(1000) for _ in range(20000)]
  for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=run)
thread.start()
thread.join()
print(max(faults[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc: Linux only')
@pytest.mark.parametrize('without_pad', [False, True])
def test_reuse_malloc_settings_keep_a_thread_arenas_block_for_reuse(without_pad):
  """A 60 MB block on a thread arena is reused with the top pad; without it, faulted in again."""
  out = subprocess.run([sys.executable, '-c', _THREAD_ARENA_CHILD.format(without_pad=without_pad)],
                       env=_fresh_cpu_env(), capture_output=True, text=True, timeout=120,
                       check=True).stdout.strip().splitlines()[-1]
  pages = 60 * 10**6 // os.sysconf('SC_PAGE_SIZE')
  if without_pad:   # the mechanism the pad is for: a fresh heap, every page faulted in
    assert int(out) >= pages * 9 // 10
  else:
    assert int(out) < pages // 10


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc: Linux only')
@pytest.mark.parametrize('mode', ['reuse', 'default'])
def test_configure_malloc_keeps_a_large_block_for_reuse(mode):
  """With cpu_malloc='reuse' a 64 MiB block is re-used, not faulted in again page by page."""
  out = subprocess.run([sys.executable, '-c', _MALLOC_CHILD.format(mode=mode)],
                       env=_fresh_cpu_env(), capture_output=True, text=True, timeout=120,
                       check=True).stdout.strip().splitlines()[-1]
  settings, faults = out.rsplit(' ', 1)
  pages = (64 << 20) // os.sysconf('SC_PAGE_SIZE')
  if mode == 'reuse':
    assert settings == str(sorted(host.reuse_malloc_settings(host.cpu_device_count(128)).items()))
    assert int(faults) < pages // 100
  else:
    assert settings == '[]'
    assert int(faults) >= pages * 9 // 10


def test_cpu_malloc_is_validated():
  config = config_lib.digits_config()
  config.training.cpu_malloc = 'jemalloc'
  with pytest.raises(ValueError, match=r'training\.cpu_malloc.*reuse.*default'):
    config_lib.validate_config(config)


@pytest.mark.parametrize('platforms,want', [('cpu', 'True'), ('cpu,cuda', 'True'),
                                            ('cuda,cpu', 'False'), ('tpu', 'False')])
def test_cpu_backend_expected_reads_jax_platforms_before_jax_starts(platforms, want):
  env = dict(_fresh_cpu_env(), JAX_PLATFORMS=platforms)
  code = ('import jax; from diffusion_jax import host; print(host.cpu_backend_expected()); '
          'print(jax._src.xla_bridge.backends_are_initialized())')
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=120, check=True).stdout.split()
  assert out == [want, 'False']   # judged without starting a backend


def test_cpu_backend_expected_without_jax_platforms_asks_for_plugins(monkeypatch):
  for installed in (True, False):
    monkeypatch.setattr(host, 'accelerator_plugins_installed', lambda v=installed: v)
    assert host.cpu_backend_expected('') is (not installed)


def test_accelerator_plugins_installed_sees_libtpu(monkeypatch):
  import importlib.util   # pylint: disable=g-import-not-at-top
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: object() if name == 'libtpu' else real(name, *a))
  assert host.accelerator_plugins_installed()
  assert not host.cpu_backend_expected('')


def test_planned_cpu_devices_follows_the_user_then_the_config(monkeypatch):
  config = config_lib.digits_config()
  monkeypatch.delenv('JAX_NUM_CPU_DEVICES', raising=False)
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_enable_fast_math=false')
  assert host.planned_cpu_devices(config) == host.cpu_device_count(128)
  config.training.cpu_devices = -1
  assert host.planned_cpu_devices(config) == 1
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp')
  assert host.planned_cpu_devices(config) == 8
  monkeypatch.setenv('JAX_NUM_CPU_DEVICES', '3')
  assert host.planned_cpu_devices(config) == 3


def test_single_thread_ops_when_every_core_is_a_device():
  assert host.single_thread_ops(2, cores=2) and host.single_thread_ops(8, cores=2)
  assert not host.single_thread_ops(1, cores=2)   # one device: the pool splits its ops
  assert not host.single_thread_ops(2, cores=4)   # cores left over for the pool
  assert not host.single_thread_ops(1, cores=1)


_THREADS_CHILD = """
import os
from diffusion_jax import config_lib, host
config = config_lib.digits_config()
config.training.cpu_devices = {devices}
config.training.cpu_op_threads = '{mode}'
host.configure_cpu_devices(config)
set_flag = host.configure_cpu_op_threads(config)
import jax
print(set_flag, jax.device_count(), repr(os.environ.get('XLA_FLAGS', '')))
print(host.configure_cpu_op_threads(config))   # JAX has started: nothing more to set
"""


@pytest.mark.parametrize('mode,devices,want', [('device', 'max(2, host.available_cores())', True),
                                               ('pool', 'max(2, host.available_cores())', False),
                                               ('device', '-1', False)])
def test_configure_cpu_op_threads_in_a_fresh_process(mode, devices, want):
  """A device per core: the CLI sets the flag before JAX starts; never on one device or 'pool'."""
  out = subprocess.run([sys.executable, '-c', _THREADS_CHILD.format(mode=mode, devices=devices)],
                       env=dict(_fresh_cpu_env(), XLA_FLAGS='--xla_cpu_enable_fast_math=false'),
                       capture_output=True, text=True, timeout=120, check=True).stdout.splitlines()
  set_flag, _, flags = out[0].split(' ', 2)
  assert set_flag == str(want)
  expected = '--xla_cpu_enable_fast_math=false'
  if want:
    expected += f' --{host.MULTI_THREAD_OPS_FLAG}=false'
  assert flags == repr(expected)
  assert out[1] == 'False'


def test_configure_cpu_op_threads_leaves_the_users_flag(monkeypatch):
  config = config_lib.digits_config()
  config.training.cpu_devices = max(2, host.available_cores())
  monkeypatch.setenv('XLA_FLAGS', f'--{host.MULTI_THREAD_OPS_FLAG}=true')
  monkeypatch.setattr(host, 'cpu_backend_expected', lambda: True)
  assert not host.configure_cpu_op_threads(config)
  assert os.environ['XLA_FLAGS'] == f'--{host.MULTI_THREAD_OPS_FLAG}=true'


def test_cpu_op_threads_is_validated():
  config = config_lib.digits_config()
  config.training.cpu_op_threads = 'many'
  with pytest.raises(ValueError, match=r'training\.cpu_op_threads.*device.*pool'):
    config_lib.validate_config(config)


_STEPS_CHILD = r"""
import ctypes, sys
sys.path.insert(0, sys.argv[1])
from diffusion_jax import host
if sys.argv[3:] == ['reuse']:   # the training program's malloc, set before JAX starts
  for param, value in host.reuse_malloc_settings(2).items():
    assert ctypes.CDLL('libc.so.6').mallopt(param, value) == 1
import jax, numpy as np
from diffusion_jax import data as data_lib, train
from test_train import ONE_LEVEL, tiny_config
config = tiny_config(**ONE_LEVEL)
model, schedule, optimizer, mesh, state = train.setup(config)
it = data_lib.create_train_iterator(config)
step = train.make_train_fn(config, model, schedule, optimizer, mesh)
np.savez(sys.argv[2] + '.init.npz', *jax.device_get(jax.tree.leaves(state.params)))
for _ in range(4):
  batch = {'image': jax.device_put(np.asarray(next(it)['image'])[None], train.batch_sharding(mesh))}
  state, _ = step(state, batch)
leaves = jax.device_get(jax.tree.leaves((state.params, state.ema_params, state.opt_state)))
np.savez(sys.argv[2], *leaves)
print(jax.device_count())
"""


def _steps_in_a_child(path, devices: int, xla_flags: str = '', *args) -> list:
  """Runs ``_STEPS_CHILD`` on ``devices`` CPU devices; the saved state's leaves (float64)."""
  env = dict(_fresh_cpu_env(), XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}'
             + xla_flags)
  proc = subprocess.run([sys.executable, '-c', _STEPS_CHILD, os.path.dirname(__file__), path,
                         *args], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert proc.stdout.split()[-1] == str(devices)
  return _npz_leaves(path)


def _relative_l2(got, want) -> float:
  """||got - want|| / ||want|| over all leaves together."""
  num = sum(float(np.sum((np.float64(a) - b) ** 2)) for a, b in zip(got, want))
  den = sum(float(np.sum(np.float64(b) ** 2)) for b in want)
  return (num / den) ** 0.5


@pytest.mark.parametrize('devices', [1, 2])
def test_train_steps_on_one_thread_per_device_compute_the_pools_steps(devices, tmp_path):
  """Four train steps with each device's ops on one thread equal those on the shared pool.

  The CLI's ``training.cpu_op_threads='device'`` (``--xla_cpu_multi_thread_eigen=false``)
  against XLA's default, on one and on two CPU devices, from the same state
  and batches: parameters, EMA and Adam moments agree to float32 rounding.
  """
  path = str(tmp_path / 'state1.npz')
  pool = _steps_in_a_child(str(tmp_path / 'state0.npz'), devices)
  device = _steps_in_a_child(path, devices, f' --{host.MULTI_THREAD_OPS_FLAG}=false')
  assert len(device) == len(pool) > 3
  rel = _relative_l2(device, pool)
  assert rel < 1e-6, rel
  init = _npz_leaves(path + '.init.npz')   # the parameters come first in the saved leaves
  assert max(float(np.abs(a - b).max()) for a, b in zip(init, device)) > 1e-4   # steps moved them


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc: Linux only')
def test_train_steps_under_the_programs_malloc_compute_the_default_mallocs_steps(tmp_path):
  """Four two-device train steps with ``reuse_malloc_settings`` equal those under glibc's defaults.

  The allocator only decides where XLA's buffers live; a difference here
  would mean a buffer read before it is written.
  """
  flags = f' --{host.MULTI_THREAD_OPS_FLAG}=false'
  default, reuse = (_steps_in_a_child(str(tmp_path / f'{mode}.npz'), 2, flags, mode)
                    for mode in ('default', 'reuse'))
  assert len(reuse) == len(default) > 3
  rel = _relative_l2(reuse, default)
  assert rel < 1e-6, rel


def _npz_leaves(path):
  with np.load(path) as f:
    return [f[k].astype(np.float64) for k in sorted(f.files, key=lambda k: int(k[4:]))]


_SERIAL_LOOPS_CHILD = r"""
import jax, numpy as np
from diffusion_jax import config_lib, flat_state, host, train
config = config_lib.digits_config()   # the README job's step, flat state as the loop keeps it
model, schedule, optimizer, mesh, state = train.setup(config)
state, layout = flat_state.flatten(state, mesh)
host.single_thread_ops = lambda *a, **k: True   # a device per core, on any machine
batches = [{'image': jax.device_put(np.random.default_rng(i).uniform(-1, 1, (1, 128, 8, 8, 1))
                                    .astype(np.float32), train.batch_sharding(mesh))}
           for i in range(3)]
out = []
for serial in (host.SERIAL_LOOPS, {}):
  host.SERIAL_LOOPS = serial   # make_train_fn compiles with host.cpu_compiler_options
  fn = train.make_train_fn(config, model, schedule, optimizer, mesh, unravel=layout.unravel)
  fn = fn.lower(state, batches[0]).compile()
  out.append(fn.as_text().count('outer_dimension_partitions'))
  s = jax.tree.map(lambda x: x.copy(), state)   # the step donates its state
  for batch in batches:
    s, _ = fn(s, batch)
  out.append(jax.device_get(jax.tree.leaves(s)))
whole, a, pieces, b = out
num = sum(float(np.sum((np.float64(u) - v) ** 2)) for u, v in zip(a, b))
den = sum(float(np.sum(np.float64(v) ** 2)) for v in b)
moved = max(float(np.abs(u - v).max()) for u, v in zip(jax.device_get(jax.tree.leaves(state)), b))
print(whole, pieces, (num / den) ** 0.5, moved)
"""


def test_train_step_with_whole_loop_fusions_computes_the_split_ones_step():
  """``SERIAL_LOOPS`` (no parallel task assignment) gives the same three digits steps on 2 devices.

  The README job's train step (flat state) on a device per core, compiled
  with the train step's options and with the same options less
  ``SERIAL_LOOPS``: XLA splits hundreds of loop fusions into pieces in the
  second and none in the first, and the state after three steps agrees to
  float32 rounding (bit for bit when measured).
  """
  env = dict(_fresh_cpu_env(), XLA_FLAGS='--xla_force_host_platform_device_count=2 '
             f'--{host.MULTI_THREAD_OPS_FLAG}=false')
  proc = subprocess.run([sys.executable, '-c', _SERIAL_LOOPS_CHILD], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  whole, pieces, rel, moved = proc.stdout.split()[-4:]
  assert int(whole) == 0 and int(pieces) > 100, (whole, pieces)
  assert float(rel) < 1e-6, rel
  assert float(moved) > 1e-4, moved   # the steps changed the state
