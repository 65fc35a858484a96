"""Interop with diffusers: the DDPM U-Net as a diffusers ``UNet2DModel``.

The paper's released checkpoints (``google/ddpm-cifar10-32``,
``google/ddpm-{celebahq,church,bedroom,cat}-256``) circulate as diffusers
``UNet2DModel`` folders. In the *DDPM layout* (the fields below) that class is
the network of Ho et al. 2020, appendix B, parameter for parameter, i.e. our
``models.UNet``.
"""

from typing import Any

# The diffusers fields that make a UNet2DModel the DDPM network, with the
# value each must have (anything else is a different network).
DDPM_LAYOUT = {
    'downsample_padding': 0,          # TF 'SAME' stride-2 conv: pad (0, 1)
    'freq_shift': 1,                  # freq_k = exp(-k log(1e4) / (half - 1))
    'flip_sin_to_cos': False,         # [sin, cos], sines first
    'attention_head_dim': None,       # single-head attention
    'norm_eps': 1e-6,                 # GroupNorm epsilon of the reference
    'time_embedding_type': 'positional',
    'resnet_time_scale_shift': 'default',   # temb added, not FiLM
    'act_fn': 'silu',
    'center_input_sample': False,
    'downsample_type': 'conv',
    'upsample_type': 'conv',
    'mid_block_type': 'UNetMidBlock2D',
    'mid_block_scale_factor': 1,
    'add_attention': True,
    'class_embed_type': None,
    'num_class_embeds': None,
    'time_embedding_dim': None,       # 4 * ch
    'attn_norm_num_groups': None,     # = norm_num_groups
}


def _section(config: Any, name: str) -> Any:
  section = config.get(name) if hasattr(config, 'get') else None
  if section is None:
    raise ValueError(f'The config has no {name} section.')
  return section


def level_resolutions(image_size: int, ch_mult) -> tuple:
  """Spatial size at each level of the U-Net: ``image_size / 2**i``."""
  return tuple(int(image_size) // 2 ** i for i in range(len(ch_mult)))


def diffusers_unet_config(config: Any) -> dict:
  """The diffusers ``UNet2DModel`` config of a project config (DDPM layout).

  The result is a plain dict: ``UNet2DModel(**diffusers_unet_config(c))``
  builds the network of ``models.create_model(c)``, with the same parameter
  count (35,746,307 for ``configs/cifar10.py``). Levels whose resolution is
  in ``model.attn_resolutions`` get ``AttnDownBlock2D`` / ``AttnUpBlock2D``.

  Args:
    config: a full project config (``data``, ``model``, ``diffusion``).

  Returns:
    The diffusers config dict.
  """
  data, model = _section(config, 'data'), _section(config, 'model')
  diffusion = config.get('diffusion')
  ch_mult = tuple(int(m) for m in model.ch_mult)
  attn = {int(r) for r in model.attn_resolutions}
  has_attn = [r in attn for r in level_resolutions(data.image_size, ch_mult)]
  out_channels = int(data.num_channels)
  if diffusion is not None and diffusion.get('var_type') == 'learned_range':
    out_channels *= 2
  result = dict(DDPM_LAYOUT)
  result.update(
      sample_size=int(data.image_size),
      in_channels=int(data.num_channels),
      out_channels=out_channels,
      block_out_channels=tuple(int(model.ch) * m for m in ch_mult),
      layers_per_block=int(model.num_res_blocks),
      down_block_types=tuple('AttnDownBlock2D' if a else 'DownBlock2D'
                             for a in has_attn),
      up_block_types=tuple('AttnUpBlock2D' if a else 'UpBlock2D'
                           for a in reversed(has_attn)),
      norm_num_groups=int(model.get('num_groups', 32)),
      dropout=float(model.get('dropout', 0.0)),
  )
  return result
