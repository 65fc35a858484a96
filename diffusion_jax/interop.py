"""Interop with diffusers: the DDPM U-Net as a diffusers ``UNet2DModel``.

The paper's released checkpoints (``google/ddpm-cifar10-32``,
``google/ddpm-{celebahq,church,bedroom,cat}-256``) circulate as diffusers
``UNet2DModel`` folders: ``config.json`` and
``diffusion_pytorch_model.safetensors``. In the *DDPM layout*
(:data:`DDPM_LAYOUT`) that class is the network of Ho et al. 2020, appendix B,
parameter for parameter, i.e. our ``models.UNet``:

=============================  =============================================
ours (Flax)                    diffusers (PyTorch)
=============================  =============================================
``conv_in``                    ``conv_in``
``temb/dense0``, ``dense1``    ``time_embedding.linear_1``, ``linear_2``
``down_{i}_block_{j}``         ``down_blocks.{i}.resnets.{j}``
``down_{i}_attn_{j}``          ``down_blocks.{i}.attentions.{j}``
``down_{i}_downsample/conv``   ``down_blocks.{i}.downsamplers.0.conv``
``mid_block_1``, ``_2``        ``mid_block.resnets.0``, ``.1``
``mid_attn_1``                 ``mid_block.attentions.0``
``up_{i}_block_{j}``           ``up_blocks.{L-1-i}.resnets.{j}``
``up_{i}_attn_{j}``            ``up_blocks.{L-1-i}.attentions.{j}``
``up_{i}_upsample/conv``       ``up_blocks.{L-1-i}.upsamplers.0.conv``
``norm_out``, ``conv_out``     ``conv_norm_out``, ``conv_out``
=============================  =============================================

Inside a residual block ``temb_proj`` is ``time_emb_proj`` and
``nin_shortcut`` (a Dense) is ``conv_shortcut`` (a 1x1 Conv2d); inside an
attention block ``norm, q, k, v, proj_out`` are ``group_norm, to_q, to_k,
to_v, to_out.0`` (older diffusers files: ``query, key, value, proj_attn``).
Conv kernels are HWIO here and OIHW there, Dense kernels ``[in, out]`` here
and Linear weights ``[out, in]`` there; GroupNorm ``scale`` is ``weight``.
The level order of the up path is reversed: our ``up_{i}`` (resolution
``S / 2**i``) is diffusers' ``up_blocks[L-1-i]``.
"""

import json
import re
from typing import Any

from etils import epath
import jax
import numpy as np

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'
DIFFUSERS_VERSION = '0.30.0'   # written into exported config.json files

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

# UNet2DModel's defaults (diffusers 0.30-0.42) for fields a config.json may
# omit; an omitted field takes this value when diffusers builds the model.
DIFFUSERS_DEFAULTS = {
    'sample_size': None, 'in_channels': 3, 'out_channels': 3,
    'center_input_sample': False, 'time_embedding_type': 'positional',
    'time_embedding_dim': None, 'freq_shift': 0, 'flip_sin_to_cos': True,
    'down_block_types': ('DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D',
                         'AttnDownBlock2D'),
    'mid_block_type': 'UNetMidBlock2D',
    'up_block_types': ('AttnUpBlock2D', 'AttnUpBlock2D', 'AttnUpBlock2D',
                       'UpBlock2D'),
    'block_out_channels': (224, 448, 672, 896), 'layers_per_block': 2,
    'mid_block_scale_factor': 1, 'downsample_padding': 1,
    'downsample_type': 'conv', 'upsample_type': 'conv', 'dropout': 0.0,
    'act_fn': 'silu', 'attention_head_dim': 8, 'norm_num_groups': 32,
    'attn_norm_num_groups': None, 'norm_eps': 1e-5,
    'resnet_time_scale_shift': 'default', 'add_attention': True,
    'class_embed_type': None, 'num_class_embeds': None,
    'num_train_timesteps': None,
}

