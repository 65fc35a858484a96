"""Tests for diffusion_jax.evaluation.inception (the FID InceptionV3) with random weights.

No pretrained weights are available offline, so the network is checked
against an independent description of pytorch-fid's model: the test below
writes down torchvision's ``Inception3`` layer table (names, channels,
kernels, strides, paddings) with pytorch-fid's FID patches, builds a random
PyTorch-layout state dict from it, and runs a PyTorch-layout (NCHW / OIHW)
reference forward pass with ``jax.lax`` primitives. The Flax module with the
converted weights must reproduce it.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.evaluation import inception, inception_weights

# pytorch-fid's FID InceptionV3 incl. the 1008-way fc: torchvision's
# inception_v3 has 27,161,264 parameters with the aux classifier and 1000
# classes; minus AuxLogits (3,326,696) plus 8 more fc classes (8 * 2049).
FID_INCEPTION_NUM_PARAMS = 23_850_960
FID_INCEPTION_NUM_BN_STATS = 34_432   # running mean + var, 2 x 17,216 channels


# ----------------------------------------------------------------------------
# An independent description of pytorch-fid's network (torch names/layouts).
# ----------------------------------------------------------------------------

def _torch_conv_table():
  """[(name, c_in, c_out, (kh, kw), stride, (ph, pw))] for every BasicConv2d."""
  t = []

  def c(name, cin, cout, k, stride=1, pad=0):
    k = (k, k) if isinstance(k, int) else k
    pad = (pad, pad) if isinstance(pad, int) else pad
    t.append((name, cin, cout, k, stride, pad))

  c('Conv2d_1a_3x3', 3, 32, 3, stride=2)
  c('Conv2d_2a_3x3', 32, 32, 3)
  c('Conv2d_2b_3x3', 32, 64, 3, pad=1)
  c('Conv2d_3b_1x1', 64, 80, 1)
  c('Conv2d_4a_3x3', 80, 192, 3)
  for name, cin, pool in [('Mixed_5b', 192, 32), ('Mixed_5c', 256, 64),
                          ('Mixed_5d', 288, 64)]:
    c(f'{name}.branch1x1', cin, 64, 1)
    c(f'{name}.branch5x5_1', cin, 48, 1)
    c(f'{name}.branch5x5_2', 48, 64, 5, pad=2)
    c(f'{name}.branch3x3dbl_1', cin, 64, 1)
    c(f'{name}.branch3x3dbl_2', 64, 96, 3, pad=1)
    c(f'{name}.branch3x3dbl_3', 96, 96, 3, pad=1)
    c(f'{name}.branch_pool', cin, pool, 1)
  c('Mixed_6a.branch3x3', 288, 384, 3, stride=2)
  c('Mixed_6a.branch3x3dbl_1', 288, 64, 1)
  c('Mixed_6a.branch3x3dbl_2', 64, 96, 3, pad=1)
  c('Mixed_6a.branch3x3dbl_3', 96, 96, 3, stride=2)
  for name, c7 in [('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160),
                   ('Mixed_6e', 192)]:
    c(f'{name}.branch1x1', 768, 192, 1)
    c(f'{name}.branch7x7_1', 768, c7, 1)
    c(f'{name}.branch7x7_2', c7, c7, (1, 7), pad=(0, 3))
    c(f'{name}.branch7x7_3', c7, 192, (7, 1), pad=(3, 0))
    c(f'{name}.branch7x7dbl_1', 768, c7, 1)
    c(f'{name}.branch7x7dbl_2', c7, c7, (7, 1), pad=(3, 0))
    c(f'{name}.branch7x7dbl_3', c7, c7, (1, 7), pad=(0, 3))
    c(f'{name}.branch7x7dbl_4', c7, c7, (7, 1), pad=(3, 0))
    c(f'{name}.branch7x7dbl_5', c7, 192, (1, 7), pad=(0, 3))
    c(f'{name}.branch_pool', 768, 192, 1)
  c('Mixed_7a.branch3x3_1', 768, 192, 1)
  c('Mixed_7a.branch3x3_2', 192, 320, 3, stride=2)
  c('Mixed_7a.branch7x7x3_1', 768, 192, 1)
  c('Mixed_7a.branch7x7x3_2', 192, 192, (1, 7), pad=(0, 3))
  c('Mixed_7a.branch7x7x3_3', 192, 192, (7, 1), pad=(3, 0))
  c('Mixed_7a.branch7x7x3_4', 192, 192, 3, stride=2)
  for name, cin in [('Mixed_7b', 1280), ('Mixed_7c', 2048)]:
    c(f'{name}.branch1x1', cin, 320, 1)
    c(f'{name}.branch3x3_1', cin, 384, 1)
    c(f'{name}.branch3x3_2a', 384, 384, (1, 3), pad=(0, 1))
    c(f'{name}.branch3x3_2b', 384, 384, (3, 1), pad=(1, 0))
    c(f'{name}.branch3x3dbl_1', cin, 448, 1)
    c(f'{name}.branch3x3dbl_2', 448, 384, 3, pad=1)
    c(f'{name}.branch3x3dbl_3a', 384, 384, (1, 3), pad=(0, 1))
    c(f'{name}.branch3x3dbl_3b', 384, 384, (3, 1), pad=(1, 0))
    c(f'{name}.branch_pool', cin, 192, 1)
  return t


def _random_torch_state_dict(seed=0):
  """A random state dict with pytorch-fid's names and PyTorch shapes."""
  rng = np.random.default_rng(seed)
  sd = {}
  for name, cin, cout, (kh, kw), _, _ in _torch_conv_table():
    std = np.sqrt(2.0 / (cin * kh * kw))
    sd[f'{name}.conv.weight'] = (std * rng.standard_normal(
        (cout, cin, kh, kw))).astype(np.float32)
    sd[f'{name}.bn.weight'] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
    sd[f'{name}.bn.bias'] = (0.1 * rng.standard_normal(cout)).astype(np.float32)
    sd[f'{name}.bn.running_mean'] = (0.1 * rng.standard_normal(cout)).astype(np.float32)
    sd[f'{name}.bn.running_var'] = rng.uniform(0.5, 2.0, cout).astype(np.float32)
    sd[f'{name}.bn.num_batches_tracked'] = np.array(0, np.int64)
  sd['fc.weight'] = (rng.standard_normal((1008, 2048)) / np.sqrt(2048)).astype(np.float32)
  sd['fc.bias'] = (0.1 * rng.standard_normal(1008)).astype(np.float32)
  return sd


