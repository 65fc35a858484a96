"""Class-conditional DDPM and classifier-free guidance (Ho & Salimans 2022): model, data,
training, guided sampling, evaluation."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffusion_jax import config_lib, data as data_lib, guidance, models
from diffusion_jax import samplers, settings, train
from diffusion_jax.evaluation import classifier_metrics
from diffusion_jax.evaluation import guidance_sweep, samples
from diffusion_jax.schedule import make_schedule

from test_train import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_PARAMS = 1_112_801   # README: the digits U-Net


def cond_config(**overrides):
  return tiny_config(**{'model.num_classes': 10, 'model.class_dropout': 0.1, **overrides})


def _init(config, seed=0):
  model = models.create_model(config)
  x = jnp.zeros((1,) + train.image_shape(config))
  params = model.init(jax.random.PRNGKey(seed), x, jnp.zeros((1,), jnp.int32))['params']
  return model, params


def _random_params(params, seed=1):
  """Non-zero weights everywhere (the output conv is zero-initialised)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, p.shape) for k, p in
                                   zip(keys, leaves)])


# --- model ---------------------------------------------------------------------------


def test_parameter_counts_unconditional_and_conditional():
  abstract = lambda c: jax.eval_shape(lambda: _init(c)[1])   # noqa: E731
  digits = config_lib.digits_config()
  assert models.count_params(abstract(digits)) == DIGITS_PARAMS
  assert 'label_emb' not in abstract(digits)
  digits.model.num_classes = 10
  cond = abstract(digits)
  # num_classes + 1 rows (the last is "no label") of the 4 * ch timestep-embedding width.
  assert cond['label_emb']['embedding'].shape == (11, 4 * 32)
  assert models.count_params(cond) == DIGITS_PARAMS + 11 * 128


@pytest.mark.slow
def test_labels_change_the_output_and_none_is_the_null_token():
  config = cond_config()
  model, params = _init(config)
  params = _random_params(params)
  x = jax.random.normal(jax.random.PRNGKey(2), (3, 8, 8, 1))
  t = jnp.array([3, 7, 11], jnp.int32)
  f = lambda y: model.apply({'params': params}, x, t, y=y)   # noqa: E731
  null = f(jnp.full((3,), 10, jnp.int32))
  np.testing.assert_array_equal(f(None), null)
  assert np.abs(f(jnp.array([1, 2, 3])) - null).max() > 1e-3
  with pytest.raises(ValueError, match='unconditional model'):
    umodel, uparams = _init(tiny_config())
    umodel.apply({'params': uparams}, x, t, y=jnp.zeros((3,), jnp.int32))


@pytest.mark.slow   # minutes on 2 cores: run by `pytest -m slow` (and .ci/run)
def test_num_classes_zero_is_bit_identical():
  """Unconditional: the train step ignores a batch's labels bit for bit, and the data
  pipeline yields exactly today's batches (images only)."""
  config = tiny_config()
  model, schedule, optimizer, mesh, state = train.setup(config)
  step_fn = train.make_train_fn(config, model, schedule, optimizer, mesh)
  it = data_lib.create_train_iterator(config)
  batch = next(it)
  assert set(batch) == {'image'}
  s0 = jax.device_get(state)
  a, ma = step_fn(state, {'image': jnp.asarray(batch['image'])[None]})
  b, mb = step_fn(jax.device_put(s0), {'image': jnp.asarray(batch['image'])[None],
                                       'label': jnp.zeros((1, 16), jnp.int32)})
  for x, y in zip(jax.tree.leaves(jax.device_get((a, ma))), jax.tree.leaves(jax.device_get((b, mb)))):
    np.testing.assert_array_equal(x, y)
  # The samplers of an unconditional config run the plain model_fn (no label stream).
  apply_fn = lambda p, x, t: model.apply({'params': p}, x, t)   # noqa: E731
  f = settings.make_sampler(config, schedule, apply_fn, batch_size=4)
  direct = jax.jit(lambda p, rng: samplers.run(
      settings.sampler_spec(config), schedule, lambda x, t: apply_fn(p, x, t), rng,
      (4, 8, 8, 1))[0])
  params = _random_params(s0.params)
  expected = direct(params, jax.random.PRNGKey(3))
  np.testing.assert_array_equal(f(params, jax.random.PRNGKey(3)), expected)
  grid_fn = train.make_sample_fn(config, model, schedule, 4)   # the training-time grid
  np.testing.assert_array_equal(grid_fn(params, jax.random.PRNGKey(3)), expected)


