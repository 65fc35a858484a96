"""``python -m diffusion_jax.aot``: chip table, topology names, the compiler's refusal, exit codes.

The fast tests need no libtpu. The slow ones (``pytest -m slow``, after
``pip install -e '.[tpu]'``) run the real XLA:TPU compiler on the CPU for the
digits config (one compile, about a minute and a half on 2 cores); the refusal
path is checked with the compiler's real RESOURCE_EXHAUSTED text.
"""

import json
import os
import subprocess
import sys

import pytest

from diffusion_jax import aot

GiB = 1024 ** 3
# The TPU compiler's refusal of CIFAR-10 at global batch 16384 on v5e:2x2 (issue 10).
REFUSAL = ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
           'temporaries (32.59G) exceeds available HBM (15.75G)')


def _cli(*args, prelude='', drop_env=()):
  """Runs the command as a user would (optionally after ``prelude`` Python code)."""
  code = (f'{prelude}\nimport runpy, sys\nsys.argv = ["aot"] + {list(args)!r}\n'
          'runpy.run_module("diffusion_jax.aot", run_name="__main__")')
  env = {k: v for k, v in os.environ.items() if k not in drop_env}
  env['JAX_PLATFORMS'] = 'cpu'
  return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                        timeout=1200)


# --- no libtpu needed ------------------------------------------------------------------------


def test_parse_out_of_memory_real_refusal():
  oom = aot.parse_out_of_memory('XlaRuntimeError: ' + REFUSAL + '\n  more context')
  assert oom.required_bytes == round(32.59 * GiB)
  assert oom.available_bytes == round(15.75 * GiB)
  assert oom.what == 'HLO temporaries'
  assert oom.message.startswith('XlaRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM')


def test_parse_out_of_memory_other_wording_and_none():
  oom = aot.parse_out_of_memory('RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of '
                                'memory in memory space hbm. Used 20.50G of 15.75G hbm. '
                                'Exceeded hbm capacity by 4.75G.')
  assert (oom.required_bytes, oom.available_bytes) == (round(20.5 * GiB), round(15.75 * GiB))
  unparsed = aot.parse_out_of_memory('RESOURCE_EXHAUSTED: something new')
  assert (unparsed.required_bytes, unparsed.message) == (None, 'RESOURCE_EXHAUSTED: something new')
  assert aot.parse_out_of_memory('INVALID_ARGUMENT: bad shapes') is None


@pytest.mark.parametrize('key,hbm_gib,peak', [
    ('v4', 32, 275e12), ('TPU v4', 32, 275e12), ('v5e', 16, 197e12), ('TPU v5 lite', 16, 197e12),
    ('v5p', 95, 459e12), ('TPU v5', 95, 459e12), ('v6e', 32, 918e12), ('v3', 32, 123e12),
    ('v2', 16, 45e12)])
def test_chip_table(key, hbm_gib, peak):
  chip = aot.chip_spec(key)
  assert (chip.hbm_bytes, chip.peak_bf16_flops) == (hbm_gib * GiB, peak)


def test_per_device_figures_split_two_core_chips():
  class Device:
    def __init__(self, num_cores):
      self.num_cores = num_cores
  # v3: JAX sees each of the two TensorCores as a device; v4: one megacore device per chip.
  assert aot._per_device(aot.chip_spec('v3'), Device(1)) == (16 * GiB, 61.5e12)
  assert aot._per_device(aot.chip_spec('v4'), Device(2)) == (32 * GiB, 275e12)
  assert aot._per_device(aot.chip_spec('v5e'), Device(1)) == (16 * GiB, 197e12)


def test_parse_topology():
  chip, dims = aot.parse_topology('v4:2x2x1')
  assert (chip.name, dims) == ('v4', (2, 2, 1))
  assert aot.parse_topology('v5e:4x8')[1] == (4, 8)
  for bad in ('v9:2x2', 'v4-8', 'v5e', 'v5e:2', ''):
    with pytest.raises(aot.UsageError, match='v4:2x2x1'):
      aot.parse_topology(bad)
  with pytest.raises(aot.UsageError, match="unknown TPU chip 'v9'; allowed: v2, v3, v4, v5e"):
    aot.chip_spec('v9')