def _torch_num_parameters(sd):
  """What ``sum(p.numel() for p in model.parameters())`` counts (no buffers)."""
  return sum(v.size for k, v in sd.items()
             if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked')))


# --- PyTorch-layout reference forward (NCHW activations, OIHW kernels) --------

_CONV_TABLE = {row[0]: row for row in _torch_conv_table()}
_HI = jax.lax.Precision.HIGHEST


def _ref_conv(sd, name, x):
  _, _, _, _, stride, (ph, pw) = _CONV_TABLE[name]
  y = jax.lax.conv_general_dilated(
      x, sd[f'{name}.conv.weight'], (stride, stride), [(ph, ph), (pw, pw)],
      dimension_numbers=('NCHW', 'OIHW', 'NCHW'), precision=_HI)
  bn = lambda k: sd[f'{name}.bn.{k}'][None, :, None, None]
  y = (y - bn('running_mean')) / jnp.sqrt(bn('running_var') + 1e-3) * bn('weight') + bn('bias')
  return jax.nn.relu(y)


def _ref_max_pool(x, stride, pad):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 3, 3),
                               (1, 1, stride, stride),
                               [(0, 0), (0, 0), (pad, pad), (pad, pad)])


def _ref_avg_pool_exclude_pad(x):
  """F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)."""
  win = lambda v: jax.lax.reduce_window(v, 0.0, jax.lax.add, (1, 1, 3, 3),
                                        (1, 1, 1, 1),
                                        [(0, 0), (0, 0), (1, 1), (1, 1)])
  return win(x) / win(jnp.ones_like(x[:1, :1]))


