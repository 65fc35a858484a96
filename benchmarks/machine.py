"""What a benchmark ran on: CPU model and SIMD level, torch's build, JAX's devices.

The CPU ratio of our step to the PyTorch peer depends on the instruction set
(oneDNN has AVX-512 kernels that XLA:CPU's do not match; see
``benchmarks/RESULTS.md``), so every CPU figure is recorded with the SIMD
level it was measured on. Only the standard library is imported here; torch
and jax are passed in by the caller, so that this module (and its test) runs
where torch is not installed.
"""

import os
import platform
import re

# The SIMD levels that matter for the convolution kernels, best first, each
# with the /proc/cpuinfo flags that define it (all must be present).
SIMD_LEVELS = (
    ('amx', ('amx_tile',)),
    ('avx512_bf16', ('avx512f', 'avx512_bf16')),
    ('avx512_vnni', ('avx512f', 'avx512_vnni')),
    ('avx512f', ('avx512f',)),
    ('avx2', ('avx2',)),
    ('avx', ('avx',)),
)
# Flags recorded next to the level (those present are listed).
SIMD_FLAGS = ('avx', 'avx2', 'fma', 'avx512f', 'avx512bw', 'avx512vl', 'avx512_vnni',
              'avx512_bf16', 'avx512_fp16', 'avx_vnni', 'amx_tile', 'amx_bf16', 'amx_int8')


def normalise_flags(flags) -> set:
  """A set of lower-case flag names from a flags string or iterable.

  py-cpuinfo spells some flags without the underscore the kernel uses
  (``avx512vnni``, ``avx512bf16``, ``amxtile``); they are mapped to the
  kernel's names.
  """
  if isinstance(flags, str):
    flags = flags.split()
  out = {f.strip().lower() for f in flags if f.strip()}
  aliases = {'avx512vnni': 'avx512_vnni', 'avx512bf16': 'avx512_bf16',
             'avx512fp16': 'avx512_fp16', 'avxvnni': 'avx_vnni', 'amxtile': 'amx_tile',
             'amxbf16': 'amx_bf16', 'amxint8': 'amx_int8'}
  return out | {aliases[f] for f in out if f in aliases}


def simd_level(flags) -> str:
  """The best SIMD level in ``flags``: amx, avx512_bf16, avx512_vnni, avx512f, avx2, avx or none."""
  have = normalise_flags(flags)
  for level, needs in SIMD_LEVELS:
    if all(f in have for f in needs):
      return level
  return 'none'


def simd_flags(flags) -> list:
  """The SIMD flags of :data:`SIMD_FLAGS` present in ``flags``, in that order."""
  have = normalise_flags(flags)
  return [f for f in SIMD_FLAGS if f in have]


def parse_proc_cpuinfo(text: str) -> tuple:
  """(model name, flags string) of the first processor in /proc/cpuinfo text; '' where absent."""
  model = flags = ''
  for line in text.splitlines():
    key, _, value = line.partition(':')
    key = key.strip()
    if key == 'model name' and not model:
      model = value.strip()
    elif key == 'flags' and not flags:
      flags = value.strip()
  return model, flags


def cpu_model_and_flags(proc_path: str = '/proc/cpuinfo') -> tuple:
  """(model, flags string, source) from /proc/cpuinfo, else py-cpuinfo, else platform."""
  try:
    with open(proc_path) as f:
      model, flags = parse_proc_cpuinfo(f.read())
    if flags:
      return model or platform.processor(), flags, proc_path
  except OSError:
    pass
  try:
    import cpuinfo  # py-cpuinfo, optional  pylint: disable=g-import-not-at-top
    info = cpuinfo.get_cpu_info()
    return info.get('brand_raw', ''), ' '.join(info.get('flags', [])), 'py-cpuinfo'
  except Exception:  # pylint: disable=broad-except
    return platform.processor(), '', 'unknown'


def cpu_info(proc_path: str = '/proc/cpuinfo') -> dict:
  """The CPU model, SIMD level and flags, and the number of cores this process may use."""
  model, flags, source = cpu_model_and_flags(proc_path)
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return dict(cpu_model=model, simd_level=simd_level(flags), simd_flags=simd_flags(flags),
              flags_from=source, cores=cores, machine=platform.machine())


def onednn_version(config_text: str):
  """oneDNN's version from ``torch.__config__.show()`` text, or None."""
  m = re.search(r'(?:oneDNN|MKL-DNN)\s*v?(\d+(?:\.\d+)+)', config_text)
  return m.group(1) if m else None


def torch_info(torch) -> dict:
  """torch's version and build: CUDA or CPU, oneDNN, the CPU kernels ATen picked, threads."""
  try:
    config_text = torch.__config__.show()
  except Exception:  # pylint: disable=broad-except
    config_text = ''
  cpu = getattr(torch.backends, 'cpu', None)
  return dict(
      torch=torch.__version__,
      torch_build=f'CUDA {torch.version.cuda}' if torch.version.cuda else 'CPU',
      cuda_available=torch.cuda.is_available(),
      mkldnn_available=torch.backends.mkldnn.is_available(),
      onednn_version=onednn_version(config_text),
      torch_cpu_capability=cpu.get_cpu_capability() if cpu else None,
      torch_threads=torch.get_num_threads(),
      torch_interop_threads=torch.get_num_interop_threads())


def jax_info(jax) -> dict:
  """jax's version, backend, device kind and count, and its CPU device count."""
  try:
    cpu_devices = len(jax.devices('cpu'))
  except RuntimeError:
    cpu_devices = 0
  return dict(jax=jax.__version__, platform=jax.default_backend(),
              device=jax.devices()[0].device_kind, jax_devices=jax.device_count(),
              jax_cpu_devices=cpu_devices)


def describe(info: dict) -> str:
  """One line for a benchmark's header from a dict of the above (keys that are absent are skipped)."""
  parts = []
  if 'cpu_model' in info:
    parts.append(f"CPU {info['cpu_model']} ({info['cores']} cores), SIMD {info['simd_level']} "
                 f"[{' '.join(info['simd_flags'])}] from {info['flags_from']}")
  if 'jax' in info:
    parts.append(f"jax {info['jax']} on {info['device']} x{info['jax_devices']} "
                 f"({info['jax_cpu_devices']} CPU devices)")
  if 'torch' in info:
    parts.append(f"torch {info['torch']} ({info['torch_build']} build, oneDNN "
                 f"{info['onednn_version'] or '?'}, mkldnn available: {info['mkldnn_available']}, "
                 f"ATen CPU kernels {info['torch_cpu_capability']}, "
                 f"{info['torch_threads']} threads)")
  return '; '.join(parts)
