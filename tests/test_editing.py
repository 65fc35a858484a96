"""Inpainting (RePaint) and editing (SDEdit): masks, the time walk, closed-form oracles, the CLI.

Oracles: for data that is one point x*, the optimal denoiser is
eps(x_t, t) = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t); for data N(0, I) it
is eps(x_t, t) = sqrt(1 - abar_t) x_t. Both are exact, so the tests need no
trained model.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffusion_jax import config_lib
from diffusion_jax import editing
from diffusion_jax import editing_cli
from diffusion_jax import main
from diffusion_jax import sampling
from diffusion_jax.evaluation import classifier_metrics
from diffusion_jax.schedule import make_schedule

T = 20
S = make_schedule('linear', T)
SHAPE = (3, 4, 4, 1)
X_STAR = jnp.linspace(-0.8, 0.8, 16).reshape(1, 4, 4, 1)


def point_oracle(x, t):
  """The optimal eps for data = {X_STAR}."""
  a = S.alphas_cumprod[t][:, None, None, None]
  return (x - jnp.sqrt(a) * X_STAR) / jnp.sqrt(1.0 - a)


def gaussian_oracle(x, t):
  """The optimal eps for data ~ N(0, I)."""
  return jnp.sqrt(1.0 - S.alphas_cumprod[t])[:, None, None, None] * x


def _x0(seed=1):
  return jax.random.uniform(jax.random.PRNGKey(seed), SHAPE, minval=-1.0, maxval=1.0)


# --- masks --------------------------------------------------------------------------------


def test_region_masks_have_the_promised_layout():
  bottom = editing.region_mask('bottom_half', 8, 8)
  assert bottom.shape == (8, 8) and bottom.dtype == bool
  assert bottom[:4].all() and not bottom[4:].any()
  np.testing.assert_array_equal(editing.region_mask('top_half', 8, 8), ~bottom)
  left = editing.region_mask('left_half', 8, 8)
  assert not left[:, :4].any() and left[:, 4:].all()
  np.testing.assert_array_equal(editing.region_mask('right_half', 8, 8), ~left)
  center = editing.region_mask('center', 8, 8)
  assert not center[2:6, 2:6].any() and center.sum() == 64 - 16


def test_known_mask_is_nhwc_and_channels_move_together():
  known = editing.known_mask('bottom_half', (2, 8, 8, 3))
  assert known.shape == (2, 8, 8, 3) and known.dtype == bool
  assert (known == known[..., :1]).all() and (known[0] == known[1]).all()
  rnd = editing.known_mask('random', (5, 8, 8, 3), rng=jax.random.PRNGKey(0), fraction=0.25)
  assert rnd.shape == (5, 8, 8, 3) and (rnd == rnd[..., :1]).all()
  assert ((~rnd[..., 0]).sum(axis=(1, 2)) == 16).all()   # exactly 25% missing per image
  assert not (rnd[0] == rnd[1]).all()   # a different subset per image
  image = np.zeros((8, 8), np.uint8)
  image[:, :3] = 255   # white = known
  from_image = editing.known_mask('mask', (2, 8, 8, 1), mask=image)
  assert from_image[..., 0].sum(axis=(1, 2)).tolist() == [24, 24] and from_image[0, 0, :3].all()
  with pytest.raises(ValueError, match='the mask is 5x5 pixels, but the images are 8x8'):
    editing.mask_from_image(np.zeros((5, 5), np.uint8), 8, 8)
  with pytest.raises(ValueError, match="inpaint.missing='nose' is not supported"):
    editing.known_mask('nose', (1, 8, 8, 1))


# --- RePaint ------------------------------------------------------------------------------


def test_repaint_walk_matches_the_reference_schedule():
  # resample=1: the plain chain T-1 .. 0 -> x_0.
  plain = editing.repaint_walk(10, 1, 3)
  np.testing.assert_array_equal(plain[:, 0], np.arange(9, -1, -1))
  np.testing.assert_array_equal(plain[:, 1], plain[:, 0] - 1)
  walk = editing.repaint_walk(10, 3, 2)
  # Moves chain up: each starts where the previous ended; the last reaches x_0 (-1).
  np.testing.assert_array_equal(walk[1:, 0], walk[:-1, 1])
  assert walk[0, 0] == 9 and walk[-1, 1] == -1
  jumps = walk[walk[:, 1] > walk[:, 0]]
  # get_schedule_jump: from each of 0, 2, 4, 6 (below T - j = 8) jump up 2 steps, resample-1 times.
  assert sorted(jumps[:, 0].tolist()) == [0, 0, 2, 2, 4, 4, 6, 6]
  assert (jumps[:, 1] - jumps[:, 0] == 2).all()
  assert (walk[:, 1] < walk[:, 0]).sum() == 10 + 8 * 2   # T steps + one jump's length per jump


@pytest.mark.parametrize('method,kw', [('replace', {}), ('repaint', dict(resample=3, jump_length=4)),
                                       ('repaint', dict(resample=2, jump_length=1, num_steps=7)),
                                       ('repaint', dict(resample=2, jump_length=3, eta=0.0))])
def test_inpaint_keeps_known_pixels_and_the_oracle_fills_in_its_point(method, kw):
  x0 = _x0()
  known = editing.known_mask('bottom_half', SHAPE)
  out = jax.jit(lambda r: editing.inpaint(S, point_oracle, r, x0, known, method=method, **kw))(
      jax.random.PRNGKey(0))
  assert out.shape == SHAPE
  np.testing.assert_array_equal(np.asarray(out)[known], np.asarray(x0)[known])   # exactly
  np.testing.assert_allclose(np.asarray(out)[~known],
                             np.broadcast_to(X_STAR, SHAPE)[~known], atol=1e-4)


def test_inpaint_known_mask_broadcasts():
  x0 = _x0()
  known_hw1 = editing.region_mask('left_half', 4, 4)[:, :, None]   # [H, W, 1]
  out = editing.inpaint(S, gaussian_oracle, jax.random.PRNGKey(0), x0, known_hw1,
                        method='replace', clip_denoised=False)
  full = np.broadcast_to(known_hw1, SHAPE)
  np.testing.assert_array_equal(np.asarray(out)[full], np.asarray(x0)[full])
  assert np.abs(np.asarray(out)[~full] - np.asarray(x0)[~full]).max() > 0.1   # generated


# --- SDEdit -------------------------------------------------------------------------------


def _edit(x0, strength, sampler='ancestral', **kw):
  return editing.sdedit(S, gaussian_oracle, jax.random.PRNGKey(0), x0, strength=strength,
                        sampler=sampler, clip_denoised=False, **kw)


@pytest.mark.parametrize('sampler,kw', [('ancestral', dict(var_type='fixed_large')),
                                        ('ddim', dict(num_steps=5)),
                                        ('dpm_solver', dict(num_steps=5, order=2))])
def test_sdedit_small_strength_stays_close_and_strength_one_forgets(sampler, kw):
  x0 = _x0()
  pair = jnp.stack([x0, -x0])   # two inputs, edited with the same key (the same noise)
  dist = {}
  for strength in (0.05, 0.5, 1.0):   # t0 = 1, 10 and 20 of 20
    a, b = jax.jit(jax.vmap(lambda x, st=strength: _edit(x, st, sampler, **kw)))(pair)
    dist[strength] = (float(jnp.abs(a - x0).mean()), float(jnp.abs(a - b).max()))
  assert dist[0.05][0] < 0.05 and dist[1.0][0] > 0.5, dist
  assert dist[0.5][1] > 0.1, dist
  # Strength 1 starts from x_T ~ N(0, I): the same noise gives the same output for any input.
  assert dist[1.0][1] == 0.0, dist


def test_sdedit_strength_one_is_the_plain_sampler():
  x0 = _x0()
  z = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), 0x57A), SHAPE)
  plain = sampling.p_sample_loop(S, gaussian_oracle, jax.random.PRNGKey(0), SHAPE,
                                 clip_denoised=False, x_T=z)
  np.testing.assert_allclose(_edit(x0, 1.0, var_type='fixed_large'), plain, atol=1e-5)


def test_sdedit_dpm_solver_of_order_one_is_ddim():
  x0 = _x0()
  ddim = _edit(x0, 0.5, 'ddim', num_steps=4)
  np.testing.assert_allclose(_edit(x0, 0.5, 'dpm_solver', num_steps=4, order=1), ddim, atol=1e-5)


def test_segment_timesteps_end_at_t0():
  assert editing.edit_start_index(1000, 0.15) == 149 and editing.edit_start_index(1000, 1.0) == 999
  assert editing.segment_num_steps(100, 1000, 149) == 15
  tau = editing.segment_timesteps(149, 15)
  assert tau[0] == 0 and tau[-1] == 149 and len(tau) == 15 and (np.diff(tau) > 0).all()
  quad = editing.segment_timesteps(149, 15, 'quadratic')
  assert quad[0] == 0 and quad[-1] == 149 and np.diff(quad)[0] < np.diff(quad)[-1]
  np.testing.assert_array_equal(editing.segment_timesteps(4), np.arange(5))
  assert editing.segment_timesteps(9, 1).tolist() == [9]
  for bad in (0.0, 1.5, -0.1):
    with pytest.raises(ValueError, match=r'edit.strength must be in \(0, 1\]'):
      editing.edit_start_index(1000, bad)


# --- the modes, with a fake checkpoint -------------------------------------------------------


class _PointModel:
  """A stand-in for the U-Net: the point oracle of an 8x8 digit-like image."""

  def __init__(self, s):
    self.s = s
    self.x_star = jnp.asarray(np.linspace(-1, 1, 64).reshape(1, 8, 8, 1), jnp.float32)

  def apply(self, variables, x, t, y=None, train=False):
    del variables, y, train
    a = self.s.alphas_cumprod[t][:, None, None, None]
    return (x - jnp.sqrt(a) * self.x_star) / jnp.sqrt(1.0 - a)


def _tiny_digits(**overrides):
  config = config_lib.digits_config()
  config.diffusion.num_timesteps = T
  config.sampling.batch_size = 8
  config.sampling.num_steps = 10
  for key, value in overrides.items():
    section, field = key.split('.')
    config[section][field] = value
  return config


@pytest.fixture
def fake_checkpoint(monkeypatch):
  def restore(config, workdir, **kw):
    del workdir, kw
    return _PointModel(S), S, None, 7, {}
  monkeypatch.setattr(editing_cli.rt, 'restore_for_eval', restore)


def test_inpaint_mode_writes_npz_and_grid(tmp_path, fake_checkpoint):
  config = _tiny_digits(**{'inpaint.num_images': 11, 'inpaint.resample': 2,
                           'inpaint.jump_length': 5})
  out = editing_cli.run_inpaint(config, str(tmp_path))
  with np.load(out['npz']) as f:
    images, originals, known, labels = f['images'], f['originals'], f['known'], f['labels']
  assert images.shape == originals.shape == known.shape == (11, 8, 8, 1)
  assert images.dtype == originals.dtype == np.uint8 and known.dtype == bool
  assert out['npz'].endswith('samples/inpaint_bottom_half.npz') and os.path.exists(out['png'])
  np.testing.assert_array_equal(images[known], originals[known])   # kept exactly
  assert known[:, :4].all() and not known[:, 4:].any()
  star = np.round((np.asarray(_PointModel(S).x_star) + 1) * 127.5).astype(np.uint8)
  np.testing.assert_allclose(images[~known], np.broadcast_to(star, images.shape)[~known], atol=1)
  np.testing.assert_array_equal(labels, classifier_metrics.digits_labels('test')[:11])
  assert Image.open(out['png']).size[0] > 0


def test_edit_mode_writes_npz(tmp_path, fake_checkpoint):
  config = _tiny_digits(**{'edit.num_images': 5, 'edit.strength': 0.1,
                           'sampling.sampler': 'ddim'})
  out = editing_cli.run_edit(config, str(tmp_path))
  assert out['npz'].endswith('samples/edit_s0.1.npz') and os.path.exists(out['png'])
  with np.load(out['npz']) as f:
    assert f['images'].shape == f['originals'].shape == (5, 8, 8, 1)
    assert f['images'].dtype == np.uint8 and f['labels'].shape == (5,)


# --- bad input: one line, exit code 2, nothing written (more cases in test_main.py) ------------


def test_mask_of_the_wrong_size_is_one_line(tmp_path, capsys):
  Image.fromarray(np.full((5, 5), 255, np.uint8)).save(tmp_path / 'mask.png')
  for path, expected in ((tmp_path / 'mask.png', 'the mask is 5x5 pixels, but the images are 8x8'),
                         (tmp_path / 'none.png', 'does not exist')):
    with pytest.raises(SystemExit):
      main.run(_tiny_digits(**{'inpaint.missing': 'mask', 'inpaint.mask_path': str(path)}),
               'inpaint', str(tmp_path / 'run'))
    err = capsys.readouterr().err
    assert err.startswith('error: inpaint.mask_path') and expected in err, err
    assert err.count('\n') == 1 and not (tmp_path / 'run').exists()


def test_modes_are_on_the_command_line():
  assert {'inpaint', 'edit'} <= set(main.MODES)


# --- sharding ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_make_fns_shard_the_batch_over_devices():
  """Two host CPU devices: the outputs come back sharded on the batch axis, same values."""
  code = textwrap.dedent('''
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import PartitionSpec as P
      from diffusion_jax import config_lib, editing, runner, settings
      from diffusion_jax.schedule import make_schedule
      assert jax.device_count() == 2
      config = config_lib.base_config()
      config.diffusion.num_timesteps = 10
      config.inpaint.resample, config.inpaint.jump_length = 2, 3
      config.edit.strength = 0.5
      s = make_schedule('linear', 10)
      apply_fn = lambda p, x, t: p['w'] * x
      params = {'w': jnp.float32(0.1)}
      x0 = np.linspace(-1, 1, 64, dtype=np.float32).reshape(4, 4, 4, 1)
      known = editing.known_mask('center', x0.shape)
      spec, cond = settings.sampler_spec(config), settings.conditioning(config)
      f = runner.make_inpaint_fn(settings.inpaint_settings(config), spec, cond, s, apply_fn,
                                 batch_size=4)
      x = f(params, jax.random.PRNGKey(0), x0, known)
      assert x.sharding.spec == P('data') and len(x.sharding.device_set) == 2, x.sharding
      ref = editing.inpaint(s, lambda x, t: 0.1 * x, jax.random.PRNGKey(0), x0, known,
                            resample=2, jump_length=3)
      np.testing.assert_allclose(np.asarray(x), np.asarray(ref), atol=1e-5)
      g = runner.make_sdedit_fn(0.5, spec, cond, s, apply_fn, batch_size=4)
      e = g(params, jax.random.PRNGKey(0), x0)
      assert e.sharding.spec == P('data'), e.sharding
      ref = editing.sdedit(s, lambda x, t: 0.1 * x, jax.random.PRNGKey(0), x0, strength=0.5)
      np.testing.assert_allclose(np.asarray(e), np.asarray(ref), atol=1e-5)
      print('OK')
  ''')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0 and 'OK' in out.stdout, out.stderr[-3000:]