def _ref_forward(sd, x_nchw):
  """pytorch-fid's FID InceptionV3 forward on [-1, 1] NCHW inputs (no resize)."""
  cv = functools.partial(_ref_conv, sd)
  cat = lambda xs: jnp.concatenate(xs, axis=1)
  x = cv('Conv2d_1a_3x3', x_nchw)
  x = cv('Conv2d_2a_3x3', x)
  x = cv('Conv2d_2b_3x3', x)
  x = _ref_max_pool(x, 2, 0)
  x = cv('Conv2d_3b_1x1', x)
  x = cv('Conv2d_4a_3x3', x)
  x = _ref_max_pool(x, 2, 0)
  for m in ('Mixed_5b', 'Mixed_5c', 'Mixed_5d'):         # FIDInceptionA
    x = cat([cv(f'{m}.branch1x1', x),
             cv(f'{m}.branch5x5_2', cv(f'{m}.branch5x5_1', x)),
             cv(f'{m}.branch3x3dbl_3', cv(f'{m}.branch3x3dbl_2',
                                          cv(f'{m}.branch3x3dbl_1', x))),
             cv(f'{m}.branch_pool', _ref_avg_pool_exclude_pad(x))])
  m = 'Mixed_6a'                                          # InceptionB
  x = cat([cv(f'{m}.branch3x3', x),
           cv(f'{m}.branch3x3dbl_3', cv(f'{m}.branch3x3dbl_2',
                                        cv(f'{m}.branch3x3dbl_1', x))),
           _ref_max_pool(x, 2, 0)])
  for m in ('Mixed_6b', 'Mixed_6c', 'Mixed_6d', 'Mixed_6e'):  # FIDInceptionC
    b7 = x
    for i in (1, 2, 3):
      b7 = cv(f'{m}.branch7x7_{i}', b7)
    bd = x
    for i in (1, 2, 3, 4, 5):
      bd = cv(f'{m}.branch7x7dbl_{i}', bd)
    x = cat([cv(f'{m}.branch1x1', x), b7, bd,
             cv(f'{m}.branch_pool', _ref_avg_pool_exclude_pad(x))])
  m = 'Mixed_7a'                                          # InceptionD
  b3 = cv(f'{m}.branch3x3_2', cv(f'{m}.branch3x3_1', x))
  b7 = x
  for i in (1, 2, 3, 4):
    b7 = cv(f'{m}.branch7x7x3_{i}', b7)
  x = cat([b3, b7, _ref_max_pool(x, 2, 0)])
  for m, pool in (('Mixed_7b', 'avg'), ('Mixed_7c', 'max')):  # FIDInceptionE_1/_2
    b3 = cv(f'{m}.branch3x3_1', x)
    b3 = cat([cv(f'{m}.branch3x3_2a', b3), cv(f'{m}.branch3x3_2b', b3)])
    bd = cv(f'{m}.branch3x3dbl_2', cv(f'{m}.branch3x3dbl_1', x))
    bd = cat([cv(f'{m}.branch3x3dbl_3a', bd), cv(f'{m}.branch3x3dbl_3b', bd)])
    pooled = (_ref_avg_pool_exclude_pad(x) if pool == 'avg'
              else _ref_max_pool(x, 1, 1))
    x = cat([cv(f'{m}.branch1x1', x), b3, bd, cv(f'{m}.branch_pool', pooled)])
  pool3 = jnp.mean(x, axis=(2, 3))
  logits = jnp.dot(pool3, sd['fc.weight'].T, precision=_HI) + sd['fc.bias']
  return pool3, logits


# ----------------------------------------------------------------------------
# Fixtures.
# ----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def torch_state_dict():
  return _random_torch_state_dict(seed=0)


@pytest.fixture(scope='module')
def converted(torch_state_dict):
  return inception_weights.convert_pytorch_fid_state_dict(torch_state_dict)


@pytest.fixture(scope='module')
def variables():
  return inception_weights.init_inception_variables(seed=1)


def _images(n, size, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3),
                                              dtype=np.uint8)


# ----------------------------------------------------------------------------
# Tests.
# ----------------------------------------------------------------------------

def test_parameter_count_matches_pytorch_fid(torch_state_dict, variables):
  assert _torch_num_parameters(torch_state_dict) == FID_INCEPTION_NUM_PARAMS
  assert inception_weights.count_params(variables['params']) == FID_INCEPTION_NUM_PARAMS
  assert inception_weights.count_params(variables['batch_stats']) == FID_INCEPTION_NUM_BN_STATS
  template = inception_weights.inception_variables_template()
  assert inception_weights.count_params(template['params']) == FID_INCEPTION_NUM_PARAMS


@pytest.fixture(scope='module')
def inception_fn(variables):
  return inception.make_inception_fn(variables)   # jitted, input_range='0_255'


def test_output_shapes_at_299_from_uint8(inception_fn):
  pool3, logits = inception_fn(_images(2, 16))      # resized 16 -> 299
  chex.assert_shape(pool3, (2, inception.NUM_FEATURES))
  chex.assert_shape(logits, (2, inception.NUM_CLASSES))
  chex.assert_tree_all_finite((pool3, logits))
  assert pool3.shape == (2, 2048) and logits.shape == (2, 1008)
  assert np.all(np.asarray(pool3) >= 0)            # mean of ReLU outputs


