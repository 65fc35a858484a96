"""Noise-prediction networks, built from an ``ml_collections`` config.

``create_model(config)`` returns a Flax module called as
``module.apply(variables, x_t, t, y=None, train=bool, rngs={'dropout': key})``
(``y``: int32 labels ``[B]`` of a class-conditional model, ``model.num_classes > 0``).
"""

import warnings
from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax.models import layers
from diffusion_jax.models.layers import AttnBlock
from diffusion_jax.models.layers import Downsample
from diffusion_jax.models.layers import get_timestep_embedding
from diffusion_jax.models.layers import ResnetBlock
from diffusion_jax.models.layers import TimestepEmbedding
from diffusion_jax.models.layers import Upsample
from diffusion_jax.models.unet import UNet

__all__ = [
    'AttnBlock', 'Downsample', 'MODEL_NAMES', 'DTYPES', 'ResnetBlock',
    'TimestepEmbedding', 'UNet', 'Upsample', 'create_model',
    'get_timestep_embedding', 'count_params',
]

MODEL_NAMES = ('unet',)
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Channels assumed for a bare ``model`` section without out_channels /
# num_channels (RGB, fixed variance).
DEFAULT_OUT_CHANNELS = 3


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  try:
    return cfg.get(key, default)
  except AttributeError:
    return getattr(cfg, key, default)


def _required(model: Any, key: str) -> Any:
  value = _get(model, key)
  if value is None:
    raise ValueError(f'The model config has no model.{key}.')
  return value


def _dtype_name(dtype: Any) -> str:
  if isinstance(dtype, str):
    return dtype
  try:
    return jnp.dtype(dtype).name
  except TypeError:
    return repr(dtype)


def create_model(config: Any) -> UNet:
  """Builds the model named by ``model.name`` from a config.

  Args:
    config: either a full experiment config (with ``data``, ``model`` and
      ``diffusion`` sections), or a bare ``model`` section. With a full
      config the output has ``data.num_channels`` channels, doubled when
      ``diffusion.var_type == 'learned_range'``, and ``data.image_size`` is
      validated against ``model.ch_mult``. With a bare section the output
      channels are ``model.out_channels`` if present, else
      ``model.num_channels``, else 3 (``DEFAULT_OUT_CHANNELS``; it is the
      caller's job to double it for a learned variance), and an optional
      ``model.image_size`` is validated.

  Returns:
    An un-initialised Flax module (``UNet``).

  Raises:
    ValueError: for an unknown ``model.name`` or ``model.dtype``, an image
      size not divisible by ``2**(len(ch_mult)-1)``, ``model.ch`` not
      divisible by ``model.num_groups``, or other malformed fields.
    Unreachable ``attn_resolutions`` only warn (``UserWarning``): scripts
    legitimately shrink ``data.image_size`` for quick runs.
  """
  if _get(config, 'model') is not None:
    model = _get(config, 'model')
    data = _get(config, 'data')
    diffusion = _get(config, 'diffusion')
    out_ch = int(_get(data, 'num_channels', DEFAULT_OUT_CHANNELS)
                 if data is not None else DEFAULT_OUT_CHANNELS)
    if diffusion is not None and _get(diffusion, 'var_type') == 'learned_range':
      out_ch *= 2
    image_size = _get(data, 'image_size') if data is not None else None
    size_field = 'data.image_size'
  else:
    model = config
    out_ch = _get(model, 'out_channels')
    if out_ch is None:
      out_ch = _get(model, 'num_channels', DEFAULT_OUT_CHANNELS)
    out_ch = int(out_ch)
    image_size = _get(model, 'image_size')
    size_field = 'model.image_size'

  name = _get(model, 'name', 'unet')
  if name not in MODEL_NAMES:
    raise ValueError(
        f'Unknown model.name={name!r}; allowed values: {MODEL_NAMES}.')
  dtype_name = _dtype_name(_get(model, 'dtype', 'float32'))
  if dtype_name not in DTYPES:
    raise ValueError(f'Unknown model.dtype={dtype_name!r}; allowed values: '
                     f'{tuple(DTYPES)}.')

  ch = int(_required(model, 'ch'))
  ch_mult = tuple(int(m) for m in _required(model, 'ch_mult'))
  num_res_blocks = int(_required(model, 'num_res_blocks'))
  attn_resolutions = tuple(int(r) for r in _get(model, 'attn_resolutions', ()))
  dropout = float(_get(model, 'dropout', 0.0))
  num_groups = int(_get(model, 'num_groups', 32))
  conv_impl = layers.check_impl('conv_impl', str(_get(model, 'conv_impl', 'auto')),
                                layers.CONV_IMPLS)
  attention_impl = layers.check_impl('attention_impl',
                                     str(_get(model, 'attention_impl', 'auto')),
                                     layers.ATTENTION_IMPLS)

  num_classes = _get(model, 'num_classes', 0)
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
    raise ValueError(f'model.num_classes must be an integer >= 0 (0: unconditional), '
                     f'got {num_classes!r}.')
  if ch <= 0:
    raise ValueError(f'model.ch must be positive, got {ch}.')
  if not ch_mult or any(m <= 0 for m in ch_mult):
    raise ValueError(
        f'model.ch_mult must be a non-empty tuple of positive ints, got '
        f'{ch_mult}.')
  if num_res_blocks < 0:
    raise ValueError(f'model.num_res_blocks must be >= 0, got '
                     f'{num_res_blocks}.')
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f'model.dropout must be in [0, 1), got {dropout}.')
  if out_ch <= 0:
    raise ValueError(f'The number of output channels must be positive, got '
                     f'{out_ch} (data.num_channels / model.out_channels).')
  if num_groups <= 0 or ch % num_groups:
    raise ValueError(
        f'model.ch={ch} must be divisible by model.num_groups={num_groups} '
        f'(GroupNorm groups).')

  if image_size is not None:
    image_size = int(image_size)
    factor = 2 ** (len(ch_mult) - 1)
    if image_size <= 0 or image_size % factor:
      raise ValueError(
          f'{size_field}={image_size} must be divisible by '
          f'2**(len(model.ch_mult)-1) = {factor} for model.ch_mult={ch_mult}.')
    reachable = tuple(image_size // 2 ** i for i in range(len(ch_mult)))
    missing = tuple(r for r in attn_resolutions if r not in reachable)
    if missing:
      warnings.warn(
          f'model.attn_resolutions={attn_resolutions}: {missing} never '
          f'occur for {size_field}={image_size} (resolutions {reachable}); '
          f'no attention block is built for them.',
          UserWarning, stacklevel=2)

  return UNet(
      ch=ch, out_ch=out_ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
      attn_resolutions=attn_resolutions, dropout=dropout,
      resamp_with_conv=bool(_get(model, 'resamp_with_conv', True)),
      num_groups=num_groups, dtype=DTYPES[dtype_name],
      remat=bool(_get(model, 'remat', False)), conv_impl=conv_impl,
      attention_impl=attention_impl, num_classes=num_classes)


def count_params(params: Any) -> int:
  """Total number of parameters in a pytree (works on ``jax.eval_shape``)."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
