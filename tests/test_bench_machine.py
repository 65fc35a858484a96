"""benchmarks/machine.py: the SIMD level and torch build that bench_peer.py records (no torch needed)."""

import importlib.util
import os
import types

import pytest


def _machine():
  path = os.path.join(os.path.dirname(__file__), '..', 'benchmarks', 'machine.py')
  spec = importlib.util.spec_from_file_location('bench_machine', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


machine = _machine()

# Flags lines as the kernel prints them (shortened, but with the flags that decide).
AVX2_EPYC = 'fpu vme de pse sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni'
AVX512_EPYC = (AVX2_EPYC + ' avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16 '
               'avx512vbmi avx512_vbmi2 avx512_vnni avx512_bitalg avx512_vpopcntdq')
SAPPHIRE_RAPIDS = AVX512_EPYC + ' avx512_fp16 avx_vnni amx_bf16 amx_tile amx_int8'


@pytest.mark.parametrize('flags, level', [
    (AVX2_EPYC, 'avx2'),
    (AVX512_EPYC, 'avx512_bf16'),
    (AVX2_EPYC + ' avx512f avx512bw avx512_vnni', 'avx512_vnni'),
    (AVX2_EPYC + ' avx512f avx512bw', 'avx512f'),
    (SAPPHIRE_RAPIDS, 'amx'),
    ('fpu sse sse2 avx', 'avx'),
    ('fpu sse sse2', 'none'),
    ('', 'none'),
    # py-cpuinfo's spellings and a list instead of a string
    (['AVX2', 'avx512f', 'avx512vnni'], 'avx512_vnni'),
    (['avx2', 'avx512f', 'avx512bf16'], 'avx512_bf16'),
])
def test_simd_level_from_flags(flags, level):
  assert machine.simd_level(flags) == level


def test_simd_flags_lists_those_present_in_order():
  assert machine.simd_flags(AVX2_EPYC) == ['avx', 'avx2', 'fma']
  assert machine.simd_flags(SAPPHIRE_RAPIDS) == [
      'avx', 'avx2', 'fma', 'avx512f', 'avx512bw', 'avx512vl', 'avx512_vnni', 'avx512_bf16',
      'avx512_fp16', 'avx_vnni', 'amx_tile', 'amx_bf16', 'amx_int8']


def test_proc_cpuinfo_first_processor(tmp_path):
  text = (f'processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\n'
          f'flags\t\t: {AVX512_EPYC}\n\nprocessor\t: 1\nmodel name\t: other\nflags\t\t: sse\n')
  assert machine.parse_proc_cpuinfo(text) == ('AMD EPYC 9R14', AVX512_EPYC)
  path = tmp_path / 'cpuinfo'
  path.write_text(text)
  info = machine.cpu_info(str(path))
  assert (info['cpu_model'], info['simd_level'], info['flags_from']) == (
      'AMD EPYC 9R14', 'avx512_bf16', str(path))
  assert 'avx512f' in info['simd_flags'] and info['cores'] >= 1


def test_falls_back_to_py_cpuinfo_then_to_nothing(tmp_path, monkeypatch):
  missing = str(tmp_path / 'absent')
  fake = types.ModuleType('cpuinfo')
  fake.get_cpu_info = lambda: {'brand_raw': 'Some Xeon', 'flags': ['avx2', 'avx512f', 'amxtile']}
  monkeypatch.setitem(__import__('sys').modules, 'cpuinfo', fake)
  assert machine.cpu_model_and_flags(missing) == ('Some Xeon', 'avx2 avx512f amxtile',
                                                  'py-cpuinfo')
  assert machine.cpu_info(missing)['simd_level'] == 'amx'
  monkeypatch.setitem(__import__('sys').modules, 'cpuinfo', None)   # not installed
  model, flags, source = machine.cpu_model_and_flags(missing)
  assert (flags, source) == ('', 'unknown')
  assert machine.cpu_info(missing)['simd_level'] == 'none'


def test_onednn_version_from_torch_config_text():
  text = ('PyTorch built with:\n  - GCC 11.2\n  - Intel(R) MKL-DNN v3.7.1 (Git Hash 8d2...)\n'
          '  - OpenMP 201511\n')
  assert machine.onednn_version(text) == '3.7.1'
  assert machine.onednn_version('  - oneDNN v3.9.2 (Git Hash x)') == '3.9.2'
  assert machine.onednn_version('  - OpenMP 201511') is None


def test_torch_info_and_describe_with_a_stand_in_torch():
  torch = types.SimpleNamespace(
      __version__='2.13.0+cpu', version=types.SimpleNamespace(cuda=None),
      __config__=types.SimpleNamespace(show=lambda: '  - Intel(R) MKL-DNN v3.7.1'),
      cuda=types.SimpleNamespace(is_available=lambda: False),
      backends=types.SimpleNamespace(
          mkldnn=types.SimpleNamespace(is_available=lambda: True),
          cpu=types.SimpleNamespace(get_cpu_capability=lambda: 'AVX2')),
      get_num_threads=lambda: 2, get_num_interop_threads=lambda: 2)
  info = machine.torch_info(torch)
  assert info == dict(torch='2.13.0+cpu', torch_build='CPU', cuda_available=False,
                      mkldnn_available=True, onednn_version='3.7.1',
                      torch_cpu_capability='AVX2', torch_threads=2, torch_interop_threads=2)
  line = machine.describe(dict(info, **machine.cpu_info()))
  assert 'torch 2.13.0+cpu (CPU build, oneDNN 3.7.1' in line and 'SIMD ' in line