@pytest.mark.parametrize('block,name,size,channels', [
    (lambda: inception.FIDInceptionA(32), 'Mixed_5b', 5, 192),
    (lambda: inception.FIDInceptionC(128), 'Mixed_6b', 4, 768),
    (lambda: inception.FIDInceptionE('max'), 'Mixed_7c', 3, 2048),
])
def test_blocks_jit_matches_no_jit(variables, block, name, size, channels):
  """Op-by-op vs jitted on single blocks (the full network: the slow test)."""
  v = {c: variables[c][name] for c in ('params', 'batch_stats')}
  x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, channels))
  module = block()
  eager = module.apply(v, x)
  jitted = jax.jit(module.apply)(v, x)
  chex.assert_trees_all_close(eager, jitted, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_jit_matches_no_jit_full_network(variables):
  # 75x75 without resizing (the smallest size the network takes) keeps the
  # op-by-op run short; still ~10-20 s on a loaded 2-core CPU.
  x = _images(2, 75, seed=3)
  model = inception.InceptionV3FID(resize_input=False)
  eager = model.apply(variables, x)
  jitted = jax.jit(model.apply)(variables, x)
  chex.assert_trees_all_close(eager, jitted, rtol=1e-5, atol=1e-5)


def test_converted_pytorch_fid_weights_reproduce_the_torch_layout_reference(
    torch_state_dict, converted):
  # 139x139: the 8x8 stage is 3x3, so the padding-excluding average pools and
  # Mixed_7c's max pool differ from their torchvision counterparts.
  x = _images(2, 139, seed=4).astype(np.float32) / 127.5 - 1.0
  model = inception.InceptionV3FID(input_range='-1_1', resize_input=False)
  pool3, logits = jax.jit(model.apply)(converted, x)
  sd = {k: jnp.asarray(v) for k, v in torch_state_dict.items()}
  ref_pool3, ref_logits = jax.jit(_ref_forward)(sd, jnp.transpose(x, (0, 3, 1, 2)))
  scale = float(np.abs(ref_pool3).max())
  assert scale > 1e-2                               # activations did not vanish
  np.testing.assert_allclose(pool3, ref_pool3, rtol=1e-4, atol=1e-4 * scale)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-4,
                             atol=1e-4 * float(np.abs(ref_logits).max()))


def test_converter_layouts_and_errors(torch_state_dict, converted):
  p, bs = converted['params'], converted['batch_stats']
  w = torch_state_dict['Mixed_6b.branch7x7_2.conv.weight']          # [O, I, 1, 7]
  np.testing.assert_array_equal(p['Mixed_6b']['branch7x7_2']['conv']['kernel'],
                                np.transpose(w, (2, 3, 1, 0)))
  np.testing.assert_array_equal(p['fc']['kernel'], torch_state_dict['fc.weight'].T)
  np.testing.assert_array_equal(
      bs['Conv2d_1a_3x3']['bn']['var'],
      torch_state_dict['Conv2d_1a_3x3.bn.running_var'])
  np.testing.assert_array_equal(
      p['Mixed_7c']['branch_pool']['bn']['scale'],
      torch_state_dict['Mixed_7c.branch_pool.bn.weight'])
  # Same structure and shapes as the module's own variables.
  template = inception_weights.inception_variables_template()
  chex.assert_trees_all_equal_shapes(
      template, jax.tree_util.tree_map(jnp.asarray, converted))

  missing = dict(torch_state_dict)
  del missing['Mixed_5b.branch_pool.bn.running_mean']
  with pytest.raises(ValueError, match='missing'):
    inception_weights.convert_pytorch_fid_state_dict(missing)
  with pytest.raises(ValueError, match='AuxLogits'):
    inception_weights.convert_pytorch_fid_state_dict(
        {**torch_state_dict, 'AuxLogits.fc.weight': np.zeros((1008, 768))})
  wrong = dict(torch_state_dict)
  wrong['Mixed_5b.branch_pool.conv.weight'] = np.zeros((64, 192, 1, 1), np.float32)
  with pytest.raises(ValueError, match='shape'):
    inception_weights.convert_pytorch_fid_state_dict(wrong)


