"""Tests for the DDPM U-Net (diffusion_jax.models); small widths, CPU-fast.

Initialisation is the slow part on a CPU (one small compilation per parameter
shape), so the numerical tests share one initialised tiny model and the
structural tests use ``jax.eval_shape``.
"""

import math
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import config_lib
from diffusion_jax import models


def _tiny_config(**model_overrides):
  """A 2-level U-Net on 8x8 RGB images (attention at 4x4)."""
  config = config_lib.base_config()
  config.data.image_size = 8
  config.data.num_channels = 3
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.dropout = 0.1
  for k, v in model_overrides.items():
    config.model[k] = v
  return config


def _inputs(batch=2, size=8, channels=3, seed=0):
  x = jax.random.uniform(jax.random.PRNGKey(seed), (batch, size, size, channels),
                         minval=-1.0, maxval=1.0)
  t = jnp.arange(batch, dtype=jnp.int32) * 300
  return x, t


def _perturb(params, scale=0.05, seed=1):
  """Moves every parameter away from its (partly zero) initial value."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  leaves = [p + scale * rng.standard_normal(p.shape).astype(np.float32)
            for p in leaves]
  return jax.tree_util.tree_unflatten(treedef, leaves)


@pytest.fixture(scope='module')
def tiny():
  """(module, initial variables, perturbed variables, x, t), built once."""
  model = models.create_model(_tiny_config())
  x, t = _inputs()
  # A jitted init with the 'rbg' generator compiles several times faster on
  # a CPU than an op-by-op threefry init; the distributions are the same.
  init = jax.jit(lambda key: model.init(key, x, t, train=False))
  variables = init(jax.random.key(0, impl='unsafe_rbg'))
  perturbed = {'params': _perturb(variables['params'])}
  return model, variables, perturbed, x, t


# --- timestep embedding -------------------------------------------------------

@pytest.mark.parametrize('dim', [32, 33, 128])
def test_timestep_embedding_matches_numpy_sinusoid(dim):
  t = np.array([0, 1, 17, 500, 999])
  half = dim // 2
  freqs = np.exp(-np.arange(half) * math.log(10000.0) / (half - 1))
  args = t[:, None].astype(np.float64) * freqs[None, :]
  expected = np.concatenate([np.sin(args), np.cos(args)], axis=1)
  if dim % 2:
    expected = np.concatenate([expected, np.zeros((len(t), 1))], axis=1)
  got = np.asarray(models.get_timestep_embedding(jnp.asarray(t, jnp.int32), dim))
  chex.assert_shape(got, (len(t), dim))
  # float32 arguments up to 999 rad carry ~1e-4 absolute rounding error.
  np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)
  np.testing.assert_array_equal(got[0, :half], 0.0)         # sin(0)
  np.testing.assert_array_equal(got[0, half:2 * half], 1.0)  # cos(0)


# --- shapes, dtypes, initialisation -------------------------------------------

def test_output_shape_and_exact_zero_at_init(tiny):
  model, variables, _, x, t = tiny
  out = model.apply(variables, x, t, train=False)
  chex.assert_shape(out, (2, 8, 8, 3))
  chex.assert_type(out, jnp.float32)
  # The reference's init_scale=0 layers are exact zeros here, so the
  # initial network outputs exactly zero.
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  params = variables['params']
  np.testing.assert_array_equal(params['conv_out']['kernel'], 0.0)
  for name, sub in params.items():
    if 'block' in name:
      np.testing.assert_array_equal(sub['conv2']['kernel'], 0.0)
      assert np.any(np.asarray(sub['conv1']['kernel']) != 0.0)
    if 'attn' in name:
      np.testing.assert_array_equal(sub['proj_out']['kernel'], 0.0)
  # Biases start at zero; GroupNorm at the identity.
  np.testing.assert_array_equal(params['conv_in']['bias'], 0.0)
  np.testing.assert_array_equal(params['norm_out']['scale'], 1.0)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))


def test_learned_range_doubles_channels(tiny):
  _, _, perturbed, x, t = tiny
  config = _tiny_config()
  config.diffusion.var_type = 'learned_range'
  model = models.create_model(config)
  assert model.out_ch == 6
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)['params']
  chex.assert_shape(shapes['conv_out']['kernel'], (3, 3, 32, 6))
  # Same parameters as the 3-channel model except the output conv.
  params = dict(perturbed['params'])
  params['conv_out'] = {'kernel': jnp.full((3, 3, 32, 6), 0.01),
                        'bias': jnp.zeros((6,))}
  out = model.apply({'params': params}, x, t, train=False)
  chex.assert_shape(out, (2, 8, 8, 6))
  chex.assert_tree_all_finite(out)


def test_initialiser_is_fan_avg_uniform(tiny):
  """variance_scaling(1, 'fan_avg', 'uniform'), the reference's default_init."""
  params = tiny[1]['params']
  kernel = np.asarray(params['down_1_block_0']['conv1']['kernel'])
  chex.assert_shape(kernel, (3, 3, 32, 64))
  limit = math.sqrt(3.0 / (9 * (32 + 64) / 2))
  assert limit * 0.95 < np.abs(kernel).max() <= limit
  np.testing.assert_allclose(kernel.var(), limit ** 2 / 3, rtol=0.1)
  dense = np.asarray(params['temb']['dense0']['kernel'])
  chex.assert_shape(dense, (32, 128))
  assert np.abs(dense).max() <= math.sqrt(3.0 / ((32 + 128) / 2))


