r"""Check that a run fits a TPU before renting it: compile its train step for a TPU topology, on a CPU.

``python -m diffusion_jax.aot --config configs/cifar10.py --topology v4:2x2x1
[--config.model.dtype=bfloat16] [--json report.json]``

The step compiled is exactly the one ``train.py`` runs (``make_train_fn`` over a
1-D ``data`` mesh of the topology's devices, the state replicated, the batch
``[steps_per_call, global_batch, H, W, C]`` sharded along the batch axis), with
abstract arguments only (``jax.ShapeDtypeStruct``), so nothing is allocated.
The devices come from libtpu's topology description
(``jax.experimental.topologies.get_topology_desc``), as in MaxText's
``train_compile.py``: the real XLA:TPU compiler runs on the CPU and takes
minutes. It reports, per device, the FLOPs of a step (``cost_analysis``), the
memory (``memory_analysis``: arguments + temporaries + outputs - aliased), the
chip's HBM and whether the step fits, and the step time and images/s at 40% and
60% of the chip's peak bf16 FLOP/s. When the step is too big, the TPU compiler
itself refuses it (RESOURCE_EXHAUSTED); that is reported as "does not fit" with
the compiler's figures.

Exit status: 0 fits, 1 does not fit, 2 usage error (libtpu missing, bad
topology or config). Needs libtpu: ``pip install -e '.[tpu]'``.
"""

import contextlib
import dataclasses
import json
import os
import re
import sys
import time
from typing import Optional

GiB = 1024 ** 3
TFLOP = 1e12
# The two figures of the step time: fractions of the chip's peak bf16 FLOP/s.
UTILIZATIONS = (0.4, 0.6)


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """A TPU chip as Google's Cloud TPU documentation gives it (per chip, not per core)."""
  name: str              # the topology prefix: v4, v5e, ...
  device_kind: str       # jax's Device.device_kind
  hbm_bytes: int         # HBM per chip
  peak_bf16_flops: float # peak bf16 FLOP/s per chip
  cores: int             # TensorCores per chip (v4 and v5p run them as one "megacore" device)


# Cloud TPU docs, "System architecture" of each version: peak compute per chip
# (bf16) and HBM per chip. v2: 180 TFLOP/s and 64 GiB for the 4-chip board.
CHIPS = (
    ChipSpec('v2', 'TPU v2', 16 * GiB, 45e12, 2),
    ChipSpec('v3', 'TPU v3', 32 * GiB, 123e12, 2),
    ChipSpec('v4', 'TPU v4', 32 * GiB, 275e12, 2),
    ChipSpec('v5e', 'TPU v5 lite', 16 * GiB, 197e12, 1),
    ChipSpec('v5p', 'TPU v5', 95 * GiB, 459e12, 2),
    ChipSpec('v6e', 'TPU v6 lite', 32 * GiB, 918e12, 1),
)
MEGACORE = ('v4', 'v5p')   # one JAX device per chip, as on a real v4 / v5p VM
TOPOLOGY_EXAMPLES = ('v4:2x2x1', 'v4:2x2x2', 'v5e:1x1', 'v5e:2x2', 'v5e:4x4', 'v5p:2x2x1',
                     'v6e:2x2', 'v3:2x2', 'v2:2x2')
TOPOLOGY_RE = re.compile(r'^(?P<chip>[a-z0-9]+):(?P<dims>\d+(x\d+){1,2})$')
LIBTPU_MISSING = ("libtpu is not installed: it provides the TPU compiler. "
                  "Install it with: pip install -e '.[tpu]'")


class UsageError(ValueError):
  """A bad topology, config or environment: exit status 2 with one line."""


def chip_spec(key: str) -> ChipSpec:
  """The chip of a topology prefix (``'v5e'``) or of a ``device_kind`` (``'TPU v5 lite'``)."""
  for chip in CHIPS:
    if key in (chip.name, chip.device_kind):
      return chip
  raise UsageError(f'unknown TPU chip {key!r}; allowed: '
                   f'{", ".join(c.name for c in CHIPS)}.')


def parse_topology(name: str) -> tuple:
  """``'v4:2x2x1'`` -> (ChipSpec, (2, 2, 1)); a UsageError listing examples otherwise."""
  known = ', '.join(c.name for c in CHIPS)
  if not name:
    raise UsageError(f'--topology is required: CHIP:AxB[xC] with CHIP one of {known}; '
                     f'examples: {", ".join(TOPOLOGY_EXAMPLES)}.')
  m = TOPOLOGY_RE.match(name)
  if not m:
    raise UsageError(f'--topology={name!r} is not CHIP:AxB[xC] with CHIP one of {known}; '
                     f'examples: {", ".join(TOPOLOGY_EXAMPLES)}.')
  try:
    chip = chip_spec(m['chip'])
  except UsageError:
    raise UsageError(f'--topology={name!r}: unknown chip {m["chip"]!r}; allowed: {known}; '
                     f'examples: {", ".join(TOPOLOGY_EXAMPLES)}.') from None
  return chip, tuple(int(d) for d in m['dims'].split('x'))


