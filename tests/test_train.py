"""Tests for the training system: CLI end to end, exact resume, multi-device equivalence, guards."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import checkpoint as ckpt
from diffusion_jax import config_lib
from diffusion_jax import data as data_lib
from diffusion_jax import host
from diffusion_jax import metric_writers
from diffusion_jax import train

TINY = {
    'model.ch': 32, 'model.ch_mult': (1, 2), 'model.num_res_blocks': 1, 'model.num_groups': 8,
    'model.attn_resolutions': (4,), 'diffusion.num_timesteps': 20, 'training.batch_size': 16,
    'optim.warmup_steps': 2, 'sampling.sampler': 'ddim', 'sampling.num_steps': 5,
    'training.num_sample_images': 4,
}


def tiny_config(**overrides):
  config = config_lib.digits_config()
  for key, value in {**TINY, **overrides}.items():
    section, name = key.split('.')
    config[section][name] = value
  return config


def _cli(workdir, *flags, **kw):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  args = [f'--default_config.{k}={v}'.replace(' ', '') for k, v in TINY.items()]
  return subprocess.Popen([sys.executable, '-m', 'diffusion_jax.main', f'--workdir={workdir}',
                           *args, *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env, **kw)


def test_cli_end_to_end_and_resume(tmp_path):
  workdir = tmp_path / 'run'
  flags = ['--default_config.training.num_train_steps=6',
           '--default_config.training.checkpoint_every_steps=3',
           '--default_config.training.log_every_steps=3',
           '--default_config.training.sample_every_steps=6']
  proc = _cli(workdir, *flags)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3', '6']
  assert glob.glob(str(workdir / 'tensorboard' / 'events.out.tfevents.*'))
  assert os.path.getsize(workdir / 'samples' / 'samples_00000006.png') > 0
  resolved = json.loads((workdir / 'config.json').read_text())
  assert resolved['model']['ch'] == 32 and resolved['data']['name'] == 'digits'
  assert f'Outputs in {workdir}' in out
  # Starting the same command with more steps resumes from step 6.
  proc = _cli(workdir, *flags[1:], '--default_config.training.num_train_steps=9')
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  assert 'Resuming from checkpoint' in out and '(step 6 of 9)' in out
  assert '9' in os.listdir(workdir / 'checkpoints')


@pytest.mark.slow   # minutes on 2 cores: run by `pytest -m slow` (and .ci/run)
def test_sigterm_saves_a_checkpoint_and_run_resumes(tmp_path):
  workdir = tmp_path / 'run'
  flags = ['--default_config.training.num_train_steps=100000',
           '--default_config.training.checkpoint_every_steps=100000',
           '--default_config.training.log_every_steps=1',
           '--default_config.training.sample_every_steps=100000']
  proc = _cli(workdir, *flags)
  # Wait for the first logged scalars (several records after the ~50-byte file-version
  # header): they are written inside the training loop, where the SIGTERM handler is
  # installed; the events file itself appears before that.
  deadline = time.time() + 600
  while time.time() < deadline:
    files = glob.glob(str(workdir / 'tensorboard' / 'events.*'))
    if files and os.path.getsize(files[0]) > 150:
      break
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  steps = [int(s) for s in os.listdir(workdir / 'checkpoints')]
  assert len(steps) == 1 and 0 < steps[0] < 100000
  # The resumed run starts from the preemption checkpoint.
  proc = _cli(workdir, *flags[1:], f'--default_config.training.num_train_steps={steps[0] + 1}')
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  assert f'(step {steps[0]} of {steps[0] + 1})' in out


@pytest.mark.slow   # minutes on 2 cores: run by `pytest -m slow` (and .ci/run)
def test_resume_gives_identical_parameters(tmp_path):
  common = dict(**{'training.checkpoint_every_steps': 2, 'training.log_every_steps': 2,
                   'training.sample_every_steps': 100})
  straight = train.train_and_evaluate(tiny_config(**{'training.num_train_steps': 4}, **common),
                                      str(tmp_path / 'a'))
  train.train_and_evaluate(tiny_config(**{'training.num_train_steps': 2}, **common),
                           str(tmp_path / 'b'))
  resumed = train.train_and_evaluate(tiny_config(**{'training.num_train_steps': 4}, **common),
                                     str(tmp_path / 'b'))
  assert int(straight.step) == int(resumed.step) == 4
  chex.assert_trees_all_close(resumed.params, straight.params, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(resumed.ema_params, straight.ema_params, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(resumed.opt_state, straight.opt_state, rtol=1e-6, atol=1e-7)
  # The saved data position is the one the uninterrupted run reached.
  with ckpt.create_manager(str(tmp_path / 'b')) as m:
    data_state = m.restore(4, args=ckpt.ocp.args.Composite(data=ckpt.ocp.args.JsonRestore()))['data']
  assert data_state == {'next_index': 4}


@pytest.mark.slow   # minutes on 2 cores: run by `pytest -m slow` (and .ci/run)
def test_two_runs_with_the_same_seed_are_bitwise_equal(tmp_path):
  config = tiny_config(**{'training.num_train_steps': 3, 'training.checkpoint_every_steps': 3,
                          'training.log_every_steps': 3, 'training.sample_every_steps': 100,
                          'model.dropout': 0.1})
  first = jax.device_get(train.train_and_evaluate(config, str(tmp_path / 'a')))
  second = jax.device_get(train.train_and_evaluate(config, str(tmp_path / 'b')))
  for name in ('params', 'ema_params', 'opt_state', 'rng', 'step'):
    jax.tree.map(np.testing.assert_array_equal, getattr(first, name), getattr(second, name))
  initial = jax.device_get(train.setup(config)[-1].params)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(initial),
                                                      jax.tree.leaves(first.params)))


MULTI_DEVICE_SCRIPT = r'''
import json, re, sys
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
sys.path.insert(0, sys.argv[1])
from test_train import tiny_config
from diffusion_jax import data as data_lib, models, train
assert jax.device_count() == 8, jax.devices()
# dropout 0.1: XLA's all-reduces; dropout 0: on 8 CPU devices, one flat all-reduce.
dropout = float(sys.argv[2])
config = tiny_config(**{'model.dropout': dropout})
model, schedule, optimizer, _, state0 = train.setup(config)
results = {}
for n in (1, 8):
  mesh = train.make_mesh(jax.devices()[:n])
  assert train.flat_all_reduce(config, mesh) == (n == 8 and dropout == 0.0)
  state = jax.device_put(jax.device_get(state0), NamedSharding(mesh, P()))
  step_fn = train.make_train_fn(config, model, schedule, optimizer, mesh)
  it = data_lib.create_train_iterator(config)
  losses = []
  for _ in range(3):
    batches = train.next_batches(it, 1, NamedSharding(mesh, P(None, 'data')))
    assert len(batches['image'].sharding.device_set) == n
    state, metrics = step_fn(state, batches)
    losses.append(float(metrics['loss'][0]))
  results[n] = (losses, jax.device_get(state.params))
  if n == 8:
    hlo = step_fn.lower(state, batches).compile().as_text()
    reduced = [line.split(' = ', 1)[1].split(' all-reduce')[0] for line in hlo.splitlines()
               if re.search(r' all-reduce(-start)?\(', line)]
    whole = f'f32[{models.count_params(state.params)}]'
    if dropout == 0.0:   # the whole gradient (and the loss) in one all-reduce
      assert len(reduced) == 1 and whole in reduced[0], reduced
    else:                # one buffer per parameter
      assert reduced and not any(whole in r for r in reduced), reduced
np.testing.assert_allclose(results[1][0], results[8][0], rtol=1e-5)
# Adam's update lr*m/(sqrt(v)+eps) amplifies reduction-order rounding for
# near-zero gradients: compare to 1% of the learning rate (1e-3).
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
             results[1][1], results[8][1])
print('LOSSES', json.dumps(results[1][0]), json.dumps(results[8][0]))
'''


@pytest.mark.parametrize('dropout', [0.0, pytest.param(0.1, marks=pytest.mark.slow)])
def test_eight_devices_match_one_device(dropout):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', MULTI_DEVICE_SCRIPT, os.path.dirname(__file__),
                         str(dropout)], capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'LOSSES' in proc.stdout


def test_train_step_finite_guard():
  config = tiny_config()
  model, schedule, optimizer, mesh, state = train.setup(config)
  step_fn = train.make_train_fn(config, model, schedule, optimizer, mesh)
  before = jax.device_get(state)
  bad = {'image': jnp.full((1, 16, 8, 8, 1), jnp.nan)}
  state, metrics = step_fn(state, bad)
  assert float(metrics['finite'][0]) == 0.0
  chex.assert_trees_all_equal(jax.device_get(state.params), before.params)
  chex.assert_trees_all_equal(jax.device_get(state.ema_params), before.ema_params)
  with pytest.raises(FloatingPointError, match='Non-finite loss or gradient at step 1'):
    metric_writers.check_finite(metric_writers.fetch([metrics]), 1)
  good = {'image': jnp.zeros((1, 16, 8, 8, 1))}
  state, metrics = step_fn(state, good)
  assert float(metrics['finite'][0]) == 1.0 and int(state.step) == 2


def test_ema_warmup_and_initial_state():
  warm = tiny_config(**{'optim.ema_decay': 0.9, 'optim.ema_warmup': True})
  np.testing.assert_allclose([train.ema_decay(warm, n) for n in (0, 10, 1000)],
                             [1 / 10, 11 / 20, 0.9], rtol=1e-6)
  config = tiny_config(**{'optim.ema_decay': 0.5, 'optim.warmup_steps': 4, 'optim.lr': 1e-2,
                          'optim.ema_warmup': False})
  lr = train.learning_rate_schedule(config)
  np.testing.assert_allclose([lr(0), lr(2), lr(4), lr(100)], [0.0, 5e-3, 1e-2, 1e-2], rtol=1e-6)
  model, schedule, optimizer, mesh, state = train.setup(config)
  # setup compiles the initial state without LLVM optimisation (it runs once): the same bits
  # as the program compiled with XLA's default options.
  assert train.run_once_compiler_options(mesh) == {'xla_backend_optimization_level': 0}
  ref = jax.jit(lambda rng: train.create_train_state(config, model, optimizer, rng))(
      jax.random.PRNGKey(config.seed))
  chex.assert_trees_all_equal(jax.device_get(state), jax.device_get(ref))
  step_fn = train.make_train_fn(config, model, schedule, optimizer, mesh)
  it = data_lib.create_train_iterator(config)
  p0 = jax.device_get(state.params)
  for _ in range(3):
    state, _ = step_fn(state, {'image': jnp.asarray(next(it)['image'])[None]})
  # ema_k = 0.5 ema_{k-1} + 0.5 p_k on the next step.
  ema_prev = jax.device_get(state.ema_params)
  state, _ = step_fn(state, {'image': jnp.asarray(next(it)['image'])[None]})
  expected = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, ema_prev, jax.device_get(state.params))
  chex.assert_trees_all_close(jax.device_get(state.ema_params), expected, rtol=1e-6, atol=1e-7)
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(p0),
                                                    jax.tree.leaves(jax.device_get(state.params))))


XLA_DEFAULT_LEVEL = {'xla_backend_optimization_level': 3}   # XLA's own default
ONE_LEVEL = {'model.ch_mult': (1,), 'model.attn_resolutions': ()}   # compiles in seconds


def test_train_step_compiles_with_less_llvm_optimisation_and_equal_results(monkeypatch):
  config = tiny_config(**ONE_LEVEL)
  model, schedule, optimizer, mesh, state = train.setup(config)
  assert host.cpu_compiler_options(mesh) == {'xla_backend_optimization_level': 1}
  step_fn = train.make_train_fn(config, model, schedule, optimizer, mesh)
  batch = {'image': jnp.asarray(next(data_lib.create_train_iterator(config))['image'])[None]}
  fresh = lambda: jax.tree.map(jnp.copy, state)   # the step donates its state
  ref = step_fn.lower(state, batch).compile(compiler_options=XLA_DEFAULT_LEVEL)(fresh(), batch)
  # Equal up to float32 rounding: LLVM's level changes no arithmetic but may order a
  # vectorised sum differently (1 ulp in a few Adam moments seen here).
  chex.assert_trees_all_close(jax.device_get(step_fn(fresh(), batch)), jax.device_get(ref),
                              rtol=2e-6, atol=1e-9)
  # make_train_fn hands host.cpu_compiler_options to XLA: an unknown option is refused.
  monkeypatch.setattr(host, 'cpu_compiler_options', lambda *a, **k: {'no_such_option': 1})
  with pytest.raises(Exception, match='no_such_option'):
    train.make_train_fn(config, model, schedule, optimizer, mesh)(fresh(), batch)


KIND_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np
from diffusion_jax import data as data_lib, host, train
from test_train import ONE_LEVEL, XLA_DEFAULT_LEVEL, tiny_config
config = tiny_config(**ONE_LEVEL)
model, schedule, optimizer, mesh, state = train.setup(config)
options = host.cpu_compiler_options(mesh, kind='train_step')
serial = host.SERIAL_LOOPS if host.single_thread_ops(jax.device_count()) else {}
assert options == {'xla_backend_optimization_level': 1, **host.YNN_OFF, **serial}, options
it = data_lib.create_train_iterator(config)
batches = [{'image': jax.device_put(np.asarray(next(it)['image'])[None], train.batch_sharding(mesh))}
           for _ in range(4)]
ours = train.make_train_fn(config, model, schedule, optimizer, mesh).lower(
    state, batches[0]).compile()   # make_train_fn compiles with the options above
host.cpu_compiler_options = lambda *a, **k: None   # the reference: XLA's defaults throughout
ref = train.make_train_fn(config, model, schedule, optimizer, mesh).lower(
    state, batches[0]).compile(compiler_options=XLA_DEFAULT_LEVEL)
# With YNNPACK off, dots inside a while loop raced on two devices (benchmarks/ynn_repro.py):
# the step's only loops are the RNG's (integer arithmetic), with no convolution or dot inside.
import re
text = ours.as_text()
blocks = dict(re.findall(r'^(?:ENTRY )?%(\S+) [^\n]*\{\n(.*?)^\}', text, re.M | re.S))
def reach(name, seen):
  if name not in seen:
    seen.add(name)
    for callee in re.findall(r'(?:body|condition|calls|to_apply)=%([\w.\-]+)', blocks[name]):
      reach(callee, seen)
  return seen
bodies = re.findall(r'body=%([\w.\-]+)', text)
assert bodies, 'expected the RNG while loops'
for body in bodies:
  for name in reach(body, set()):
    assert not re.search(r' (convolution|dot)\(', blocks[name]), (body, name)
a, b = (jax.tree.map(jnp.copy, state) for _ in range(2))   # the step donates its state
for batch in batches:
  a, _ = ours(a, batch)
  b, _ = ref(b, batch)
a, b = jax.device_get((a, b))
moved = max(float(np.abs(u - v).max()) for u, v in zip(jax.tree.leaves(state.params), jax.tree.leaves(b.params)))
assert moved > 1e-4, moved   # the steps changed the parameters
num = sum(float(np.sum((np.float64(u) - v) ** 2)) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
den = sum(float(np.sum(np.float64(v) ** 2)) for v in jax.tree.leaves(b))
print('RELATIVE_L2', jax.device_count(), (num / den) ** 0.5)
"""