def test_save_load_round_trip(tmp_path, variables, torch_state_dict, converted):
  for name in ('inception.msgpack', 'inception.npz'):
    path = tmp_path / name
    inception_weights.save_inception_params(variables, path)
    loaded = inception_weights.load_inception_params(path)
    chex.assert_trees_all_equal(loaded, variables)
  # A raw pytorch-fid state dict saved as .npz is converted on load.
  path = tmp_path / 'pt_inception-2015-12-05.npz'
  np.savez(path, **torch_state_dict)
  chex.assert_trees_all_equal(inception_weights.load_inception_params(path), converted)


def test_missing_weights_error_names_the_config_key(tmp_path):
  with pytest.raises(FileNotFoundError, match='eval.inception_path') as e:
    inception_weights.load_inception_params(None)
  assert 'pt_inception-2015-12-05' in str(e.value)
  with pytest.raises(FileNotFoundError, match='eval.inception_path'):
    inception_weights.load_inception_params(tmp_path / 'absent.msgpack')
  bad = tmp_path / 'bad.npz'
  np.savez(bad, **{'params/fc/kernel': np.zeros((3, 3))})
  with pytest.raises(ValueError):
    inception_weights.load_inception_params(bad)


def test_fid_pooling_variants():
  # count_include_pad=False: a constant map stays constant at the borders
  # (including the zero padding would give 4/9 and 6/9 there).
  x = jnp.full((1, 5, 5, 2), 3.0)
  np.testing.assert_allclose(inception.avg_pool_same_exclude_pad(x), x, rtol=1e-6)
  np.testing.assert_allclose(
      inception.avg_pool_same_exclude_pad(x),
      _ref_avg_pool_exclude_pad(jnp.transpose(x, (0, 3, 1, 2))).transpose(0, 2, 3, 1),
      rtol=1e-6)
  # Max pool pads with -inf, not 0.
  np.testing.assert_allclose(inception.max_pool_same(-x), -x)
  y = jnp.arange(25.0).reshape(1, 5, 5, 1)
  np.testing.assert_allclose(inception.max_pool_same(y)[0, :, :, 0],
                             [[6, 7, 8, 9, 9], [11, 12, 13, 14, 14],
                              [16, 17, 18, 19, 19], [21, 22, 23, 24, 24],
                              [21, 22, 23, 24, 24]])


def _torch_bilinear_resize(x, out):
  """F.interpolate(mode='bilinear', align_corners=False), in NumPy (NHWC)."""
  def axis_weights(n_in):
    src = np.maximum((np.arange(out) + 0.5) * n_in / out - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    return i0, i1, lam
  h0, h1, lh = axis_weights(x.shape[1])
  w0, w1, lw = axis_weights(x.shape[2])
  rows = x[:, h0] * (1 - lh)[None, :, None, None] + x[:, h1] * lh[None, :, None, None]
  return (rows[:, :, w0] * (1 - lw)[None, None, :, None]
          + rows[:, :, w1] * lw[None, None, :, None])


@pytest.mark.parametrize('size', [8, 32, 512])
def test_preprocess_matches_pytorch_bilinear_resize(size):
  x = _images(1, size, seed=size)
  got = inception.preprocess_images(jnp.asarray(x), '0_255')
  want = _torch_bilinear_resize(x.astype(np.float64), 299) / 127.5 - 1.0
  assert got.shape == (1, 299, 299, 3)
  np.testing.assert_allclose(got, want, atol=1e-4)
  # [-1, 1] float input gives the same network input.
  pm1 = inception.preprocess_images(jnp.asarray(x / 127.5 - 1.0), '-1_1')
  np.testing.assert_allclose(pm1, got, atol=1e-5)
  # Grayscale is repeated to three channels.
  gray = inception.preprocess_images(jnp.asarray(x[..., :1]), '0_255')
  np.testing.assert_allclose(gray[..., 1], gray[..., 0], rtol=0, atol=1e-6)   # XLA may vectorise channels differently (1 ulp)


def test_inception_features_batches_and_pads(inception_fn):
  fn = inception_fn
  x = _images(3, 16, seed=5)
  feats, logits = inception.inception_features(fn, x, batch_size=2)
  assert feats.shape == (3, 2048) and logits.shape == (3, 1008)
  assert feats.dtype == np.float64
  first, _ = fn(x[:2])                     # same batch shape: no recompilation
  last, _ = fn(x[1:])
  np.testing.assert_allclose(feats[:2], first, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(feats[2], last[1], rtol=1e-5, atol=1e-6)
