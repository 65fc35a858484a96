"""Building blocks of the DDPM U-Net (Ho et al. 2020, appendix B).

Each block follows the reference implementation of the paper,
``hojonathanho/diffusion`` (``diffusion_tf/models/unet.py`` and
``diffusion_tf/nn.py``), which is also what openai/improved-diffusion's
``unet.py`` reimplements:

* weights use ``variance_scaling(scale, 'fan_avg', 'uniform')`` and biases are
  zero (``nn.default_init``); the layers the reference initialises with
  ``init_scale=0`` (the second conv of every residual block, the attention
  output projection, the output conv) are exact zeros here, so that every
  residual branch is the identity and the network outputs exactly 0 at init;
* GroupNorm has 32 groups and epsilon 1e-6 (``tf.contrib.layers.group_norm``);
* the nonlinearity is swish / SiLU.

Parameters are always float32; ``dtype`` is the compute dtype of activations.
GroupNorm statistics and the attention softmax are computed in float32.
"""

import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def default_init(scale: float = 1.0):
  """The reference's initialiser: variance scaling, fan_avg, uniform.

  ``scale == 0`` gives exact zeros (the reference uses ``1e-10`` instead;
  exact zeros make the zero-output property of the initial network exact).
  """
  if scale == 0.0:
    return nn.initializers.zeros
  return nn.initializers.variance_scaling(scale, 'fan_avg', 'uniform')


def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int,
                           dtype: Dtype = jnp.float32) -> jax.Array:
  """Sinusoidal timestep embedding (paper sec. 3 / appendix B, from Fairseq).

  Same formula as the reference ``nn.get_timestep_embedding``: with
  ``half = dim // 2`` and ``freq_k = exp(-k * log(10000) / (half - 1))``,
  the embedding is ``[sin(t * freq), cos(t * freq)]`` (sines first), zero
  padded by one column when ``dim`` is odd.

  Args:
    timesteps: int or float array of shape ``[B]`` (zero-based steps).
    embedding_dim: output width (the U-Net uses ``ch``).
    dtype: output dtype (the computation is float32).

  Returns:
    Array of shape ``[B, embedding_dim]``.
  """
  timesteps = jnp.asarray(timesteps)
  if timesteps.ndim != 1:
    raise ValueError(f'timesteps must have shape [B], got {timesteps.shape}.')
  if embedding_dim < 2:
    raise ValueError(f'embedding_dim must be >= 2, got {embedding_dim}.')
  half = embedding_dim // 2
  # Frequencies in float64 (NumPy), then cast: exact up to float32 rounding.
  scale = math.log(10000.0) / max(half - 1, 1)
  freqs = jnp.asarray(np.exp(-scale * np.arange(half, dtype=np.float64)),
                      dtype=jnp.float32)
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
  if embedding_dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb.astype(dtype)


def _dense(features, *, name, dtype, init_scale=1.0):
  """Dense layer (the reference's ``nn.dense`` / 1x1 ``nn.nin``)."""
  return nn.Dense(features, kernel_init=default_init(init_scale),
                  bias_init=nn.initializers.zeros, dtype=dtype,
                  param_dtype=jnp.float32, name=name)


CONV_IMPLS = ('auto', 'xla', 'matmul')
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn')

# On the CPU, layers whose output has at most this many positions use the
# matmul form (XLA:CPU's convolution is up to 15x slower than the same
# arithmetic as a matmul at 2x2 and 4x4; benchmarks/bench_peer.py).
CPU_MATMUL_MAX_POSITIONS = 16
# At most this many input positions: one dense (Toeplitz) matrix; else im2col.
TOEPLITZ_MAX_POSITIONS = 4