# Data sets whose (image size, channels) identify them, for a config made from
# a diffusers folder alone; others get 'image_folder' (set --config instead).
_DATA_BY_SHAPE = {(32, 3): 'cifar10', (28, 1): 'mnist', (8, 1): 'digits'}

# Module and leaf names: ours -> diffusers.
_RESNET = {'norm1': 'norm1', 'conv1': 'conv1', 'temb_proj': 'time_emb_proj',
           'norm2': 'norm2', 'conv2': 'conv2', 'nin_shortcut': 'conv_shortcut'}
_ATTN = {'norm': 'group_norm', 'q': 'to_q', 'k': 'to_k', 'v': 'to_v',
         'proj_out': 'to_out.0'}
_LEGACY_ATTN = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v',
                'proj_attn': 'to_out.0'}
_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}


# --- configs ----------------------------------------------------------------


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

  Raises:
    ValueError: for a model diffusers cannot express (``model.ch_mult[0]``
      other than 1, ``model.resamp_with_conv=False``).
  """
  data, model = _section(config, 'data'), _section(config, 'model')
  diffusion = config.get('diffusion')
  ch_mult = tuple(int(m) for m in model.ch_mult)
  if ch_mult[0] != 1:
    raise ValueError(f'model.ch_mult={ch_mult} must start with 1 for diffusers '
                     '(its conv_in has block_out_channels[0] channels).')
  if not model.resamp_with_conv:
    raise ValueError('model.resamp_with_conv must be True for diffusers '
                     "(downsample_type='conv', upsample_type='conv').")
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
      norm_num_groups=int(model.num_groups),
      dropout=float(model.dropout),
  )
  return result


def _fail(field: str, value: Any, required: str) -> None:
  raise ValueError(f'diffusers config: {field}={value!r} is not the DDPM '
                   f'layout; it must be {required}.')


def _matches(value: Any, required: Any) -> bool:
  """JSON value equality: numbers by value, None / bools / strings exactly."""
  if required is None or isinstance(required, bool):
    return value is required
  if isinstance(required, (int, float)):
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and value == required)
  return value == required


def check_ddpm_layout(dconfig: dict) -> dict:
  """The diffusers config with its defaults filled in, if it is the DDPM layout.

  Raises:
    ValueError: one line naming the first field that differs and the value
      it must have.
  """
  if dconfig.get('_class_name', 'UNet2DModel') != 'UNet2DModel':
    _fail('_class_name', dconfig['_class_name'], "'UNet2DModel'")
  full = dict(DIFFUSERS_DEFAULTS)
  full.update({k: v for k, v in dconfig.items() if not k.startswith('_')})
  for field, required in DDPM_LAYOUT.items():
    if not _matches(full.get(field), required):
      _fail(field, full.get(field), repr(required))
  size = full['sample_size']
  if isinstance(size, (list, tuple)):
    if len(size) != 2 or size[0] != size[1]:
      _fail('sample_size', size, 'one int (square images)')
    size = size[0]
  if not isinstance(size, int) or size <= 0:
    _fail('sample_size', size, 'a positive int')
  full['sample_size'] = size
  down = tuple(full['down_block_types'])
  if not down or any(b not in ('DownBlock2D', 'AttnDownBlock2D') for b in down):
    _fail('down_block_types', list(down),
          "a list of 'DownBlock2D' / 'AttnDownBlock2D'")
  mirror = tuple(b.replace('Down', 'Up') for b in reversed(down))
  if tuple(full['up_block_types']) != mirror:
    _fail('up_block_types', list(full['up_block_types']),
          f'{list(mirror)} (the mirror of down_block_types)')
  channels = tuple(full['block_out_channels'])
  if len(channels) != len(down):
    _fail('block_out_channels', list(channels),
          f'a list of {len(down)} widths (one per down block)')
  if any(c % channels[0] for c in channels):
    _fail('block_out_channels', list(channels),
          f'multiples of block_out_channels[0]={channels[0]}')
  c_in, c_out = full['in_channels'], full['out_channels']
  if c_out not in (c_in, 2 * c_in):
    _fail('out_channels', c_out, f'in_channels={c_in} or 2*in_channels '
          '(a learned variance)')
  return full


def config_from_diffusers(dconfig: dict, base: Any = None):
  """A full project config for a diffusers ``UNet2DModel`` config.

  The ``model`` section and ``data.image_size`` / ``data.num_channels``
  describe the diffusers network; every other setting (schedule, mean and
  variance types, evaluation) comes from ``base``, by default the paper's
  (``config_lib.base_config()``, Ho et al. 2020 App. B), with ``data.name``
  guessed from the image shape (32x32x3: ``cifar10``). ``out_channels = 2C``
  sets ``diffusion.var_type='learned_range'``.

  Raises:
    ValueError: for a non-DDPM layout (see :func:`check_ddpm_layout`), or a
      ``base`` whose data shape or ``var_type`` contradicts the network.
  """
  from diffusion_jax import config_lib  # pylint: disable=g-import-not-at-top
  full = check_ddpm_layout(dconfig)
  size, c_in = full['sample_size'], int(full['in_channels'])
  if base is None:
    config = config_lib.base_config()
    config.data.name = _DATA_BY_SHAPE.get((size, c_in), 'image_folder')
    config.data.image_size, config.data.num_channels = size, c_in
    if config.data.name in ('digits', 'mnist'):
      config.data.random_flip = False
  else:
    config = base.copy_and_resolve_references()
    for field, value in (('image_size', size), ('num_channels', c_in)):
      if int(config.data[field]) != value:
        raise ValueError(f'data.{field}={config.data[field]} of the config does '
                         f'not match the diffusers model ({value}).')
  learned = int(full['out_channels']) == 2 * c_in
  if base is None and learned:
    config.diffusion.var_type = 'learned_range'
  elif (config.diffusion.var_type == 'learned_range') != learned:
    raise ValueError(
        f'diffusion.var_type={config.diffusion.var_type!r} does not match the '
        f'diffusers model (out_channels={full["out_channels"]}, in_channels='
        f'{c_in}): use ' + ("'learned_range'." if learned else
                            "'fixed_large' or 'fixed_small'."))
  channels = tuple(int(c) for c in full['block_out_channels'])
  model = config.model
  model.name = 'unet'
  model.ch = channels[0]
  model.ch_mult = tuple(c // channels[0] for c in channels)
  model.num_res_blocks = int(full['layers_per_block'])
  model.attn_resolutions = tuple(
      r for r, b in zip(level_resolutions(size, channels),
                        full['down_block_types']) if b == 'AttnDownBlock2D')
  model.dropout = float(full['dropout'])
  model.resamp_with_conv = True
  model.num_groups = int(full['norm_num_groups'])
  return config


# --- the parameter mapping ----------------------------------------------------


def _module_name(path: tuple, num_levels: int) -> str:
  """Our module path (without the leaf) -> the diffusers module name."""
  head, rest = path[0], path[1:]
  if head == 'conv_in' or head == 'conv_out':
    return head
  if head == 'norm_out':
    return 'conv_norm_out'
  if head == 'temb':
    return {'dense0': 'time_embedding.linear_1',
            'dense1': 'time_embedding.linear_2'}[rest[0]]
  m = re.fullmatch(r'mid_(block|attn)_(\d)', head)
  if m:
    kind, n = m.group(1), int(m.group(2))
    if kind == 'block':
      return f'mid_block.resnets.{n - 1}.{_RESNET[rest[0]]}'
    return f'mid_block.attentions.{n - 1}.{_ATTN[rest[0]]}'
  m = re.fullmatch(r'(down|up)_(\d+)_(block|attn|downsample|upsample)_?(\d*)',
                   head)
  if not m:
    raise KeyError(f'no diffusers name for parameter {"/".join(path)}')
  side, level, kind, j = m.group(1), int(m.group(2)), m.group(3), m.group(4)
  index = level if side == 'down' else num_levels - 1 - level
  prefix = f'{side}_blocks.{index}'
  if kind == 'block':
    return f'{prefix}.resnets.{j}.{_RESNET[rest[0]]}'
  if kind == 'attn':
    return f'{prefix}.attentions.{j}.{_ATTN[rest[0]]}'
  return f'{prefix}.{kind}rs.0.conv'


def _kind(path: tuple, ndim: int) -> str:
  """How a leaf converts: 'conv' (HWIO<->OIHW), 'linear' ([in,out]<->[out,in]),
  'nin' (Dense [in,out] <-> 1x1 Conv2d [out,in,1,1]) or 'same'."""
  if path[-1] != 'kernel':
    return 'same'
  if ndim == 4:
    return 'conv'
  return 'nin' if path[-2] == 'nin_shortcut' else 'linear'


def to_torch_layout(x: np.ndarray, kind: str) -> np.ndarray:
  """One of our arrays in the layout of the matching diffusers tensor."""
  if kind == 'conv':
    return np.transpose(x, (3, 2, 0, 1))
  if kind == 'linear':
    return np.transpose(x)
  if kind == 'nin':
    return np.transpose(x)[:, :, None, None]
  return x


def from_torch_layout(x: np.ndarray, kind: str) -> np.ndarray:
  """A diffusers tensor in the layout of our matching array."""
  if kind == 'conv':
    return np.transpose(x, (2, 3, 1, 0))
  if kind == 'linear':
    return np.transpose(x)
  if kind == 'nin':
    return np.transpose(x[:, :, 0, 0])
  return x


def _flatten(tree: Any, prefix: tuple = ()) -> dict:
  if hasattr(tree, 'items'):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, prefix + (str(k),)))
    return out
  return {prefix: tree}


def _unflatten(flat: dict) -> dict:
  tree = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return tree


def abstract_params(config: Any) -> dict:
  """Our parameter shapes for ``config`` (``jax.eval_shape``: nothing computed)."""
  from diffusion_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create_model(config)
  size, c = int(config.data.image_size), int(config.data.num_channels)
  x = jax.ShapeDtypeStruct((1, size, size, c), np.float32)
  t = jax.ShapeDtypeStruct((1,), np.int32)
  return jax.eval_shape(lambda x, t: model.init(jax.random.PRNGKey(0), x, t),
                        x, t)['params']


def parameter_mapping(config: Any, params: Any = None) -> dict:
  """``{diffusers name: (our path, kind, diffusers shape)}`` for a config.

  ``params`` (arrays or shapes) default to :func:`abstract_params`. The
  mapping is one-to-one: every parameter of ours has exactly one diffusers
  tensor, and ``UNet2DModel(**diffusers_unet_config(config))`` has exactly
  these tensors (names and shapes).
  """
  if params is None:
    params = abstract_params(config)
  num_levels = len(config.model.ch_mult)
  mapping = {}
  for path, leaf in _flatten(params).items():
    name = f'{_module_name(path[:-1], num_levels)}.{_LEAF[path[-1]]}'
    kind = _kind(path, len(leaf.shape))
    shape = to_torch_layout(np.empty(leaf.shape, np.uint8), kind).shape
    if name in mapping:
      raise AssertionError(f'two parameters map to {name}')
    mapping[name] = (path, kind, tuple(shape))
  return mapping


def _rename_legacy(tensors: dict) -> dict:
  """Older diffusers attention names (query/key/value/proj_attn) -> current."""
  out = {}
  for name, value in tensors.items():
    m = re.fullmatch(r'(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.'
                     r'(weight|bias)', name)
    if m:
      name = f'{m.group(1)}.{_LEGACY_ATTN[m.group(2)]}.{m.group(3)}'
    out[name] = value
  return out


def params_from_diffusers(config: Any, tensors: dict) -> dict:
  """Flax parameters from a diffusers state dict (NumPy arrays) for ``config``.

  Raises:
    ValueError: a tensor is missing, unexpected, or of the wrong shape
      (one line naming the first few).
  """
  tensors = _rename_legacy(tensors)
  mapping = parameter_mapping(config)
  missing = sorted(set(mapping) - set(tensors))
  extra = sorted(set(tensors) - set(mapping))
  if missing or extra:
    raise ValueError(f'the safetensors file does not match its config.json: '
                     f'missing {missing[:3]}{"..." if len(missing) > 3 else ""}'
                     f', unexpected {extra[:3]}{"..." if len(extra) > 3 else ""}.')
  flat = {}
  for name, (path, kind, shape) in mapping.items():
    value = np.asarray(tensors[name])
    if value.shape != shape:
      raise ValueError(f'{name} has shape {value.shape}, expected {shape}.')
    flat[path] = np.ascontiguousarray(from_torch_layout(value, kind),
                                      dtype=np.float32)
  return _unflatten(flat)


def params_to_diffusers(config: Any, params: Any) -> dict:
  """The diffusers state dict (``{name: float32 array}``) of Flax parameters."""
  flat = _flatten(params)
  out = {}
  for name, (path, kind, _) in parameter_mapping(config, params).items():
    value = np.asarray(jax.device_get(flat[path]), np.float32)
    out[name] = np.ascontiguousarray(to_torch_layout(value, kind))
  return out


# --- folders ---------------------------------------------------------------------


def load_diffusers_unet(model_dir, base: Any = None):
  """``(config, params)`` of a diffusers ``UNet2DModel`` folder; torch not needed.

  Reads ``config.json`` and ``diffusion_pytorch_model.safetensors`` (with
  ``safetensors.numpy``). ``config`` is a full project config (see
  :func:`config_from_diffusers`; ``base`` gives its non-model settings,
  default the paper's), ``params`` the Flax parameters:
  ``models.create_model(config).apply({'params': params}, x_nhwc, t,
  train=False)`` is diffusers' ``model(x_nchw, t).sample`` transposed.

  Raises:
    ValueError: one line, for a config that is not the DDPM layout (naming
      the field and the value it needs) or weights that do not match it.
    FileNotFoundError: a missing file.
  """
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  model_dir = epath.Path(model_dir)
  for name in (CONFIG_NAME, WEIGHTS_NAME):
    if not (model_dir / name).exists():
      raise FileNotFoundError(f'{model_dir / name} does not exist (a diffusers '
                              f'UNet2DModel folder holds {CONFIG_NAME} and '
                              f'{WEIGHTS_NAME}).')
  dconfig = json.loads((model_dir / CONFIG_NAME).read_text())
  config = config_from_diffusers(dconfig, base)
  tensors = st_numpy.load((model_dir / WEIGHTS_NAME).read_bytes())
  return config, params_from_diffusers(config, tensors)


def save_diffusers_unet(config: Any, params: Any, out_dir) -> epath.Path:
  """Writes ``params`` as a diffusers ``UNet2DModel`` folder; returns it.

  ``UNet2DModel.from_pretrained(out_dir)`` loads it, and
  :func:`load_diffusers_unet` gives back the same parameters exactly.
  """
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  dconfig = {'_class_name': 'UNet2DModel',
             '_diffusers_version': DIFFUSERS_VERSION}
  dconfig.update({k: list(v) if isinstance(v, tuple) else v
                  for k, v in diffusers_unet_config(config).items()})
  tensors = params_to_diffusers(config, params)
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / CONFIG_NAME).write_text(json.dumps(dconfig, indent=2, sort_keys=True)
                                     + '\n')
  (out_dir / WEIGHTS_NAME).write_bytes(
      st_numpy.save(tensors, metadata={'format': 'pt'}))
  return out_dir