def test_architecture_layout():
  """Reference layout: num_res_blocks down, num_res_blocks + 1 up per level."""
  config = _tiny_config(ch_mult=(1, 2, 2), num_res_blocks=2)
  model = models.create_model(config)
  x, t = _inputs()
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)['params']
  names = set(params)
  for level in range(3):
    assert {f'down_{level}_block_{i}' for i in range(2)} <= names
    assert {f'up_{level}_block_{i}' for i in range(3)} <= names
    assert f'up_{level}_block_3' not in names
  assert {'down_0_downsample', 'down_1_downsample', 'up_1_upsample',
          'up_2_upsample', 'mid_block_1', 'mid_block_2'} <= names
  assert 'down_2_downsample' not in names and 'up_0_upsample' not in names
  # Attention only at 4x4 (level 1) and in the middle.
  attn = sorted(n for n in names if 'attn' in n)
  assert attn == ['down_1_attn_0', 'down_1_attn_1', 'mid_attn_1',
                  'up_1_attn_0', 'up_1_attn_1', 'up_1_attn_2']
  # Skip concatenation: the first up block at level 0 sees 2ch + ch inputs.
  chex.assert_shape(params['up_0_block_0']['conv1']['kernel'], (3, 3, 96, 32))
  chex.assert_shape(params['up_0_block_0']['nin_shortcut']['kernel'], (96, 32))
  chex.assert_shape(params['down_0_downsample']['conv']['kernel'], (3, 3, 32, 32))
  chex.assert_shape(params['temb']['dense0']['kernel'], (32, 128))
  chex.assert_shape(params['temb']['dense1']['kernel'], (128, 128))
  chex.assert_shape(params['down_0_block_0']['temb_proj']['kernel'], (128, 32))


def test_resamp_without_conv():
  config = _tiny_config(resamp_with_conv=False, ch_mult=(1, 1, 2))
  model = models.create_model(config)
  x, t = _inputs(batch=1)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)
  assert 'down_0_downsample' not in variables['params']
  assert 'up_1_upsample' not in variables['params']
  out = jax.eval_shape(model.apply, variables, x, t)
  chex.assert_shape(out, (1, 8, 8, 3))


# --- behaviour ----------------------------------------------------------------

def test_different_t_give_different_outputs(tiny):
  model, _, variables, x, _ = tiny
  x = jnp.broadcast_to(x[:1], x.shape)  # the same image at two timesteps
  out = model.apply(variables, x, jnp.array([0, 999], jnp.int32), train=False)
  assert np.abs(np.asarray(out[0] - out[1])).max() > 1e-3
  same = model.apply(variables, x, jnp.array([5, 5], jnp.int32), train=False)
  np.testing.assert_allclose(same[0], same[1], atol=1e-6)


