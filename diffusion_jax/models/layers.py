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

import math
from typing import Any, Optional

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


def _conv(features, *, name, dtype, kernel_size=3, strides=1, init_scale=1.0):
  """Conv layer with TF 'SAME' padding (the reference's ``nn.conv2d``)."""
  return nn.Conv(features, kernel_size=(kernel_size, kernel_size),
                 strides=(strides, strides), padding='SAME',
                 kernel_init=default_init(init_scale),
                 bias_init=nn.initializers.zeros, dtype=dtype,
                 param_dtype=jnp.float32, name=name)


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

  @nn.compact
  def __call__(self, x, temb, train: bool):
    in_ch = x.shape[-1]
    out_ch = self.out_ch or in_ch
    h = nn.silu(_group_norm(x, num_groups=self.num_groups, name='norm1'))
    h = _conv(out_ch, name='conv1', dtype=self.dtype)(h)
    # Add in the timestep embedding (appendix B: "into each residual block").
    h = h + _dense(out_ch, name='temb_proj', dtype=self.dtype)(
        nn.silu(temb))[:, None, None, :]
    h = nn.silu(_group_norm(h, num_groups=self.num_groups, name='norm2'))
    h = nn.Dropout(rate=self.dropout)(h, deterministic=not train)
    h = _conv(out_ch, name='conv2', dtype=self.dtype, init_scale=0.0)(h)
    if in_ch != out_ch:
      if self.conv_shortcut:
        x = _conv(out_ch, name='conv_shortcut', dtype=self.dtype)(x)
      else:
        x = _dense(out_ch, name='nin_shortcut', dtype=self.dtype)(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all spatial positions (PixelSNAIL [6]).

  GroupNorm, 1x1 q/k/v projections, ``softmax(q k^T / sqrt(C))`` (float32),
  output projection initialised to zero, residual connection.
  """
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, height, width, c = x.shape
    h = _group_norm(x, num_groups=self.num_groups, name='norm')
    q = _dense(c, name='q', dtype=self.dtype)(h).reshape(b, height * width, c)
    k = _dense(c, name='k', dtype=self.dtype)(h).reshape(b, height * width, c)
    v = _dense(c, name='v', dtype=self.dtype)(h).reshape(b, height * width, c)
    w = jnp.einsum('bic,bjc->bij', q, k).astype(jnp.float32) * (c ** -0.5)
    w = jax.nn.softmax(w, axis=-1).astype(self.dtype)
    h = jnp.einsum('bij,bjc->bic', w, v).reshape(b, height, width, c)
    h = _dense(c, name='proj_out', dtype=self.dtype, init_scale=0.0)(h)
    return x + h


class Downsample(nn.Module):
  """Halve the resolution: 3x3 conv with stride 2 (``resamp_with_conv``),
  otherwise 2x2 average pooling."""
  with_conv: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.with_conv:
      return _conv(x.shape[-1], name='conv', dtype=self.dtype, strides=2)(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding='SAME')


class Upsample(nn.Module):
  """Double the resolution: nearest neighbour, then a 3x3 conv if
  ``with_conv``."""
  with_conv: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, height, width, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, height, 2, width, 2, c))
    x = x.reshape(b, 2 * height, 2 * width, c)
    if self.with_conv:
      x = _conv(c, name='conv', dtype=self.dtype)(x)
    return x
