"""Tests for diffusion_jax.flat_state: the train state with flat parameter vectors."""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax import config_lib
from diffusion_jax import flat_state
from diffusion_jax import train
from test_train import ONE_LEVEL, tiny_config


def _setup(**overrides):
  config = tiny_config(**ONE_LEVEL, **overrides)
  return config, train.setup(config)


def test_flatten_then_unflatten_is_the_identity():
  _, (_, _, _, mesh, state) = _setup(**{'optim.optimizer': 'adamw',
                                        'optim.weight_decay': 0.01})
  # Distinct moments, so that a mix-up of mu, nu and the parameters would show.
  state = state.replace(opt_state=jax.tree.map(lambda x: x + 0.5 if x.ndim else x,
                                               state.opt_state),
                        ema_params=jax.tree.map(lambda x: x - 0.25, state.ema_params))
  flat, layout = flat_state.flatten(state, mesh)
  size = sum(x.size for x in jax.tree.leaves(state.params))
  assert flat.params.shape == flat.ema_params.shape == (size,)
  moments = [x for x in jax.tree.leaves(flat.opt_state) if x.ndim]
  assert [m.shape for m in moments] == [(size,)] * 2          # Adam's mu and nu
  chex.assert_trees_all_equal(layout.unflatten(flat), state)
  chex.assert_trees_all_equal(layout.params_tree(flat.ema_params), state.ema_params)
  chex.assert_trees_all_equal(layout.unravel(flat.params), state.params)
  np.testing.assert_array_equal(flat.params, np.concatenate(
      [np.ravel(x) for x in jax.tree.leaves(state.params)]))


def test_enabled_follows_the_config_and_the_platform():
  config = config_lib.digits_config()
  mesh = train.make_mesh()
  assert flat_state.enabled(config, mesh)   # 'auto' on the CPU
  for mode, want in (('on', True), ('off', False)):
    config.training.flat_state = mode
    assert flat_state.enabled(config, mesh) is want
  config.training.flat_state = 'flat'
  with pytest.raises(ValueError, match=r'training\.flat_state.*auto.*on.*off'):
    config_lib.validate_config(config)


@pytest.mark.parametrize('weighting', ['none', 'min_snr'])
def test_a_flat_step_is_the_tree_step(weighting):
  """One step on the flat state computes the tree step, to float32 rounding (the norm's sums)."""
  config, (model, schedule, optimizer, mesh, state) = _setup(
      **{'diffusion.loss_weighting': weighting, 'optim.warmup_steps': 0, 'optim.lr': 1e-3})
  x = np.random.default_rng(0).uniform(-1, 1, (1, 8) + train.image_shape(config))
  batch = {'image': jax.device_put(x.astype(np.float32), train.batch_sharding(mesh))}
  flat, layout = flat_state.flatten(state, mesh)
  tree_fn = train.make_train_fn(config, model, schedule, optimizer, mesh)
  flat_fn = train.make_train_fn(config, model, schedule, optimizer, mesh,
                                unravel=layout.unravel)
  want, want_metrics = tree_fn(jax.tree.map(jnp.copy, state), batch)
  got, got_metrics = flat_fn(flat, batch)
  got = layout.unflatten(got)
  chex.assert_trees_all_close(got, want, rtol=2e-6, atol=1e-7)
  chex.assert_trees_all_close(got_metrics, want_metrics, rtol=1e-6)
  moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(got.params),
                                                          jax.tree.leaves(state.params)))
  assert moved > 1e-4   # the step changed the parameters


def test_a_non_finite_flat_step_keeps_the_state():
  config, (model, schedule, optimizer, mesh, state) = _setup()
  flat, layout = flat_state.flatten(state, mesh)
  x = np.full((1, 8) + train.image_shape(config), np.nan, np.float32)
  batch = {'image': jax.device_put(x, train.batch_sharding(mesh))}
  fn = train.make_train_fn(config, model, schedule, optimizer, mesh, unravel=layout.unravel)
  got, metrics = fn(jax.tree.map(jnp.copy, flat), batch)
  assert float(metrics['finite'][0]) == 0.0
  chex.assert_trees_all_equal(got.replace(step=flat.step), flat)
  assert int(got.step) == int(flat.step) + 1


_STEPS_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
from diffusion_jax import data as data_lib, flat_state, train
from test_train import ONE_LEVEL, tiny_config
config = tiny_config(**ONE_LEVEL)
model, schedule, optimizer, mesh, state = train.setup(config)
it = data_lib.create_train_iterator(config)
sharding = train.batch_sharding(mesh)
batches = [{'image': jax.device_put(np.asarray(next(it)['image'])[None], sharding)}
           for _ in range(4)]
flat, layout = flat_state.flatten(state, mesh)
init = jax.device_get(state.params)   # the tree step donates the state
out = {}
for name, s, lay in (('tree', state, None), ('flat', flat, layout)):
  fn = train.make_train_fn(config, model, schedule, optimizer, mesh, unravel=lay and lay.unravel)
  for batch in batches:
    s, _ = fn(s, batch)
  out[name] = jax.device_get(s if lay is None else lay.unflatten(s))
num = sum(float(np.sum((np.float64(a) - b) ** 2))
          for a, b in zip(jax.tree.leaves(out['flat']), jax.tree.leaves(out['tree'])))
den = sum(float(np.sum(np.float64(b) ** 2)) for b in jax.tree.leaves(out['tree']))
moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(out['flat'].params),
                                                      jax.tree.leaves(init)))
print('RESULT', jax.device_count(), (num / den) ** 0.5, moved)
"""


@pytest.mark.parametrize('devices', [1, 2])
def test_four_flat_steps_equal_four_tree_steps(devices):
  """The training loop's flat state over four steps, on one and two CPU devices, as the tree's."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  proc = subprocess.run([sys.executable, '-c', _STEPS_CHILD, os.path.dirname(__file__)],
                        capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  count, rel, moved = proc.stdout.split('RESULT')[1].split()
  assert int(count) == devices
  assert float(rel) < 1e-6, rel
  assert float(moved) > 1e-4, moved


def test_optax_on_a_flat_vector_is_optax_on_the_tree():
  """The property the flat state rests on: clip + Adam(W) per element, one global norm."""
  rng = np.random.default_rng(1)
  tree = {'a': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
          'b': {'c': jnp.asarray(rng.normal(size=(5,)), jnp.float32)}}
  grads = jax.tree.map(lambda x: 3.0 * x[::-1] if x.ndim == 1 else 3.0 * x.T.reshape(x.shape),
                       tree)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
  flat, unravel = jax.flatten_util.ravel_pytree(tree)
  flat_g = jax.flatten_util.ravel_pytree(grads)[0]
  u_tree, _ = opt.update(grads, opt.init(tree), tree)
  u_flat, _ = opt.update(flat_g, opt.init(flat), flat)
  chex.assert_trees_all_close(unravel(u_flat), u_tree, rtol=1e-6)