def test_dropout_only_with_train(tiny):
  model, _, variables, x, t = tiny
  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  det = model.apply(variables, x, t, train=False)
  det_rng = model.apply(variables, x, t, train=False, rngs={'dropout': k1})
  np.testing.assert_array_equal(det, det_rng)
  tr1 = model.apply(variables, x, t, train=True, rngs={'dropout': k1})
  tr1b = model.apply(variables, x, t, train=True, rngs={'dropout': k1})
  tr2 = model.apply(variables, x, t, train=True, rngs={'dropout': k2})
  np.testing.assert_array_equal(tr1, tr1b)
  assert np.abs(np.asarray(tr1 - tr2)).max() > 1e-4
  assert np.abs(np.asarray(tr1 - det)).max() > 1e-4
  # With dropout 0 the train flag changes nothing.
  model0 = models.create_model(_tiny_config(dropout=0.0))
  np.testing.assert_array_equal(
      model0.apply(variables, x, t, train=True, rngs={'dropout': k1}), det)


def test_bfloat16_close_to_float32(tiny):
  model32, _, variables, x, t = tiny
  model16 = models.create_model(_tiny_config(dtype='bfloat16'))
  out32 = np.asarray(model32.apply(variables, x, t, train=False))
  out16 = model16.apply(variables, x, t, train=False)
  chex.assert_type(out16, jnp.float32)
  rel = np.linalg.norm(np.asarray(out16) - out32) / np.linalg.norm(out32)
  assert rel < 0.05, rel
  # Parameters stay float32 under bfloat16 compute.
  params16 = jax.eval_shape(model16.init, jax.random.PRNGKey(0), x, t)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params16))


def test_jit_and_scalar_t(tiny):
  model, _, variables, x, t = tiny
  fn = jax.jit(lambda v, x, t: model.apply(v, x, t, train=False))
  np.testing.assert_allclose(fn(variables, x, t),
                             model.apply(variables, x, t, train=False),
                             atol=1e-5, rtol=1e-5)
  scalar = model.apply(variables, x, jnp.int32(300), train=False)
  vector = model.apply(variables, x, jnp.full((2,), 300, jnp.int32), train=False)
  np.testing.assert_array_equal(scalar, vector)


# --- create_model: bare sections and errors -----------------------------------

def test_bare_model_section_channels():
  section = _tiny_config().model
  assert models.create_model(section).out_ch == models.DEFAULT_OUT_CHANNELS == 3
  section.num_channels = 1
  assert models.create_model(section).out_ch == 1
  section.out_channels = 2
  assert models.create_model(section).out_ch == 2


def test_out_channels_from_data_and_var_type():
  config = _tiny_config()
  config.data.num_channels = 1
  assert models.create_model(config).out_ch == 1
  config.diffusion.var_type = 'learned_range'
  assert models.create_model(config).out_ch == 2


def test_dtype_and_fields_passed_through():
  model = models.create_model(_tiny_config(dtype='bfloat16', dropout=0.3))
  assert model.dtype == jnp.bfloat16 and model.dropout == 0.3
  assert model.ch_mult == (1, 2) and model.attn_resolutions == (4,)


@pytest.mark.parametrize('field,value,match', [
    ('name', 'resnet', r"model\.name='resnet'.*unet"),
    ('dtype', 'float16', r"model\.dtype='float16'.*float32.*bfloat16"),
    ('ch', 48, r'model\.ch=48.*model\.num_groups=32'),
    ('dropout', 1.0, r'model\.dropout'),
    ('ch_mult', (), r'model\.ch_mult'),
])
def test_bad_model_fields_raise(field, value, match):
  config = _tiny_config()
  config.model[field] = value
  with pytest.raises(ValueError, match=match):
    models.create_model(config)


def test_image_size_not_divisible_raises():
  config = _tiny_config(ch_mult=(1, 2, 2, 2))
  config.data.image_size = 28
  with pytest.raises(ValueError, match=r'data\.image_size=28.*divisible by.*8'):
    models.create_model(config)
  # The check is repeated on the actual input at call time.
  model = models.create_model(_tiny_config(ch_mult=(1, 2, 2, 2)))
  x, t = _inputs(size=12)
  with pytest.raises(ValueError, match='divisible'):
    model.init(jax.random.PRNGKey(0), x, t)


def test_unreachable_attention_resolution_warns():
  with pytest.warns(UserWarning, match=r'attn_resolutions.*16'):
    models.create_model(_tiny_config(attn_resolutions=(16,)))
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    models.create_model(_tiny_config(attn_resolutions=(4, 8)))