# --- guidance ------------------------------------------------------------------------


def _cond_model_fn():
  config = cond_config(**{'diffusion.var_type': 'learned_range'})
  model, params = _init(config)
  params = _random_params(params)
  return lambda x, t, y: model.apply({'params': params}, x, t, y=y)


def test_guided_eps_equals_the_formula_against_two_calls():
  fn = _cond_model_fn()
  x = jax.random.normal(jax.random.PRNGKey(4), (4, 8, 8, 1))
  t = jnp.array([0, 5, 10, 19], jnp.int32)
  y = jnp.array([0, 3, 7, 9], jnp.int32)
  cond, uncond = fn(x, t, y), fn(x, t, jnp.full((4,), 10, jnp.int32))
  assert cond.shape == (4, 8, 8, 2)   # learned range: mean and variance channels
  for w in (0.5, 3.0):
    got = guidance.guided_model_fn(fn, y, 10, w)(x, t)
    np.testing.assert_allclose(got[..., :1], (1 + w) * cond[..., :1] - w * uncond[..., :1],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[..., 1:], cond[..., 1:], rtol=1e-5, atol=1e-6)
    assert np.abs(got[..., :1] - cond[..., :1]).max() > 1e-3   # guidance did something


def test_guidance_zero_is_the_conditional_model():
  fn = _cond_model_fn()
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 8, 8, 1))
  t, y = jnp.array([4, 9], jnp.int32), jnp.array([2, 8], jnp.int32)
  np.testing.assert_array_equal(guidance.guided_model_fn(fn, y, 10, 0.0)(x, t), fn(x, t, y))
  # The batched formula with a traced w = 0 gives the same numbers.
  traced = jax.jit(lambda w: guidance.guided_model_fn(fn, y, 10, w)(x, t))(0.0)
  np.testing.assert_allclose(traced, fn(x, t, y), rtol=1e-5, atol=1e-6)


def test_class_dropout_fraction_inside_the_step():
  config = cond_config(**{'model.class_dropout': 0.25})
  labels = jnp.asarray(np.random.default_rng(0).integers(0, 10, 20_000), jnp.int32)
  seen = train.training_labels(config, {'label': labels}, jax.random.PRNGKey(6))
  dropped = np.asarray(seen) == 10
  # Binomial(20000, 0.25): standard deviation 0.003.
  assert abs(dropped.mean() - 0.25) < 0.012, dropped.mean()
  np.testing.assert_array_equal(np.asarray(seen)[~dropped], np.asarray(labels)[~dropped])
  other = train.training_labels(config, {'label': labels}, jax.random.PRNGKey(7))
  assert np.mean(np.asarray(other) == 10) > 0.2 and np.any((np.asarray(other) == 10) != dropped)
  config.model.class_dropout = 0.0
  np.testing.assert_array_equal(train.training_labels(config, {'label': labels}, jax.random.PRNGKey(6)),
                                labels)


def test_sample_labels_uniform_or_fixed():
  y = np.asarray(guidance.sample_labels(jax.random.PRNGKey(0), 5000, 10, -1))
  counts = np.bincount(y, minlength=10)
  assert counts.sum() == 5000 and counts.min() > 420 and counts.max() < 580
  np.testing.assert_array_equal(guidance.sample_labels(jax.random.PRNGKey(0), 4, 10, 7), [7] * 4)


