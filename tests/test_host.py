"""Tests for diffusion_jax.host: CPU device count and XLA:CPU flags, set before JAX starts."""

import os
import subprocess
import sys

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
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=dot')
  assert not host.configure_xla_cpu_flags()
  assert os.environ['XLA_FLAGS'] == '--xla_cpu_experimental_ynn_fusion_type=dot'


def test_ynn_flag_only_for_known_jaxlib(monkeypatch):
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  monkeypatch.setattr(host, '_jaxlib_version', lambda: (9, 99))
  assert not host.configure_xla_cpu_flags()
  assert 'XLA_FLAGS' not in os.environ
  monkeypatch.setattr(host, '_jaxlib_version', lambda: host._YNN_OFF_VERSIONS[0])
  monkeypatch.setenv('XLA_FLAGS', '--xla_dump_to=/tmp/x')
  assert host.configure_xla_cpu_flags()
  assert os.environ['XLA_FLAGS'] == ('--xla_dump_to=/tmp/x '
                                     '--xla_cpu_experimental_ynn_fusion_type=')


_CHILD = """
import jax
from diffusion_jax import config_lib, host
config = config_lib.digits_config()
config.training.cpu_devices = {requested}
set_to = host.configure_cpu(config)
print(set_to, jax.device_count(), jax.default_backend())
"""


@pytest.mark.parametrize('requested,want', [(0, None), (3, 3), (-1, 1)])
def test_configure_cpu_in_a_fresh_process(requested, want):
  """Before JAX starts, configure_cpu sets the device count; the flags it adds parse."""
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES')}
  env['JAX_PLATFORMS'] = 'cpu'
  out = subprocess.run([sys.executable, '-c', _CHILD.format(requested=requested)], env=env,
                       capture_output=True, text=True, timeout=120, check=True).stdout.split()
  expected = host.cpu_device_count(128) if want is None else want
  assert out[1] == str(expected) and out[2] == 'cpu'
  assert out[0] == ('None' if requested < 0 else str(expected))