# --- the compiler's refusal --------------------------------------------------------

_UNITS = {'': 1, 'B': 1, 'K': 1024, 'M': 1024 ** 2, 'G': 1024 ** 3, 'T': 1024 ** 4, 'P': 1024 ** 5}
_SIZE = r'([\d.]+)\s*([KMGTP]?)i?B?'
_OOM_PATTERNS = (
    # "...the total memory required for HLO temporaries (32.59G) exceeds available HBM (15.75G)"
    re.compile(r'memory required for (?P<what>[^(]+?) \(' + _SIZE + r'\) exceeds available HBM \('
               + _SIZE + r'\)'),
    # "Ran out of memory in memory space hbm. Used 20.50G of 15.75G hbm."
    re.compile(r'(?P<what>)Used ' + _SIZE + ' of ' + _SIZE + ' hbm'),
)


@dataclasses.dataclass(frozen=True)
class OutOfMemory:
  """The TPU compiler's RESOURCE_EXHAUSTED, with its figures (None when it gave none)."""
  required_bytes: Optional[int]
  available_bytes: Optional[int]
  what: str            # what needed the memory, as the compiler said ('HLO temporaries'), or ''
  message: str         # the compiler's line that says it


def _bytes(number: str, unit: str) -> int:
  return int(round(float(number) * _UNITS[unit]))


def parse_out_of_memory(message: str) -> Optional[OutOfMemory]:
  """An OutOfMemory when ``message`` is the compiler's out-of-HBM refusal, else None."""
  if 'RESOURCE_EXHAUSTED' not in message and 'Ran out of memory' not in message:
    return None
  lines = [l.strip() for l in message.splitlines() if l.strip()]
  line = next((l for l in lines if 'memory' in l.lower()), lines[0] if lines else message)
  for pattern in _OOM_PATTERNS:
    m = pattern.search(message)
    if m:
      g = m.groups()
      return OutOfMemory(_bytes(g[1], g[2]), _bytes(g[3], g[4]), m['what'].strip(), line)
  return OutOfMemory(None, None, '', line)