def test_format_does_not_fit():
  report = dict(topology='v5e:2x2', devices=4, device_kind='TPU v5 lite', global_batch=16384,
                per_device_batch=4096, dtype='bfloat16', remat=False, compile_seconds=86.0,
                compile_cpu_seconds=90.0,
                flops_per_step=None, memory_per_device_bytes=round(32.59 * GiB),
                available_hbm_bytes=round(15.75 * GiB), hbm_per_device_bytes=16 * GiB,
                error=REFUSAL)
  text = aot.format_report(report)
  assert 'does not fit: the TPU compiler refused the step: it needs 32.59 GiB per device, ' \
         '15.75 GiB available' in text
  assert REFUSAL in text


def test_missing_libtpu_exits_2_with_one_line():
  # Hides libtpu from the import system, as on a machine without the [tpu] extra, and
  # drops the path that loading libtpu in this test process (another test) exports.
  r = _cli('--topology', 'v5e:2x2', prelude='import sys; sys.modules["libtpu"] = None',
           drop_env=('TPU_LIBRARY_PATH',))
  assert r.returncode == 2, r.stderr
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert lines == ["error: libtpu is not installed: it provides the TPU compiler. "
                   "Install it with: pip install -e '.[tpu]'"]


def test_refused_step_reports_does_not_fit_and_exits_1(monkeypatch, tmp_path, capsys):
  """The compiler's RESOURCE_EXHAUSTED becomes "does not fit", its figures, JSON and exit 1."""
  from diffusion_jax import config_lib

  class Device:
    device_kind, process_index, num_cores = 'TPU v5 lite', 0, 1

  class Refused:
    def compile(self):
      raise RuntimeError(REFUSAL)

  monkeypatch.setattr(aot, 'topology_devices', lambda name: [Device()] * 4)
  monkeypatch.setattr(aot, 'lower_train_step', lambda config, devices: Refused())
  config = config_lib.digits_config()
  config.training.batch_size = 16384
  path = tmp_path / 'report.json'
  assert aot.run(config, 'v5e:2x2', config_name='digits', json_path=str(path)) == 1
  out = capsys.readouterr().out
  assert 'does not fit: the TPU compiler refused the step: it needs 32.59 GiB per device, ' \
         '15.75 GiB available (TPU v5 lite).' in out
  report = json.loads(path.read_text())
  assert (report['fits'], report['flops_per_step'], report['global_batch']) == (False, None, 16384)
  assert report['memory_per_device_bytes'] == round(32.59 * GiB)
  assert report['hbm_per_device_bytes'] == 16 * GiB and report['per_device_batch'] == 4096
  assert report['memory_required_for'] == 'HLO temporaries'
  assert report['available_hbm_bytes'] == round(15.75 * GiB)