def check_impl(field: str, impl: str, allowed: Sequence[str]) -> str:
  """``impl`` if it is one of ``allowed``, else a ValueError naming ``model.<field>``."""
  if impl not in allowed:
    raise ValueError(f'Unknown model.{field}={impl!r}; allowed values: {tuple(allowed)}.')
  return impl


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TF 'SAME' padding of one spatial axis: (before, after)."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def conv_taps(in_hw, kernel_hw, stride: int) -> np.ndarray:
  """0/1 tensor ``S[p, q, k]``: output position p reads input position q through tap k.

  Positions are flattened row-major, taps ``k = a * kw + b``. Encodes a
  'SAME'-padded strided 2-D convolution as a linear map, so that
  ``out[p] = sum_{q,k} S[p, q, k] x[q] @ W[k]`` (zero padding = missing entries).
  """
  (h, w), (kh, kw) = in_hw, kernel_hw
  (ph, _), (pw, _) = _same_padding(h, kh, stride), _same_padding(w, kw, stride)
  ho, wo = -(-h // stride), -(-w // stride)
  taps = np.zeros((ho * wo, h * w, kh * kw), np.float32)
  for oi in range(ho):
    for oj in range(wo):
      for a in range(kh):
        for b in range(kw):
          i, j = oi * stride + a - ph, oj * stride + b - pw
          if 0 <= i < h and 0 <= j < w:
            taps[oi * wo + oj, i * w + j, a * kw + b] = 1.0
  return taps


def conv2d_xla(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """'SAME' 2-D convolution, NHWC x HWIO, as one XLA convolution."""
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def conv2d_matmul(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """The same convolution as :func:`conv2d_xla`, written as matrix products.

  Small inputs (at most ``TOEPLITZ_MAX_POSITIONS`` pixels) use one dense
  matrix ``M[(q, i), (p, o)] = sum_k S[p, q, k] W[k, i, o]`` (``conv_taps``):
  every output pixel sees every input pixel, so it does no wasted work. Larger
  ones use im2col: the ``kh * kw`` shifted copies of the padded input side by
  side, times the kernel reshaped to ``[kh * kw * C_in, C_out]``. Both are
  exact rearrangements of the same sums (equal up to float rounding order).
  """
  b, h, w, c = x.shape
  kh, kw, _, out = kernel.shape
  if h * w <= TOEPLITZ_MAX_POSITIONS:
    taps = conv_taps((h, w), (kh, kw), stride)
    ho, wo = -(-h // stride), -(-w // stride)
    matrix = jnp.einsum('pqk,kio->qipo', taps.astype(kernel.dtype),
                        kernel.reshape(kh * kw, c, out))
    y = x.reshape(b, h * w * c) @ matrix.reshape(h * w * c, ho * wo * out)
    return y.reshape(b, ho, wo, out)
  (ph0, ph1), (pw0, pw1) = _same_padding(h, kh, stride), _same_padding(w, kw, stride)
  xp = jnp.pad(x, ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)))
  ho, wo = -(-h // stride), -(-w // stride)
  cols = [xp[:, a:a + stride * (ho - 1) + 1:stride, d:d + stride * (wo - 1) + 1:stride]
          for a in range(kh) for d in range(kw)]
  patches = jnp.concatenate(cols, axis=-1).reshape(b * ho * wo, kh * kw * c)
  return (patches @ kernel.reshape(kh * kw * c, out)).reshape(b, ho, wo, out)


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, impl: str = 'auto') -> jax.Array:
  """'SAME' 2-D convolution with the implementation chosen by platform and shape.

  ``impl='auto'``: on the CPU (decided when the computation is lowered, with
  ``lax.platform_dependent``, so an AOT compile for a TPU from a CPU host gets
  the TPU choice) layers with at most ``CPU_MATMUL_MAX_POSITIONS`` output
  pixels use :func:`conv2d_matmul`; everything else, and every layer on GPU and
  TPU, uses XLA's convolution. ``'xla'`` / ``'matmul'`` force one form.
  """
  check_impl('conv_impl', impl, CONV_IMPLS)
  if impl == 'xla':
    return conv2d_xla(x, kernel, stride)
  if impl == 'matmul':
    return conv2d_matmul(x, kernel, stride)
  out_positions = -(-x.shape[1] // stride) * -(-x.shape[2] // stride)
  if out_positions > CPU_MATMUL_MAX_POSITIONS:
    return conv2d_xla(x, kernel, stride)
  return jax.lax.platform_dependent(
      x, kernel, cpu=lambda a, k: conv2d_matmul(a, k, stride),
      default=lambda a, k: conv2d_xla(a, k, stride))


def upsample_nearest(x: jax.Array) -> jax.Array:
  """2x nearest-neighbour upsampling of NHWC images."""
  b, height, width, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, height, 2, width, 2, c))
  return x.reshape(b, 2 * height, 2 * width, c)


# Which rows of a 3x3 kernel land on input offsets (-1, 0) (output phase 0) and
# (0, +1) (phase 1) once the input is upsampled by nearest neighbour.
_PHASE_TAPS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)