# --- the compile ------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_stderr():
  """Silences file descriptor 2 (libtpu's start-up warnings about a missing TPU VM)."""
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, 'w') as null:
      os.dup2(null.fileno(), 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def libtpu_installed() -> bool:
  path = os.environ.get('TPU_LIBRARY_PATH')
  if path and os.path.isfile(path):
    return True
  try:
    import libtpu  # noqa: F401  (the TPU compiler, from pip install 'jax[tpu]')
  except ImportError:
    return False
  return True


def topology_devices(name: str) -> list:
  """The compile-only devices of a TPU topology; UsageError for a bad name or no libtpu."""
  chip, dims = parse_topology(name)
  if not libtpu_installed():
    raise UsageError(LIBTPU_MISSING)
  from jax.experimental import topologies
  kw = {'chip_config_name': 'megacore'} if chip.name in MEGACORE else {}
  # libtpu's default host is 2x2x1 chips; smaller slices (v5e:1x1) need smaller bounds.
  bounds = tuple(min(d, b) for d, b in zip(dims + (1,) * (3 - len(dims)), (2, 2, 1)))
  if bounds != (2, 2, 1):
    kw['chips_per_host_bounds'] = bounds
  # Other JAX processes may hold libtpu's lock file (a TPU VM's guard against
  # sharing chips); compiling needs no chip, so several loads are safe.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')  # no TPU VM metadata server to ask
  try:
    with _quiet_stderr():
      return list(topologies.get_topology_desc(platform='tpu', topology_name=name, **kw).devices)
  except Exception as e:  # libtpu's JaxRuntimeError: INVALID_ARGUMENT ...
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UsageError(f'--topology={name!r} was refused by libtpu ({first}); '
                     f'examples: {", ".join(TOPOLOGY_EXAMPLES)}.') from None


def abstract_inputs(config, model, optimizer, mesh):
  """ShapeDtypeStructs of (train state, batches) with train.py's shardings; nothing allocated."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from diffusion_jax import train
  state = jax.eval_shape(lambda rng: train.create_train_state(config, model, optimizer, rng),
                         jax.random.PRNGKey(config.seed))
  replicated = NamedSharding(mesh, P())
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                       state)
  shape = ((config.training.steps_per_call, config.training.batch_size)
           + train.image_shape(config))
  batches = {'image': jax.ShapeDtypeStruct(shape, jnp.float32,
                                           sharding=train.batch_sharding(mesh))}
  return state, batches


def lower_train_step(config, devices):
  """``train.make_train_fn`` of ``config`` lowered on a mesh of ``devices`` (any platform)."""
  from diffusion_jax import config_lib
  from diffusion_jax import data as data_lib
  from diffusion_jax import models
  from diffusion_jax import schedule as schedule_lib
  from diffusion_jax import train
  config_lib.validate_config(config)
  data_lib.validate_data_config(config, num_devices=len(devices),
                                process_count=len({d.process_index for d in devices}))
  model = models.create_model(config)
  optimizer = train.create_optimizer(config)
  mesh = train.make_mesh(devices)
  state, batches = abstract_inputs(config, model, optimizer, mesh)
  train_fn = train.make_train_fn(config, model, schedule_lib.schedule_from_config(config),
                                 optimizer, mesh)
  return train_fn.lower(state, batches)


def _per_device(chip: ChipSpec, device) -> tuple:
  """(HBM bytes, peak bf16 FLOP/s) of one JAX device: a chip, or one core of a v2/v3 chip."""
  devices_per_chip = max(1, chip.cores // max(1, getattr(device, 'num_cores', chip.cores)))
  return chip.hbm_bytes // devices_per_chip, chip.peak_bf16_flops / devices_per_chip


def compile_report(config, topology: str, *, log=print) -> dict:
  """Compiles the train step of ``config`` for ``topology``; returns the report (see module doc)."""
  devices = topology_devices(topology)
  device_kind = devices[0].device_kind
  chip = chip_spec(device_kind)
  hbm, peak = _per_device(chip, devices[0])
  tr = config.training
  n = len(devices)
  report = dict(
      topology=topology, device_kind=device_kind, devices=n,
      hosts=len({d.process_index for d in devices}), global_batch=tr.batch_size,
      per_device_batch=tr.batch_size // n if tr.batch_size % n == 0 else None,
      steps_per_call=tr.steps_per_call, image_shape=[config.data.image_size] * 2
      + [config.data.num_channels], dtype=config.model.dtype,
      remat=bool(config.model.remat), hbm_per_device_bytes=hbm,
      peak_bf16_flops_per_device=peak)
  try:
    lowered = lower_train_step(config, devices)
  except ValueError as e:
    raise UsageError(str(e)) from None
  log(f'Compiling the train step for {topology}: {n} x {device_kind}, global batch '
      f'{tr.batch_size} ({report["per_device_batch"]} per device), '
      f'{"x".join(map(str, report["image_shape"]))} images, model.dtype={config.model.dtype}, '
      f'steps_per_call={tr.steps_per_call}. The XLA:TPU compiler runs on this CPU: this '
      'takes minutes (of CPU time, bfloat16: CIFAR-10 about 10 for v4 and 18 for v5e, '
      '256x256 about 23 for v4; longer on a busy machine).')
  start, cpu_start = time.time(), time.process_time()
  try:
    compiled = lowered.compile()
  except Exception as e:  # XLA's RESOURCE_EXHAUSTED is a JaxRuntimeError
    oom = parse_out_of_memory(str(e))
    if oom is None:
      raise
    report.update(compile_seconds=round(time.time() - start, 1),
                  compile_cpu_seconds=round(time.process_time() - cpu_start, 1), fits=False,
                  flops_per_step=None, memory_per_device_bytes=oom.required_bytes,
                  available_hbm_bytes=oom.available_bytes, memory_required_for=oom.what,
                  error=oom.message)
    return report
  report['compile_seconds'] = round(time.time() - start, 1)
  report['compile_cpu_seconds'] = round(time.process_time() - cpu_start, 1)  # all threads
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  memory = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes)
  flops = float(cost['flops']) / tr.steps_per_call
  report.update(
      flops_per_step=flops, memory_per_device_bytes=int(memory), fits=bool(memory <= hbm),
      argument_bytes=mem.argument_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
      output_bytes=mem.output_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
      generated_code_bytes=mem.generated_code_size_in_bytes)
  for u in UTILIZATIONS:
    seconds = flops / (u * peak)
    report[f'step_seconds_at_{round(u * 100)}pct'] = seconds
    report[f'images_per_second_at_{round(u * 100)}pct'] = tr.batch_size / seconds
  return report


# --- the report ----------------------------------------------------------------------------


def _gib(x) -> str:
  return f'{x / GiB:.2f} GiB'


def format_report(r: dict) -> str:
  """The human-readable lines printed by the command."""
  head = (f'{r["topology"]}: {r["devices"]} x {r["device_kind"]}, global batch {r["global_batch"]}'
          f' ({r["per_device_batch"]} per device), model.dtype={r["dtype"]}'
          f'{", model.remat=True" if r["remat"] else ""}; compiled in {r["compile_seconds"]:.0f} s'
          + (f' ({r["compile_cpu_seconds"]:.0f} s of CPU).' if r.get('compile_cpu_seconds') else '.'))
  if r['flops_per_step'] is None:
    need = (f'needs {_gib(r["memory_per_device_bytes"])} per device'
            if r['memory_per_device_bytes'] else 'needs more memory than there is')
    have = (f'{_gib(r["available_hbm_bytes"])} available' if r['available_hbm_bytes']
            else f'HBM {_gib(r["hbm_per_device_bytes"])}')
    return '\n'.join([head, f'does not fit: the TPU compiler refused the step: it {need}, {have} '
                      f'({r["device_kind"]}).', f'  compiler: {r["error"]}'])
  lines = [head, 'per device:',
           f'  FLOPs per step   {r["flops_per_step"] / 1e9:,.1f} GFLOP '
           f'({r["flops_per_step"] / r["per_device_batch"] / 1e9:.2f} GFLOP per image)',
           f'  memory           {_gib(r["memory_per_device_bytes"])} = '
           f'{_gib(r["argument_bytes"])} arguments + {_gib(r["temp_bytes"])} temporaries + '
           f'{_gib(r["output_bytes"])} outputs - {_gib(r["alias_bytes"])} aliased',
           f'  HBM              {_gib(r["hbm_per_device_bytes"])}: '
           + (f'fits ({100 * r["memory_per_device_bytes"] / r["hbm_per_device_bytes"]:.1f}% used)'
              if r['fits'] else 'does not fit')]
  for u in UTILIZATIONS:
    pct = round(u * 100)
    lines.append(f'  at {pct}% of peak  {r[f"step_seconds_at_{pct}pct"] * 1e3:.2f} ms per step, '
                 f'{r[f"images_per_second_at_{pct}pct"]:,.0f} images/s '
                 f'(peak bf16 {r["peak_bf16_flops_per_device"] / TFLOP:.0f} TFLOP/s per device)')
  return '\n'.join(lines)


def run(config, topology: str, *, config_name: str = '', json_path: Optional[str] = None) -> int:
  """The command: prints the report, writes the JSON; returns the exit status (0, 1 or 2)."""
  try:
    report = compile_report(config, topology, log=lambda s: print(s, flush=True))
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 2
  report['config'] = config_name
  print(format_report(report), flush=True)
  if json_path:
    with open(json_path, 'w') as f:
      json.dump(report, f, indent=2, sort_keys=True)
  return 0 if report['fits'] else 1


def main(argv):
  from absl import flags
  from ml_collections import config_flags
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}', file=sys.stderr)
    sys.exit(2)
  name = (config_flags.get_config_filename(FLAGS['config']) if FLAGS['config'].present
          else 'digits (embedded default)')
  sys.exit(run(FLAGS.config, FLAGS.topology, config_name=name, json_path=FLAGS.json))


def _define_flags(argv):
  """The command's flags (defined only when run as a command: main.py has --config too).

  One config flag, as in ``python -m diffusion_jax.main``: ``--config`` defaults to
  the embedded digits config, ``--config.section.key=value`` works with or
  without a file, and ``--default_config.section.key=value`` is its alias.
  """
  from absl import flags
  from ml_collections import config_flags
  from diffusion_jax import main as main_lib
  config_flags.DEFINE_config_file(
      'config', main_lib.EMBEDDED_CONFIG,
      'A configs/<name>.py file (default: the embedded digits config); override any key with '
      '--config.section.key=value.', lock_config=True, sys_argv=argv)
  flags.DEFINE_string('topology', None, f'TPU topology, e.g. {", ".join(TOPOLOGY_EXAMPLES)}.')
  flags.DEFINE_string('json', None, 'Also write the report to this JSON file.')


if __name__ == '__main__':
  import jax
  from absl import app
  # This process only compiles: JAX itself stays on the CPU (it must not claim a
  # TPU, nor wait for one, when libtpu is installed on a machine without one).
  jax.config.update('jax_platforms', 'cpu')
  from diffusion_jax import main as main_lib
  try:
    _argv = main_lib.aliased_argv(sys.argv)
  except ValueError as e:
    main_lib.fail(e)
  _define_flags(_argv)
  app.run(main, argv=_argv)
