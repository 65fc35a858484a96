"""The FID Inception network's weights: random ones for tests, pytorch-fid's converted, saved and loaded.

Nothing is downloaded: :func:`load_inception_params` reads a local file named by the config key ``eval.inception_path``:

- a ``.msgpack`` file written by :func:`save_inception_params`
  (``flax.serialization`` of the variables ``{'params', 'batch_stats'}``);
- an ``.npz`` written by :func:`save_inception_params` (flattened keys such
  as ``params/Mixed_5b/branch1x1/conv/kernel``);
- an ``.npz`` holding the raw pytorch-fid state dict (keys such as
  ``Mixed_5b.branch1x1.conv.weight``), converted on the fly by
  :func:`convert_pytorch_fid_state_dict`.

To make the last from pytorch-fid's released weights, on any machine with
PyTorch (torch is not needed here)::

  # https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/
  #   pt_inception-2015-12-05-6726825d.pth
  import numpy as np, torch
  sd = torch.load('pt_inception-2015-12-05-6726825d.pth', map_location='cpu')
  np.savez('pt_inception-2015-12-05.npz',
           **{k: v.numpy() for k, v in sd.items()})

then optionally, here, ``save_inception_params(load_inception_params(
'pt_inception-2015-12-05.npz'), 'inception_fid.msgpack')``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax
from flax import serialization, traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.evaluation import inception

FID_WEIGHTS_NAME = 'pt_inception-2015-12-05-6726825d.pth'
FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/'
                   'fid_weights/' + FID_WEIGHTS_NAME)


def init_inception_variables(seed: int = 0) -> dict:
  """Random variables ``{'params', 'batch_stats'}`` for tests and smoke runs.

  Drawn with NumPy on the module's variable tree (He-normal conv kernels,
  LeCun-normal fc, BatchNorm scale 1 / bias 0 / mean 0 / var 1): equivalent in
  distribution to ``InceptionV3FID().init`` but instant, where jitting
  ``init`` for ~95 layers takes tens of seconds on a CPU.
  """
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(inception_variables_template())
  out = {}
  for path, leaf in flat.items():
    shape, name = tuple(leaf.shape), path[-1]
    if name == 'kernel':
      std = np.sqrt((2.0 if len(shape) == 4 else 1.0) / np.prod(shape[:-1]))
      value = (std * rng.standard_normal(shape)).astype(np.float32)
    elif name in ('scale', 'var'):
      value = np.ones(shape, np.float32)
    else:  # bias, mean
      value = np.zeros(shape, np.float32)
    out[path] = value
  return traverse_util.unflatten_dict(out)


def inception_variables_template() -> dict:
  """The variables' tree of ``jax.ShapeDtypeStruct`` (no computation)."""
  model = inception.InceptionV3FID(resize_input=False)
  x = jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32)
  return flax.core.unfreeze(
      jax.eval_shape(model.init, jax.random.PRNGKey(0), x))


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree (use on ``variables['params']``)."""
  return int(sum(np.prod(np.shape(l)) for l in jax.tree_util.tree_leaves(tree)))


_BN_TORCH_TO_FLAX = {
    'weight': ('params', 'scale'),
    'bias': ('params', 'bias'),
    'running_mean': ('batch_stats', 'mean'),
    'running_var': ('batch_stats', 'var'),
}


def convert_pytorch_fid_state_dict(state_dict: Mapping[str, Any]) -> dict:
  """pytorch-fid's ``FIDInceptionV3`` state dict -> Flax variables.

  Maps torch names one to one (the Flax submodules carry the torch names):

  - ``<path>.conv.weight`` ``[O, I, kh, kw]`` ->
    ``params/<path>/conv/kernel`` ``[kh, kw, I, O]``;
  - ``<path>.bn.weight|bias`` -> ``params/<path>/bn/scale|bias``;
  - ``<path>.bn.running_mean|running_var`` -> ``batch_stats/<path>/bn/mean|var``;
  - ``fc.weight`` ``[1008, 2048]`` -> ``params/fc/kernel`` ``[2048, 1008]``,
    ``fc.bias`` -> ``params/fc/bias``;
  - ``*.num_batches_tracked`` is dropped; an auxiliary classifier
    (``AuxLogits.*``, absent from the FID weights) is rejected.

  Args:
    state_dict: name -> array (NumPy, or anything ``np.asarray`` accepts,
      e.g. ``{k: v.numpy() for k, v in torch_state_dict.items()}``).

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` nested dicts of float32 NumPy
    arrays, checked against the module's expected structure and shapes.

  Raises:
    ValueError: on unknown, missing or mis-shaped entries.
  """
  out: dict = {'params': {}, 'batch_stats': {}}

  def put(collection, path, value):
    node = out[collection]
    for p in path[:-1]:
      node = node.setdefault(p, {})
    if path[-1] in node:
      raise ValueError(f'duplicate entry for {collection}/{"/".join(path)}')
    node[path[-1]] = value

  for name, value in state_dict.items():
    parts = name.split('.')
    value = np.asarray(value)
    if parts[-1] == 'num_batches_tracked':
      continue
    if parts[0] == 'AuxLogits':
      raise ValueError(f'unexpected auxiliary-classifier entry {name!r}: the FID '
                       'Inception has no AuxLogits (aux_logits=False)')
    if parts == ['fc', 'weight']:
      put('params', ('fc', 'kernel'), value.T.astype(np.float32))
    elif parts == ['fc', 'bias']:
      put('params', ('fc', 'bias'), value.astype(np.float32))
    elif len(parts) >= 3 and parts[-2] == 'conv' and parts[-1] == 'weight':
      if value.ndim != 4:
        raise ValueError(f'{name}: expected a 4-d conv weight, got {value.shape}')
      put('params', tuple(parts[:-1]) + ('kernel',),
          np.transpose(value, (2, 3, 1, 0)).astype(np.float32))
    elif len(parts) >= 3 and parts[-2] == 'bn' and parts[-1] in _BN_TORCH_TO_FLAX:
      collection, leaf = _BN_TORCH_TO_FLAX[parts[-1]]
      put(collection, tuple(parts[:-1]) + (leaf,), value.astype(np.float32))
    else:
      raise ValueError(f'unrecognised pytorch-fid state-dict entry {name!r}')
  _check_against_template(out)
  return out


def _check_against_template(variables: Mapping[str, Any]) -> None:
  """Raise ValueError unless ``variables`` has the module's exact structure."""
  template = inception_variables_template()
  flat_t = traverse_util.flatten_dict(template, sep='/')
  flat_v = traverse_util.flatten_dict(dict(variables), sep='/')
  missing = sorted(set(flat_t) - set(flat_v))
  extra = sorted(set(flat_v) - set(flat_t))
  if missing or extra:
    raise ValueError(
        f'Inception weights do not match InceptionV3FID: {len(missing)} missing '
        f'(e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]})')
  bad = [(k, np.shape(flat_v[k]), flat_t[k].shape) for k in flat_t
         if tuple(np.shape(flat_v[k])) != tuple(flat_t[k].shape)]
  if bad:
    raise ValueError(f'Inception weights with wrong shapes (name, got, want): '
                     f'{bad[:5]}')


def _missing_weights_message(path: str | None) -> str:
  where = ('eval.inception_path is not set' if path is None
           else f'eval.inception_path={path!r} does not exist')
  return (
      f'No FID Inception weights: {where}. Set --config.eval.inception_path to '
      'a local file (nothing is downloaded). Get pytorch-fid\'s '
      f'{FID_WEIGHTS_NAME} ({FID_WEIGHTS_URL}) and, on a machine with PyTorch, '
      "convert it: sd = torch.load(path, map_location='cpu'); "
      "np.savez('pt_inception-2015-12-05.npz', **{k: v.numpy() for k, v in "
      "sd.items()}); then point eval.inception_path at the .npz (or at a "
      '.msgpack written by diffusion_jax.evaluation.inception_weights.save_inception_params).')


def load_inception_params(path: str | os.PathLike | None) -> dict:
  """Loads the FID Inception variables ``{'params', 'batch_stats'}`` from a local file.

  Accepts ``.msgpack`` (flax.serialization, as written by
  :func:`save_inception_params`), ``.npz`` with flattened Flax keys (as
  written by :func:`save_inception_params`) or ``.npz`` of a pytorch-fid state
  dict (converted with :func:`convert_pytorch_fid_state_dict`). See the module
  docstring for how to make the file from ``pt_inception-2015-12-05-6726825d.pth``.

  Raises:
    FileNotFoundError: ``path`` is None or missing (the message names
      ``eval.inception_path`` and how to get the weights).
    ValueError: the file does not hold weights of this network.
  """
  if path is None or not os.path.exists(os.fspath(path)):
    raise FileNotFoundError(_missing_weights_message(
        None if path is None else os.fspath(path)))
  path = os.fspath(path)
  if path.endswith('.pth') or path.endswith('.pt'):
    raise ValueError(
        f'{path}: PyTorch checkpoints cannot be read without torch; convert it '
        'to .npz first. ' + _missing_weights_message(path).split('. ', 1)[1])
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
    if any(k.startswith(('params/', 'batch_stats/')) for k in arrays):
      variables = traverse_util.unflatten_dict(
          {tuple(k.split('/')): v.astype(np.float32) for k, v in arrays.items()})
    else:
      return convert_pytorch_fid_state_dict(arrays)
  else:
    with open(path, 'rb') as f:
      variables = serialization.msgpack_restore(f.read())
    variables = jax.tree_util.tree_map(
        lambda v: np.asarray(v, np.float32), dict(variables))
  _check_against_template(variables)
  return variables


def save_inception_params(variables: Mapping[str, Any],
                          path: str | os.PathLike) -> None:
  """Writes ``variables`` as ``.msgpack`` (flax.serialization) or ``.npz``."""
  path = os.fspath(path)
  variables = jax.tree_util.tree_map(np.asarray, flax.core.unfreeze(variables))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  if path.endswith('.npz'):
    flat = traverse_util.flatten_dict(variables, sep='/')
    with open(tmp, 'wb') as f:
      np.savez(f, **flat)
  else:
    with open(tmp, 'wb') as f:
      f.write(serialization.msgpack_serialize(variables))
  os.replace(tmp, path)