def subpixel_kernel(kernel: jax.Array) -> jax.Array:
  """The 3x3 kernel ``[3, 3, C, 4 * O]`` of "upsample x2, then conv3x3" at low resolution.

  Output pixel ``(2i + a, 2j + b)`` of the upsampled convolution reads the
  low-resolution pixels at offsets ``a - 1 + p`` (rows) and ``b - 1 + q``
  (columns), ``p, q`` in {0, 1}, through the sums of the kernel taps that fall
  on them (``_PHASE_TAPS``). Stacking the four phases ``(a, b)`` along the output
  channels gives one 'SAME' 3x3 convolution at the input's resolution.
  """
  kh, kw, c, out = kernel.shape
  taps = jnp.asarray(_PHASE_TAPS, kernel.dtype)
  phases = jnp.einsum('apu,bqv,uvio->abpqio', taps, taps, kernel)   # [2, 2, 2, 2, C, O]
  full = jnp.zeros((3, 3, c, 2, 2, out), kernel.dtype)
  for a in range(2):
    for b in range(2):
      full = full.at[a:a + 2, b:b + 2, :, a, b, :].set(phases[a, b])
  return full.reshape(3, 3, c, 4 * out)


def upsample_conv2d_subpixel(x: jax.Array, kernel: jax.Array, impl: str) -> jax.Array:
  """``conv2d(upsample_nearest(x), kernel)`` computed at x's resolution (sub-pixel form).

  One 3x3 convolution with ``4 * O`` output channels (:func:`subpixel_kernel`)
  at the low resolution, then the four phases interleaved (depth to space):
  the same sums, with a quarter of the output positions per convolution.
  """
  b, height, width, _ = x.shape
  out = kernel.shape[-1]
  y = conv2d(x, subpixel_kernel(kernel), 1, impl)            # [B, H, W, 2*2*O]
  y = y.reshape(b, height, width, 2, 2, out).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(b, 2 * height, 2 * width, out)


def upsample_conv2d(x: jax.Array, kernel: jax.Array, impl: str = 'auto') -> jax.Array:
  """Nearest-neighbour 2x upsampling followed by a 'SAME' 3x3 convolution.

  ``'xla'``: literally that. ``'matmul'``: the sub-pixel form with matrix
  products. ``'auto'``: the sub-pixel form with matrix products on the CPU
  when the input has at most ``CPU_MATMUL_MAX_POSITIONS`` pixels, else XLA.
  """
  check_impl('conv_impl', impl, CONV_IMPLS)
  direct = lambda a, k: conv2d_xla(upsample_nearest(a), k, 1)  # noqa: E731
  if impl == 'xla':
    return direct(x, kernel)
  subpixel = lambda a, k: upsample_conv2d_subpixel(a, k, 'matmul')  # noqa: E731
  if impl == 'matmul':
    return subpixel(x, kernel)
  if x.shape[1] * x.shape[2] > CPU_MATMUL_MAX_POSITIONS:
    return direct(x, kernel)
  return jax.lax.platform_dependent(x, kernel, cpu=subpixel, default=direct)


class Conv(nn.Module):
  """Square 'SAME' convolution with bias; parameters as ``flax.linen.Conv``'s.

  Same parameter names, shapes (``kernel`` HWIO, ``bias``) and dtype promotion
  as ``nn.Conv``, so checkpoints are interchangeable; the arithmetic goes
  through :func:`conv2d`, whose implementation is chosen per platform and shape.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  init_scale: float = 1.0
  dtype: Dtype = jnp.float32
  impl: str = 'auto'
  upsample: bool = False   # nearest-neighbour 2x upsampling first (``upsample_conv2d``)

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param('kernel', default_init(self.init_scale),
                        (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if self.upsample:
      return upsample_conv2d(x, kernel, self.impl) + bias
    return conv2d(x, kernel, self.strides, self.impl) + bias


def _conv(features, *, name, dtype, kernel_size=3, strides=1, init_scale=1.0, impl='auto',
          upsample=False):
  """Conv layer with TF 'SAME' padding (the reference's ``nn.conv2d``)."""
  return Conv(features, kernel_size=kernel_size, strides=strides, init_scale=init_scale,
              dtype=dtype, impl=impl, upsample=upsample, name=name)


def _group_norm(x, *, num_groups, name):
  """GroupNorm(32, eps=1e-6) computed in float32, cast back to ``x.dtype``."""
  y = nn.GroupNorm(num_groups=num_groups, epsilon=1e-6, dtype=jnp.float32,
                   param_dtype=jnp.float32, name=name)(x)
  return y.astype(x.dtype)


class TimestepEmbedding(nn.Module):
  """Sinusoid(ch) -> Dense(4ch) -> SiLU -> Dense(4ch) (reference ``temb``).

  As in the reference, the output is *not* passed through a final
  nonlinearity here; every residual block applies SiLU before its own
  projection.
  """
  ch: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    temb = get_timestep_embedding(t, self.ch).astype(self.dtype)
    temb = _dense(4 * self.ch, name='dense0', dtype=self.dtype)(temb)
    temb = _dense(4 * self.ch, name='dense1', dtype=self.dtype)(nn.silu(temb))
    return temb


class ResnetBlock(nn.Module):
  """Wide-ResNet block with the timestep embedding added (appendix B).

  GroupNorm -> SiLU -> Conv3x3 -> + Dense(SiLU(temb)) -> GroupNorm -> SiLU ->
  Dropout -> Conv3x3 (zero init), plus a shortcut: identity, or a 1x1 "nin"
  projection (3x3 conv if ``conv_shortcut``) when the width changes.
  """
  out_ch: Optional[int] = None
  dropout: float = 0.0
  num_groups: int = 32
  conv_shortcut: bool = False
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x, temb, train: bool):
    in_ch = x.shape[-1]
    out_ch = self.out_ch or in_ch
    h = nn.silu(_group_norm(x, num_groups=self.num_groups, name='norm1'))
    conv = functools.partial(_conv, dtype=self.dtype, impl=self.conv_impl)
    h = conv(out_ch, name='conv1')(h)
    # Add in the timestep embedding (appendix B: "into each residual block").
    h = h + _dense(out_ch, name='temb_proj', dtype=self.dtype)(
        nn.silu(temb))[:, None, None, :]
    h = nn.silu(_group_norm(h, num_groups=self.num_groups, name='norm2'))
    h = nn.Dropout(rate=self.dropout)(h, deterministic=not train)
    h = conv(out_ch, name='conv2', init_scale=0.0)(h)
    if in_ch != out_ch:
      if self.conv_shortcut:
        x = conv(out_ch, name='conv_shortcut')(x)
      else:
        x = _dense(out_ch, name='nin_shortcut', dtype=self.dtype)(x)
    return x + h