# --- two-class Gaussian toy: the exact (oracle) denoiser -------------------------------

MU, STD = 0.5, 0.5    # classes N(-MU, STD^2) (label 0) and N(+MU, STD^2) (label 1), equal priors


def _oracle(s):
  """eps*(x_t, t, y) of the toy data: exact for each class and for the null label 2 (the mixture)."""
  abar_all = s.alphas_cumprod

  def fn(x, t, y):
    abar = abar_all[t].reshape((-1, 1, 1, 1))
    var = abar * STD ** 2 + 1.0 - abar
    means = jnp.stack([-MU, MU]) * jnp.sqrt(abar)[..., None]         # [B, 1, 1, 1, 2]
    logp = -0.5 * (x[..., None] - means) ** 2 / var[..., None]
    post = jax.nn.softmax(logp, axis=-1)                               # p(class | x_t)
    y = y.reshape((-1, 1, 1, 1))
    weights = jnp.where(y[..., None] == 2, post, jax.nn.one_hot(y, 2))
    mean_x = jnp.sum(weights * means, axis=-1)
    return jnp.sqrt(1.0 - abar) * (x - mean_x) / var                  # -sqrt(1-abar) score
  return fn


@pytest.mark.parametrize('sampler', ['ancestral', 'ddim', 'pc'])
def test_guided_samples_move_to_the_asked_for_class(sampler):
  s = make_schedule('cosine', 100)
  config = cond_config(**{'diffusion.num_timesteps': 100, 'diffusion.clip_denoised': False,
                          'sampling.sampler': sampler, 'sampling.num_steps': 50,
                          'model.num_classes': 2, 'data.image_size': 1})
  apply_fn = lambda params, x, t, y: _oracle(s)(x, t, y)   # noqa: E731
  side = {}
  for label in (0, 1):
    for w in (0.0, 4.0):
      config.sampling.class_label, config.sampling.guidance_scale = label, w
      f = settings.make_sampler(config, s, apply_fn, batch_size=4000, devices=jax.devices()[:1])
      x = np.asarray(f({}, jax.random.PRNGKey(label))).ravel()
      sign = -1 if label == 0 else 1
      side[label, w] = np.mean(np.sign(x) == sign)
      if w == 0:   # the conditional model is exact: N(sign MU, STD^2)
        assert abs(x.mean() - sign * MU) < 0.05 and abs(x.std() - STD) < 0.06, (x.mean(), x.std())
  for label in (0, 1):
    # P(N(MU, STD^2) > 0) = Phi(1) = 0.841; guidance pushes samples to the asked-for side.
    assert abs(side[label, 0.0] - 0.841) < 0.03, side
    assert side[label, 4.0] > 0.97, side


# --- data ------------------------------------------------------------------------------


def test_digits_batches_carry_their_labels():
  from sklearn import datasets as sk_datasets
  config = cond_config()
  source = data_lib.get_source(config, 'train')
  digits = sk_datasets.load_digits()
  images = (digits.images[:1500] / 16.0 * 2 - 1).astype(np.float32)
  batch = next(data_lib.create_train_iterator(config))
  assert batch['label'].dtype == np.int32 and batch['label'].shape == (16,)
  for x, y in zip(batch['image'], batch['label']):
    i = int(np.argmin(np.abs(images - x[..., 0]).reshape(1500, -1).sum(axis=1)))
    assert y == digits.target[i]
  np.testing.assert_array_equal(data_lib.load_labels(config, 'test'), digits.target[-297:])
  assert len(source) == 1500


def _save(path, value):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