# --- implementations: conv forms, sub-pixel upsampling, remat, attention ------

def _numpy_conv_same(x, kernel, stride):
  """Independent 'SAME' (TF) 2-D convolution in float64 NumPy, NHWC x HWIO."""
  x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  b, h, w, _ = x.shape
  kh, kw, _, out = kernel.shape
  ho, wo = -(-h // stride), -(-w // stride)
  pad_h = max((ho - 1) * stride + kh - h, 0)
  pad_w = max((wo - 1) * stride + kw - w, 0)
  xp = np.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2),
                  (0, 0)))
  y = np.zeros((b, ho, wo, out))
  for i in range(ho):
    for j in range(wo):
      patch = xp[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
      y[:, i, j] = np.einsum('bhwc,hwco->bo', patch, kernel)
  return y


@pytest.mark.parametrize('size,stride', [(1, 1), (2, 1), (4, 2), (8, 1), (6, 1)])
@pytest.mark.parametrize('impl', models.layers.CONV_IMPLS)
def test_conv_implementations_equal_numpy(size, stride, impl):
  """xla, matmul (Toeplitz and im2col) and auto give the same 'SAME' convolution."""
  rng = np.random.default_rng(size * 10 + stride)
  x = rng.standard_normal((3, size, size, 5)).astype(np.float32)
  kernel = rng.standard_normal((3, 3, 5, 7)).astype(np.float32)
  want = _numpy_conv_same(x, kernel, stride)
  got = jax.jit(lambda a, k: models.layers.conv2d(a, k, stride, impl))(x, kernel)
  chex.assert_shape(got, want.shape)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('size', [1, 2, 8])
@pytest.mark.parametrize('impl', models.layers.CONV_IMPLS)
def test_upsample_conv_subpixel_equals_upsample_then_conv(size, impl):
  rng = np.random.default_rng(size)
  x = rng.standard_normal((2, size, size, 4)).astype(np.float32)
  kernel = rng.standard_normal((3, 3, 4, 6)).astype(np.float32)
  upsampled = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)    # nearest neighbour
  want = _numpy_conv_same(upsampled, kernel, 1)
  got = jax.jit(lambda a, k: models.layers.upsample_conv2d(a, k, impl))(x, kernel)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_conv_taps_counts_the_padded_window():
  taps = models.layers.conv_taps((2, 2), (3, 3), 1)
  # On a 2x2 image every output pixel reads all four input pixels, one tap each.
  np.testing.assert_array_equal(taps.sum(axis=2), np.ones((4, 4)))
  # Stride 2 on 4x4 ('SAME' pads (0, 1)): output (0, 0) reads rows and columns 0-2,
  # output (1, 1) rows and columns 2-3 (the rest is the padding after the image).
  taps = models.layers.conv_taps((4, 4), (3, 3), 2)
  assert taps.shape == (4, 16, 9)
  np.testing.assert_array_equal(np.nonzero(taps[0].sum(axis=1))[0], [0, 1, 2, 4, 5, 6, 8, 9, 10])
  np.testing.assert_array_equal(np.nonzero(taps[3].sum(axis=1))[0], [10, 11, 14, 15])


def _loss_and_grads(model, params, x, t):
  def loss(p):
    return jnp.mean(model.apply({'params': p}, x, t, train=False) ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


def test_implementation_choices_give_equal_outputs_and_gradients(tiny):
  """Every speed/memory option computes the same function and gradients (float32)."""
  model, _, variables, x, t = tiny
  params = variables['params']
  base_loss, base_grads = _loss_and_grads(model, params, x, t)
  for override in (dict(conv_impl='xla'), dict(conv_impl='matmul', remat=True),
                   dict(attention_impl='xla')):
    other = models.create_model(_tiny_config(**override))
    assert all(getattr(other, k) == v for k, v in override.items())
    loss, grads = _loss_and_grads(other, params, x, t)
    np.testing.assert_allclose(loss, base_loss, rtol=1e-5, err_msg=str(override))
    for g, h in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(base_grads)):
      np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-6, err_msg=str(override))


