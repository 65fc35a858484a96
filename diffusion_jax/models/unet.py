"""The DDPM U-Net (Ho et al. 2020, appendix B) in Flax linen.

A PixelCNN++-style U-Net built from Wide-ResNet blocks with GroupNorm, the
timestep's sinusoidal embedding added in every residual block, and
self-attention at chosen resolutions (16x16 in the paper) and in the middle.
The layout, parameter shapes and initialisers follow the reference
implementation ``hojonathanho/diffusion`` (``diffusion_tf/models/unet.py``):

* ``conv_in`` (3x3, ``ch``);
* down path: for each level ``i`` (resolution ``S / 2**i``),
  ``num_res_blocks`` ResnetBlocks of width ``ch * ch_mult[i]`` (each followed
  by attention at ``attn_resolutions``), then a stride-2 downsample except at
  the last level; every output is kept as a skip connection;
* middle: ResnetBlock, AttnBlock, ResnetBlock;
* up path: for each level from the lowest, ``num_res_blocks + 1``
  ResnetBlocks whose input is the running activation concatenated with one
  skip connection (popped in reverse), attention as above, then a
  nearest-neighbour upsample and conv except at level 0;
* out: GroupNorm -> SiLU -> Conv3x3 (zero init) to ``out_ch`` channels.

With ``ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn=(16,)`` this is
the paper's 35.7M-parameter CIFAR-10 model; with ``ch_mult=(1, 1, 2, 2, 4,
4)`` it is the 114M-parameter 256x256 model.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models import layers

Dtype = Any


class UNet(nn.Module):
  """The DDPM noise-prediction network ``eps_theta(x_t, t)``.

  Attributes:
    ch: base channel count (128 in the paper).
    out_ch: output channels (C, or 2C for a learned variance).
    ch_mult: channel multiplier per resolution level.
    num_res_blocks: residual blocks per level on the down path (the up path
      has one more, as in the reference).
    attn_resolutions: spatial sizes (height) at which attention is applied.
    dropout: dropout rate inside residual blocks (active with ``train=True``).
    resamp_with_conv: use convolutions in down/upsampling.
    num_groups: GroupNorm groups.
    dtype: compute dtype of activations; parameters are float32 and the
      output is cast to float32 (GroupNorm and the softmax run in float32).
    remat: rematerialise each residual block in the backward pass
      (``jax.checkpoint``): activation memory for about a third more FLOPs.
    conv_impl: ``layers.CONV_IMPLS`` (how 3x3 convolutions are computed; the
      same arithmetic and parameters whichever is chosen).
    attention_impl: ``layers.ATTENTION_IMPLS``.
    num_classes: 0 (unconditional) or the number of classes of a
      class-conditional model (:meth:`_class_embedding`).
  """
  ch: int = 128
  out_ch: int = 3
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  remat: bool = False
  conv_impl: str = 'auto'
  attention_impl: str = 'auto'
  num_classes: int = 0

  @nn.compact
  def __call__(self, x, t, y=None, train: bool = False):
    """Predicts the model output for noisy images ``x`` at steps ``t`` (and labels ``y``).

    Args:
      x: ``[B, H, W, C]`` images in [-1, 1] (NHWC).
      t: ``[B]`` int32 zero-based timesteps (a scalar is broadcast).
      y: class-conditional models (``num_classes > 0``) only: ``[B]`` int32
        labels in ``[0, num_classes]``, ``num_classes`` being the "no label"
        token of classifier-free guidance (Ho & Salimans 2022); ``None`` is
        "no label" for every example.
      train: enables dropout (needs ``rngs={'dropout': key}``).

    Returns:
      ``[B, H, W, out_ch]`` float32.
    """
    if x.ndim != 4:
      raise ValueError(f'x must be NHWC with 4 dimensions, got {x.shape}.')
    b, height, width, _ = x.shape
    num_levels = len(self.ch_mult)
    factor = 2 ** (num_levels - 1)
    if height % factor or width % factor:
      raise ValueError(
          f'Input spatial size {height}x{width} must be divisible by '
          f'2**(len(model.ch_mult)-1) = {factor} (model.ch_mult='
          f'{tuple(self.ch_mult)}).')
    t = jnp.asarray(t)
    if t.ndim == 0:
      t = jnp.broadcast_to(t, (b,))
    if t.shape != (b,):
      raise ValueError(f't must have shape [B]=({b},), got {t.shape}.')

    dtype = self.dtype
    # train (argument 3, after self, x, temb) is a Python bool: static under remat.
    resnet = (nn.remat(layers.ResnetBlock, static_argnums=(3,)) if self.remat
              else layers.ResnetBlock)
    block = lambda out_ch, name: resnet(  # noqa: E731
        out_ch=out_ch, dropout=self.dropout, num_groups=self.num_groups,
        dtype=dtype, conv_impl=self.conv_impl, name=name)
    attn = lambda name: layers.AttnBlock(  # noqa: E731
        num_groups=self.num_groups, dtype=dtype, attention_impl=self.attention_impl,
        name=name)

    temb = layers.TimestepEmbedding(self.ch, dtype=dtype, name='temb')(t)
    if self.num_classes > 0 or y is not None:
      temb = temb + self._class_embedding(y, b, temb.dtype)

    # Downsampling.
    conv = functools.partial(layers._conv, dtype=dtype, impl=self.conv_impl)
    hs = [conv(self.ch, name='conv_in')(x.astype(dtype))]
    for i_level in range(num_levels):
      for i_block in range(self.num_res_blocks):
        h = block(self.ch * self.ch_mult[i_level],
                  f'down_{i_level}_block_{i_block}')(hs[-1], temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn(f'down_{i_level}_attn_{i_block}')(h)
        hs.append(h)
      if i_level != num_levels - 1:
        hs.append(layers.Downsample(
            self.resamp_with_conv, dtype=dtype, conv_impl=self.conv_impl,
            name=f'down_{i_level}_downsample')(hs[-1]))

    # Middle.
    h = hs[-1]
    h = block(None, 'mid_block_1')(h, temb, train)
    h = attn('mid_attn_1')(h)
    h = block(None, 'mid_block_2')(h, temb, train)

    # Upsampling, concatenating the skip connections.
    for i_level in reversed(range(num_levels)):
      for i_block in range(self.num_res_blocks + 1):
        h = block(self.ch * self.ch_mult[i_level],
                  f'up_{i_level}_block_{i_block}')(
                      jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn(f'up_{i_level}_attn_{i_block}')(h)
      if i_level != 0:
        h = layers.Upsample(self.resamp_with_conv, dtype=dtype, conv_impl=self.conv_impl,
                            name=f'up_{i_level}_upsample')(h)
    assert not hs

    # End.
    h = nn.silu(layers._group_norm(h, num_groups=self.num_groups,
                                   name='norm_out'))
    h = conv(self.out_ch, name='conv_out', init_scale=0.0)(h)
    return h.astype(jnp.float32)

  def _class_embedding(self, y, batch: int, dtype):
    """The learned embedding of labels ``y``, added to the timestep embedding.

    improved-diffusion's placement (Nichol & Dhariwal 2021, ``UNetModel``:
    ``emb = time_embed(t) + label_emb(y)``), with ``num_classes + 1`` rows so that
    the last one is classifier-free guidance's null label (Ho & Salimans 2022, §3.2).
    """
    if self.num_classes <= 0:
      if y is not None:
        raise ValueError('labels y were given to an unconditional model (model.num_classes=0).')
    if y is None:
      y = jnp.full((batch,), self.num_classes, jnp.int32)
    y = jnp.asarray(y)
    if y.shape != (batch,):
      raise ValueError(f'y must have shape [B]=({batch},), got {y.shape}.')
    return nn.Embed(self.num_classes + 1, 4 * self.ch, dtype=dtype, name='label_emb')(y)