def test_image_folder_class_subfolders(tmp_path):
  root = tmp_path / 'classes'
  for name, value in (('cat', 0), ('dog', 255)):
    for i in range(3):
      _save(str(root / name / f'{i}.png'), value)
  config = cond_config(**{'model.num_classes': 2, 'data.name': 'image_folder',
                          'data.data_dir': str(root), 'training.batch_size': 6})
  batch = next(data_lib.create_train_iterator(config))
  # cat (label 0) images are black, dog (label 1) images white.
  np.testing.assert_array_equal(batch['label'], (batch['image'][:, 0, 0, 0] > 0).astype(int))
  assert sorted(batch['label']) == [0, 0, 0, 1, 1, 1]
  config.model.num_classes = 3
  with pytest.raises(data_lib.DatasetNotFoundError, match='does not match the 2 class folders'):
    data_lib.get_source(config, 'train')
  _save(str(root / 'loose.png'), 128)
  config.model.num_classes = 2
  with pytest.raises(data_lib.DatasetNotFoundError, match='loose.png'):
    data_lib.get_source(config, 'train')


def test_conditional_config_on_unlabeled_data_is_one_line(tmp_path):
  cmd = [sys.executable, '-m', 'diffusion_jax.main', f'--workdir={tmp_path / "w"}',
         '--default_config.model.num_classes=10', '--default_config.data.name=celeb_a_hq',
         '--default_config.data.image_size=32', '--default_config.data.num_channels=3']
  proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      "error: model.num_classes=10 needs labels, but data.name='celeb_a_hq' has none; labelled "
      'data sets: digits, mnist, cifar10, image_folder with one sub-folder per class (or set '
      'model.num_classes=0).']
  assert not (tmp_path / 'w').exists()


def test_config_validation_names_the_field():
  config = cond_config()
  config.sampling.class_label = 10
  with pytest.raises(ValueError, match=r'sampling.class_label=10 .* -1 \(uniform\) or 0..9'):
    config_lib.validate_config(config)
  config = tiny_config(**{'sampling.guidance_scale': 1.0})
  with pytest.raises(ValueError, match='needs a class-conditional model'):
    config_lib.validate_config(config)
  config = cond_config(**{'model.class_dropout': 1.0})
  with pytest.raises(ValueError, match=r'model.class_dropout must be in \[0, 1\)'):
    config_lib.validate_config(config)
  config = cond_config(**{'model.num_classes': 7})
  with pytest.raises(ValueError, match="does not match data.name='digits', which has 10"):
    data_lib.validate_data_config(config)


# --- sharding ---------------------------------------------------------------------------

SHARDING_SCRIPT = r'''
import sys
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from diffusion_jax import data as data_lib, settings, train
from test_guidance import _random_params, cond_config
assert jax.device_count() == 8
config = cond_config()
model, schedule, optimizer, mesh, state = train.setup(config)
it = data_lib.create_train_iterator(config)
host = next(it)
it = data_lib.create_train_iterator(config)
batches = train.next_batches(it, 1, NamedSharding(mesh, P(None, 'data')))
assert len(batches['label'].sharding.device_set) == 8
np.testing.assert_array_equal(np.asarray(batches['label'])[0], host['label'])
shards = sorted(batches['label'].addressable_shards, key=lambda s: s.index[1].start)
np.testing.assert_array_equal(np.concatenate([np.asarray(s.data)[0] for s in shards]), host['label'])
y = train.training_labels(config, {'label': batches['label'][0]}, jax.random.PRNGKey(0))
np.testing.assert_array_equal(
    y, train.training_labels(config, {'label': jnp.asarray(host['label'])}, jax.random.PRNGKey(0)))
step_fn = train.make_train_fn(config, model, schedule, optimizer, mesh)
state, metrics = step_fn(state, batches)
assert float(metrics['finite'][0]) == 1.0
config.sampling.guidance_scale = 2.0
apply_fn = lambda p, x, t, y: model.apply({'params': p}, x, t, y=y)
labels = jnp.arange(16, dtype=jnp.int32) % 10
params = _random_params(state.params)   # labels matter (the trained label embedding barely moved)
sharded = settings.make_sampler(config, schedule, apply_fn, batch_size=16)
one = settings.make_sampler(config, schedule, apply_fn, batch_size=16, devices=jax.devices()[:1])
a, b = sharded(params, jax.random.PRNGKey(1), labels), one(params, jax.random.PRNGKey(1), labels)
assert len(a.sharding.device_set) == 8
np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
# Other labels give other samples: the labels reach every shard's model call.
c = sharded(params, jax.random.PRNGKey(1), (labels + 1) % 10)
assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-4
print('OK')
'''