def test_remat_recomputes_in_the_backward_pass(tiny):
  model, _, variables, x, t = tiny
  remat = models.create_model(_tiny_config(remat=True))
  def jaxpr(m):
    fn = jax.grad(lambda p: jnp.sum(m.apply({'params': p}, x, t, train=False)))
    return str(jax.make_jaxpr(fn)(variables['params']))
  assert 'remat' in jaxpr(remat) or 'checkpoint' in jaxpr(remat)
  assert 'remat' not in jaxpr(model) and 'checkpoint' not in jaxpr(model)


def test_attention_block_equals_written_out_softmax():
  """AttnBlock (jax.nn.dot_product_attention) = softmax(q k^T / sqrt(C)) v by hand."""
  block = models.AttnBlock(num_groups=4)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 8))
  variables = block.init(jax.random.PRNGKey(1), x)
  params = _perturb(variables['params'], scale=0.3)
  got = block.apply({'params': params}, x)
  h = models.layers.nn.GroupNorm(num_groups=4, epsilon=1e-6).apply(
      {'params': params['norm']}, x).reshape(2, 16, 8)
  q, k, v = (h @ params[n]['kernel'] + params[n]['bias'] for n in ('q', 'k', 'v'))
  att = models.layers.attention_reference(q, k, v).reshape(2, 4, 4, 8)
  want = x + att @ params['proj_out']['kernel'] + params['proj_out']['bias']
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_attention_implementation_choice():
  impl = models.layers.attention_implementation
  assert impl('xla', jnp.bfloat16, 64) == 'xla'
  assert impl('cudnn', jnp.float32, 64) == 'cudnn'
  assert impl('auto', jnp.float32, 64) == 'xla'      # cuDNN needs 16-bit inputs
  assert impl('auto', jnp.bfloat16, 256) == 'xla'    # head too large for cuDNN
  assert impl('auto', jnp.bfloat16, 64) == ('cudnn' if jax.default_backend() == 'gpu'
                                            else 'xla')
  with pytest.raises(ValueError, match=r'model\.attention_impl.*auto.*xla.*cudnn'):
    impl('flash', jnp.float32, 64)
  config = _tiny_config(conv_impl='im2col')
  with pytest.raises(ValueError, match=r"model\.conv_impl='im2col'.*auto.*xla.*matmul"):
    models.create_model(config)


def test_bfloat16_activations_except_norms_and_softmax(tiny):
  """Under model.dtype=bfloat16 every matmul and convolution takes bfloat16 operands;
  the GroupNorm statistics and the softmax are float32."""
  _, _, variables, x, t = tiny
  model16 = models.create_model(_tiny_config(dtype='bfloat16', conv_impl='xla'))
  jaxpr = jax.make_jaxpr(lambda p: model16.apply(p, x, t, train=False))(variables)
  contractions, softmax_inputs, norm_inputs = [], [], []

  def walk(jxp):
    for eqn in jxp.eqns:
      if eqn.primitive.name in ('dot_general', 'conv_general_dilated'):
        contractions.append(tuple(v.aval.dtype for v in eqn.invars))
      if eqn.primitive.name == 'reduce_max':   # the softmax's max subtraction
        softmax_inputs.append(eqn.invars[0].aval.dtype)
      if eqn.primitive.name == 'rsqrt':        # GroupNorm's 1 / sqrt(var + eps)
        norm_inputs.append(eqn.invars[0].aval.dtype)
      for sub in jax.core.jaxprs_in_params(eqn.params) if hasattr(
          jax.core, 'jaxprs_in_params') else []:
        walk(sub)
      for p in eqn.params.values():
        if hasattr(p, 'jaxpr') and hasattr(p.jaxpr, 'eqns'):
          walk(p.jaxpr)
        elif hasattr(p, 'eqns'):
          walk(p)

  walk(jaxpr.jaxpr)
  # The timestep frequencies (sin/cos arguments) are an exact float32 outer product.
  network = [d for d in contractions if d != (jnp.float32, jnp.float32)]
  assert len(network) >= 10
  assert all(d == (jnp.bfloat16, jnp.bfloat16) for d in network), set(contractions)
  assert len([d for d in contractions if d == (jnp.float32, jnp.float32)]) <= 1
  assert softmax_inputs and all(d == jnp.float32 for d in softmax_inputs)
  assert norm_inputs and all(d == jnp.float32 for d in norm_inputs)