def attention_implementation(impl: str, dtype: Dtype, head_dim: int):
  """The ``implementation`` argument of ``jax.nn.dot_product_attention``.

  ``'auto'``: cuDNN's fused (flash) attention on an NVIDIA GPU when it supports
  the call (16-bit inputs, head size a multiple of 8 and at most 128), XLA's
  otherwise (CPU, TPU, float32). ``'xla'`` / ``'cudnn'`` force one.
  """
  check_impl('attention_impl', impl, ATTENTION_IMPLS)
  if impl == 'auto':
    supported = (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
                 and head_dim % 8 == 0 and head_dim <= 128)
    return 'cudnn' if supported and jax.default_backend() == 'gpu' else 'xla'
  return impl


class AttnBlock(nn.Module):
  """Single-head self-attention over all spatial positions (PixelSNAIL [6]).

  GroupNorm, 1x1 q/k/v projections, ``softmax(q k^T / sqrt(C)) v`` through
  ``jax.nn.dot_product_attention`` (logits and softmax in float32), output
  projection initialised to zero, residual connection.
  """
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  attention_impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    b, height, width, c = x.shape
    h = _group_norm(x, num_groups=self.num_groups, name='norm')
    # [B, T, N=1 head, C]
    q, k, v = (_dense(c, name=n, dtype=self.dtype)(h).reshape(b, height * width, 1, c)
               for n in ('q', 'k', 'v'))
    h = jax.nn.dot_product_attention(
        q, k, v, scale=c ** -0.5,
        implementation=attention_implementation(self.attention_impl, q.dtype, c))
    h = _dense(c, name='proj_out', dtype=self.dtype, init_scale=0.0)(
        h.reshape(b, height, width, c))
    return x + h


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """``softmax(q k^T / sqrt(C)) v`` for ``[B, T, C]`` inputs, written out (for tests)."""
  w = jnp.einsum('bic,bjc->bij', q, k, preferred_element_type=jnp.float32)
  w = jax.nn.softmax(w * q.shape[-1] ** -0.5, axis=-1).astype(v.dtype)
  return jnp.einsum('bij,bjc->bic', w, v)


class Downsample(nn.Module):
  """Halve the resolution: 3x3 conv with stride 2 (``resamp_with_conv``),
  otherwise 2x2 average pooling."""
  with_conv: bool = True
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    if self.with_conv:
      return _conv(x.shape[-1], name='conv', dtype=self.dtype, strides=2,
                   impl=self.conv_impl)(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding='SAME')


class Upsample(nn.Module):
  """Double the resolution: nearest neighbour, then a 3x3 conv if
  ``with_conv``."""
  with_conv: bool = True
  dtype: Dtype = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    if self.with_conv:   # upsampling and conv in one (sub-pixel form where it is faster)
      return _conv(x.shape[-1], name='conv', dtype=self.dtype, impl=self.conv_impl,
                   upsample=True)(x)
    return upsample_nearest(x)