@pytest.mark.parametrize('devices', [1, 2])
def test_train_step_kind_options_compute_what_xla_defaults_compute(devices):
  """The train step's own options (YNNPACK fusions off, ...) give XLA's defaults' step.

  Four steps on one and on two CPU devices, from the same state and batches,
  compiled with ``host.cpu_compiler_options(mesh, kind='train_step')`` and with
  XLA's default options: the whole state (parameters, EMA, Adam moments) agrees
  to float32 rounding (Eigen and YNNPACK sum in different orders). The
  whole-loop option is checked where it changes the program, at the digits
  step's size (``tests/test_host.py``).
  """
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  proc = subprocess.run([sys.executable, '-c', KIND_SCRIPT, os.path.dirname(__file__)],
                        capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  count, rel = proc.stdout.split('RELATIVE_L2')[1].split()
  assert int(count) == devices
  assert float(rel) < 1e-6, rel


def test_min_snr_loss_weighting_reaches_the_train_step():
  from diffusion_jax import diffusion, timestep_sampler
  losses = {}
  for weighting in ('none', 'min_snr'):
    config = tiny_config(**ONE_LEVEL, **{'diffusion.loss_weighting': weighting,
                                         'diffusion.min_snr_gamma': 2.0})
    model, schedule, optimizer, mesh, state = train.setup(config)
    x0 = jnp.asarray(next(data_lib.create_train_iterator(config))['image'])
    # The step's own draws (train.train_step): t and the noise from fold_in(rng, step).
    t_rng, noise_rng, _ = jax.random.split(jax.random.fold_in(state.rng, state.step), 3)
    t, _ = timestep_sampler.sample_timesteps(t_rng, x0.shape[0], config.diffusion.num_timesteps,
                                             None)
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    terms = diffusion.training_losses(
        schedule, train.model_fn_for(model, state.params), x0, t, noise,   # dropout is 0
        weighting=None if weighting == 'none' else weighting, min_snr_gamma=2.0)
    snr = np.asarray(schedule.alphas_cumprod)[np.asarray(t)]
    snr = snr / (1 - snr)
    want_w = np.ones_like(snr) if weighting == 'none' else np.minimum(snr, 2.0) / snr
    np.testing.assert_allclose(terms['loss'], want_w * np.asarray(terms['mse']), rtol=1e-6)
    step_fn = train.make_train_fn(config, model, schedule, optimizer, mesh)
    _, metrics = step_fn(state, {'image': x0[None]})
    np.testing.assert_allclose(metrics['loss'][0], np.mean(terms['loss']), rtol=1e-5)
    losses[weighting] = (float(metrics['loss'][0]), float(metrics['mse'][0]))
  assert losses['min_snr'][1] == pytest.approx(losses['none'][1], rel=1e-6)   # same t, noise
  assert losses['min_snr'][0] < 0.9 * losses['none'][0]
  with pytest.raises(ValueError, match="diffusion.loss_weighting='snr' is not supported; "
                                      'allowed values: none, min_snr'):
    config_lib.validate_config(tiny_config(**{'diffusion.loss_weighting': 'snr'}))


def test_cosine_lr_decay_reaches_zero_at_the_last_step():
  config = tiny_config(**{'optim.lr': 2e-3, 'optim.warmup_steps': 10, 'optim.lr_decay': 'cosine',
                          'training.num_train_steps': 110})
  lr = train.learning_rate_schedule(config)
  steps = np.array([0, 5, 10, 35, 60, 85, 110, 200])
  # Independent closed form: linear warm-up, then lr (1 + cos(pi s / S)) / 2 over S = 100 steps.
  s = np.clip(steps - 10, 0, 100)
  want = np.where(steps < 10, 2e-3 * steps / 10, 2e-3 * 0.5 * (1 + np.cos(np.pi * s / 100)))
  np.testing.assert_allclose([float(lr(n)) for n in steps], want, rtol=1e-5, atol=1e-9)
  assert float(lr(110)) == 0.0 and float(lr(60)) == pytest.approx(1e-3, rel=1e-5)
  with pytest.raises(ValueError, match="optim.lr_decay='linear' is not supported; "
                                      'allowed values: none, cosine'):
    config_lib.validate_config(tiny_config(**{'optim.lr_decay': 'linear'}))


@pytest.mark.slow   # minutes on 2 cores: run by `pytest -m slow` (and .ci/run)
def test_steps_per_call_scan_matches_single_steps():
  config = tiny_config()
  model, schedule, optimizer, mesh, state = train.setup(config)
  one = train.make_train_fn(config, model, schedule, optimizer, mesh)
  it = data_lib.create_train_iterator(config)
  batches = np.stack([next(it)['image'] for _ in range(2)])
  s1 = jax.device_get(state)
  a, _ = one(state, {'image': jnp.asarray(batches[:1])})
  a, _ = one(a, {'image': jnp.asarray(batches[1:])})
  b, m = one(jax.device_put(s1), {'image': jnp.asarray(batches)})
  assert m['loss'].shape == (2,) and int(a.step) == int(b.step) == 2
  chex.assert_trees_all_close(jax.device_get(a.params), jax.device_get(b.params), rtol=1e-4,
                              atol=1e-6)


def test_importance_sampled_vlb_runs():
  config = tiny_config(**{'diffusion.loss_type': 'vlb', 'diffusion.t_sampler': 'importance',
                          'diffusion.var_type': 'learned_range'})
  model, schedule, optimizer, mesh, state = train.setup(config)
  step_fn = train.make_train_fn(config, model, schedule, optimizer, mesh)
  it = data_lib.create_train_iterator(config)
  state, metrics = step_fn(state, {'image': jnp.asarray(next(it)['image'])[None]})
  assert np.isfinite(float(metrics['loss'][0])) and 'vb' in metrics
  assert int(state.loss_history.counts.sum()) == 16


@pytest.mark.parametrize('overrides,match', [
    ({'data.name': 'imagenet'}, 'data.name'),
    ({'data.image_size': 6, 'model.ch_mult': (1, 2, 2)}, 'data.image_size'),
    ({'diffusion.mean_type': 'score'}, 'diffusion.mean_type'),
    ({'sampling.sampler': 'euler'}, 'sampling.sampler'),
    ({'optim.ema_decay': 1.0}, 'optim.ema_decay'),
    ({'training.batch_size': 0}, 'training.batch_size'),
    ({'diffusion.t_sampler': 'importance'}, 'diffusion.t_sampler'),
])
def test_bad_config_values_name_the_field(overrides, match):
  with pytest.raises(ValueError, match=match):
    train.setup(tiny_config(**overrides))


def test_batch_not_divisible_by_devices_names_the_field():
  with pytest.raises(ValueError, match='training.batch_size'):
    data_lib.validate_data_config(tiny_config(**{'training.batch_size': 12}), num_devices=8)


@pytest.mark.slow
def test_two_local_processes_over_jax_distributed(tmp_path):
  """launch/local_multihost.sh: 2 processes x 4 CPU devices over 127.0.0.1 train and checkpoint."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
  flags = [f'--default_config.{k}={v}'.replace(' ', '') for k, v in TINY.items()] + [
      '--default_config.training.num_train_steps=4', '--default_config.training.checkpoint_every_steps=2',
      '--default_config.training.log_every_steps=2', '--default_config.training.sample_every_steps=4']
  proc = subprocess.run(['bash', os.path.join(root, 'launch', 'local_multihost.sh'),
                         str(tmp_path / 'mh'), *flags], capture_output=True, text=True, env=env,
                        timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert sorted(os.listdir(tmp_path / 'mh' / 'checkpoints')) == ['2', '4']
  assert os.path.exists(tmp_path / 'mh' / 'samples' / 'samples_00000004.png')


def _children(pid: int) -> list:
  """Process ids of ``pid``'s children (Linux /proc)."""
  with open(f'/proc/{pid}/task/{pid}/children') as f:
    return [int(c) for c in f.read().split()]


@pytest.mark.slow
def test_two_local_processes_stop_together_on_sigterm_to_one(tmp_path):
  """Preemption on several hosts: SIGTERM to one process; both save the same step and exit 0."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
  flags = [f'--default_config.{k}={v}'.replace(' ', '') for k, v in TINY.items()] + [
      '--default_config.training.checkpoint_every_steps=100000',
      '--default_config.training.log_every_steps=1',
      '--default_config.training.sample_every_steps=100000']
  script = os.path.join(root, 'launch', 'local_multihost.sh')
  workdir = tmp_path / 'mh'
  proc = subprocess.Popen(['bash', script, str(workdir), *flags,
                           '--default_config.training.num_train_steps=100000'],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
  deadline = time.time() + 600
  while not glob.glob(str(workdir / 'tensorboard' / 'events.*')) and time.time() < deadline:
    time.sleep(0.5)
  time.sleep(3)
  assert proc.poll() is None, proc.communicate()[0][-3000:]
  workers = _children(proc.pid)
  assert len(workers) == 2, workers
  os.kill(workers[1], signal.SIGTERM)   # only process 1 is preempted
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  steps = [int(s) for s in os.listdir(workdir / 'checkpoints')]
  assert len(steps) == 1 and 0 < steps[0] < 100000, steps
  proc = subprocess.run(['bash', script, str(workdir), *flags,
                         f'--default_config.training.num_train_steps={steps[0] + 1}'],
                        capture_output=True, text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert f'(step {steps[0]} of {steps[0] + 1})' in proc.stdout


@pytest.mark.parametrize('flag,message', [
    ('--default_config.diffusion.mean_type=score', "error: diffusion.mean_type='score'"),
    ('--default_config.data.name=cifar10', "error: Data set 'cifar10'"),
])
def test_cli_bad_config_is_one_clear_line(tmp_path, flag, message):
  proc = _cli(tmp_path / 'run', flag, f'--default_config.data.data_dir={tmp_path / "none"}')
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode != 0
  assert message in out and 'Traceback' not in out
  assert not (tmp_path / 'run' / 'checkpoints').exists()