@pytest.mark.slow   # minutes on 2 cores: run by `pytest -m slow` (and .ci/run)
def test_labels_survive_sharding_over_eight_devices():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', SHARDING_SCRIPT, os.path.dirname(__file__)],
                        capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  assert 'OK' in proc.stdout


# --- evaluation pieces ----------------------------------------------------------------


def test_asked_for_accuracy():
  out = classifier_metrics.asked_for_accuracy(np.array([1, 1, 2, 0]), np.array([1, 2, 2, 0]), 3)
  assert out['asked_for_accuracy'] == 0.75
  assert out['asked_for_accuracy_per_class'] == [1.0, 1.0, 0.5]


def test_grid_by_class_puts_one_class_per_row():
  labels = np.array([2, 0, 2, 1, 2])
  images = np.stack([np.full((2, 2, 1), 10 * i, np.uint8) for i in range(5)])
  grid = samples.grid_by_class(images, labels, 3, per_row=3).reshape(3, 3, 2, 2, 1)[..., 0, 0, 0]
  np.testing.assert_array_equal(grid, [[10, 255, 255], [30, 255, 255], [0, 20, 40]])


def test_guidance_scales_and_csv(tmp_path):
  rows = [dict(guidance_scale=0.0, num_samples=8, asked_for_accuracy=0.5),
          dict(guidance_scale=2.0, num_samples=8, asked_for_accuracy=0.875)]
  csv_path, png_path = guidance_sweep.write_guidance_curve(rows, str(tmp_path))
  lines = open(csv_path).read().splitlines()
  assert lines[0].split(',') == list(guidance_sweep.COLUMNS)
  assert lines[2].split(',')[:3] == ['2', '8', '0.875'] and os.path.getsize(png_path) > 0


def test_bits_per_dim_of_a_conditional_model_uses_the_true_labels():
  from diffusion_jax import diffusion
  from diffusion_jax.evaluation import bits_per_dim
  config = cond_config()
  model, params = _init(config)
  params = _random_params(params)
  s = make_schedule('linear', 20)
  images = bits_per_dim.eval_images(config, 4)
  labels = bits_per_dim.eval_labels(config, 4)
  np.testing.assert_array_equal(labels, data_lib.load_labels(config, 'test')[:4])
  apply_fn = lambda p, x, t, y=None: model.apply({'params': p}, x, t, y=y)   # noqa: E731
  rng = jax.random.PRNGKey(8)
  got = bits_per_dim.bpd_eval(config, s, apply_fn, params, images, rng, labels=labels,
                              progress=False)
  want = diffusion.calc_bpd_loop(s, lambda x, t: apply_fn(params, x, t, jnp.asarray(labels)),
                                 jnp.asarray(images), jax.random.fold_in(rng, 0),
                                 mean_type='eps', var_type='fixed_large')
  np.testing.assert_allclose(got['total_bpd'], want['total_bpd'], rtol=1e-5)
  other = bits_per_dim.bpd_eval(config, s, apply_fn, params, images, rng,
                                labels=(labels + 1) % 10, progress=False)
  assert np.abs(other['total_bpd'] - got['total_bpd']).max() > 1e-4
  with pytest.raises(ValueError, match='needs labels exactly for a class-conditional model'):
    bits_per_dim.bpd_eval(config, s, apply_fn, params, images, rng, progress=False)