def _aot_table():
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), '..', 'benchmarks', 'aot_table.py')
  spec = importlib.util.spec_from_file_location('aot_table', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_results_table_rows_come_from_the_reports():
  """benchmarks/aot_table.py: a fitting report's figures, and a refusal's compiler figures."""
  fits = dict(config='configs/cifar10.py', topology='v4:2x2x1', devices=4, device_kind='TPU v4',
              global_batch=128, per_device_batch=32, dtype='bfloat16', remat=True,
              compile_seconds=785.9, fits=True, flops_per_step=1.1346e12,
              memory_per_device_bytes=round(1.13 * GiB), argument_bytes=round(0.53 * GiB),
              temp_bytes=round(0.59 * GiB), hbm_per_device_bytes=32 * GiB,
              images_per_second_at_40pct=12409.6, images_per_second_at_60pct=18614.4)
  refused = dict(config='configs/cifar10.py', topology='v5e:2x2', devices=4,
                 device_kind='TPU v5 lite', global_batch=16384, per_device_batch=4096,
                 dtype='bfloat16', remat=False, compile_seconds=86.0, fits=False,
                 flops_per_step=None, memory_per_device_bytes=round(32.59 * GiB),
                 available_hbm_bytes=round(15.75 * GiB), memory_required_for='HLO temporaries',
                 hbm_per_device_bytes=16 * GiB, error=REFUSAL)
  lines = _aot_table().table([refused, fits]).splitlines()
  assert len(lines) == 4 and lines[0].count('|') == lines[1].count('|') == lines[2].count('|')
  assert lines[2] == ('| cifar10 | v4:2x2x1 | 4 x TPU v4 | 128 | bfloat16 | yes | 786 | 1.135 | '
                      '35.46 | 1.13 (0.53 args + 0.59 temps) | 32.00 | yes | 12,410 | 18,614 |')
  assert lines[3] == ('| cifar10 | v5e:2x2 | 4 x TPU v5 lite | 16384 | bfloat16 | no | 86 | — | '
                      '— | 32.59 needed for HLO temporaries (15.75 usable) | 16.00 | **no** | '
                      '— | — |')
  short = _aot_table().table([fits, refused], short=True).splitlines()
  assert short[0] == ('| config | topology | global batch | remat | TFLOP/device/step | '
                      'memory GiB/device | HBM GiB/device | fits | images/s at 40% peak | '
                      'images/s at 60% peak |')
  assert short[2] == '| cifar10 | v4:2x2x1 | 128 | yes | 1.135 | 1.13 | 32.00 | yes | 12,410 | 18,614 |'


def test_results_table_remat_saving_line():
  base = dict(config='configs/celeba_hq256.py', topology='v4:2x2x1', global_batch=64,
              per_device_batch=16, argument_bytes=GiB)
  off = dict(base, remat=False, flops_per_step=10e12, memory_per_device_bytes=6 * GiB,
             temp_bytes=5 * GiB)
  on = dict(base, remat=True, flops_per_step=13e12, memory_per_device_bytes=3 * GiB,
            temp_bytes=2 * GiB)
  other = dict(off, topology='v5e:2x2')  # no remat twin: no line
  assert _aot_table().remat_savings([other, on, off]) == [
      '- celeba_hq256 on v4:2x2x1, global batch 64: model.remat saves 3.00 GiB per device (50% of '
      '6.00 GiB; temporaries 5.00 -> 2.00 GiB, -3.00) for +30% FLOPs per step.']


def test_results_table_replaces_only_its_block(tmp_path):
  module = _aot_table()
  path = tmp_path / 'RESULTS.md'
  path.write_text(f'# head\n{module.BEGIN}\n| old |\n{module.END}\ntail\n')
  module.update(str(path), '| new |\n|---|')
  assert path.read_text() == f'# head\n{module.BEGIN}\n| new |\n|---|\n{module.END}\ntail\n'


@pytest.mark.parametrize('topology', ['v9:2x2', 'tpu'])
def test_bad_topology_exits_2_with_examples(topology):
  r = _cli('--topology', topology)
  assert r.returncode == 2, r.stderr
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith(f"error: --topology='{topology}'")
  assert 'v4:2x2x1' in lines[0] and 'v5e:2x2' in lines[0]


# --- the real TPU compiler (libtpu) --------------------------------------------------------


def _independent_flops(config, per_device_batch):
  """FLOPs of the same train step for one device's batch, counted by XLA on the CPU."""
  import jax
  config = config.copy_and_resolve_references()
  config.training.batch_size = per_device_batch
  return aot.lower_train_step(config, jax.devices('cpu')[:1]).cost_analysis()['flops']


@pytest.mark.slow
def test_digits_compiles_for_v5e_and_reports(tmp_path):
  pytest.importorskip('libtpu', reason="needs pip install -e '.[tpu]'")
  from diffusion_jax import config_lib
  path = tmp_path / 'report.json'
  r = _cli('--topology', 'v5e:2x2', '--json', str(path))
  assert r.returncode == 0, r.stdout + r.stderr
  assert 'takes minutes' in r.stdout and 'fits' in r.stdout
  report = json.loads(path.read_text())
  for key in ('flops_per_step', 'memory_per_device_bytes', 'hbm_per_device_bytes', 'fits',
              'devices', 'device_kind', 'global_batch', 'compile_seconds', 'topology', 'config'):
    assert key in report, key
  assert (report['devices'], report['device_kind'], report['global_batch']) == (
      4, 'TPU v5 lite', 128)
  assert report['hbm_per_device_bytes'] == 16 * GiB and report['fits'] is True
  assert 0 < report['memory_per_device_bytes'] < report['hbm_per_device_bytes']
  # Parameters, Adam moments and EMA (4 x 1,112,801 float32) are arguments on every device.
  assert report['argument_bytes'] >= 4 * 4 * 1_112_801
  # XLA:CPU's count of the same step on one device's batch (32 images): 2.780 GFLOP; XLA:TPU
  # counts 2.478 (-10.9%: its optimised HLO fuses away some elementwise work, a large share of
  # this tiny net; its 3x3 convolutions are counted identically).
  expected = _independent_flops(config_lib.digits_config(), 32)
  assert report['flops_per_step'] == pytest.approx(expected, rel=0.15)
  assert report['images_per_second_at_40pct'] == pytest.approx(
      128 * 0.4 * 197e12 / report['flops_per_step'])
