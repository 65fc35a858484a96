"""A saved config completed with today's defaults, and overrides set on it with type checks.

The workdir's ``config.json`` (written by training) is the model's config:
:func:`complete` turns it (a dict as read from JSON) back into a ConfigDict,
:func:`apply_overrides` sets the command line's or the Python API's dotted keys
on it and refuses, for a trained model, a change of :data:`FROZEN_KEYS`. Both
are re-exported by :mod:`diffusion_jax.config_lib`.
"""

import copy
import functools
import numbers
from typing import Any, Mapping

import ml_collections

# Keys a trained model's overrides may not change (when the value differs): the
# network's parameter shapes or function, and the schedule or the meaning of its output.
FROZEN_KEYS = (
    'model.name', 'model.ch', 'model.ch_mult', 'model.num_res_blocks', 'model.attn_resolutions',
    'model.resamp_with_conv', 'model.num_groups', 'model.num_classes',
    'diffusion.schedule', 'diffusion.num_timesteps', 'diffusion.beta_start', 'diffusion.beta_end',
    'diffusion.mean_type', 'diffusion.var_type')
# diffusion.var_type may switch between these on a trained model: neither is learned,
# so the network and its output are the same (the sampler's variance differs).
FIXED_VARIANCES = ('fixed_small', 'fixed_large')


def _coerced(dotted: str, value, current):
  """``value`` as the type of the field holding ``current`` (a value or a FieldReference).

  As ``ml_collections`` does: ints for float fields, lists for tuple fields
  (a JSON file's arrays); ``None`` only for FieldReference fields (the
  optional paths). Stricter than it where that hides mistakes: no bool for an
  int field. Raises ValueError naming the key and the expected type.
  """
  if isinstance(current, ml_collections.FieldReference):
    expected, optional = current.get_type(), True
  elif current is None:
    return value
  else:
    expected, optional = type(current), False
  if value is None and optional:
    return None
  if isinstance(value, bool) or expected is bool:
    ok = isinstance(value, bool) and expected is bool
  elif expected in (int, float):
    ok = isinstance(value, numbers.Integral if expected is int else numbers.Real)
    value = expected(value) if ok else value
  elif expected is tuple and isinstance(value, (list, tuple)):
    value = tuple(value)
    kind = type(current[0]) if current else None
    ok = kind is None or all(type(v) is kind for v in value)  # pylint: disable=unidiomatic-typecheck
  else:
    ok = isinstance(value, expected)
  if not ok:
    name = expected.__name__
    raise ValueError(f'config key {dotted!r} takes {"an" if name[0] in "aeiou" else "a"} {name}'
                     f'{" or None" if optional else ""}, got {value!r}.')
  return value


def _fields(node: ml_collections.ConfigDict) -> dict:
  """``node``'s fields, FieldReferences kept (their declared type is the field's type)."""
  return dict(node.items(preserve_field_references=True))


def _merge(root, node, values, prefix: str) -> None:
  """Sets ``values`` (a nested mapping) into ``node``, the section ``prefix`` of ``root``."""
  from diffusion_jax import config_lib  # pylint: disable=g-import-not-at-top  (it imports us)
  if not isinstance(values, (Mapping, ml_collections.ConfigDict)):
    where = f'section {prefix[:-1]!r}' if prefix else 'config'
    raise ValueError(f'the {where} must be a mapping of keys to values, got '
                     f'{type(values).__name__}.')
  fields = _fields(node)
  for key, value in values.items():
    dotted = f'{prefix}{key}'
    if key not in fields:
      raise ValueError(config_lib.unknown_key_message(root, dotted))
    if isinstance(fields[key], ml_collections.ConfigDict):
      _merge(root, fields[key], value, dotted + '.')
    else:
      node[key] = _coerced(dotted, value, fields[key])


def complete(config) -> ml_collections.ConfigDict:
  """``config`` (a ConfigDict, or a dict as read from ``config.json``) over ``base_config()``.

  Keys ``config`` lacks (a file from before they existed) take
  ``config_lib.base_config()``'s defaults; JSON arrays become tuples where the
  base has tuples; ``None`` is kept for the optional paths (``data.data_dir``,
  ``eval.inception_path``, ``eval.fid_stats_path``). Raises ValueError naming
  the key for an unknown key, a section that is not a mapping, or a value of
  the wrong type.

  Returns:
    A new, locked ConfigDict (values can be set, keys cannot be added), as the
    command line's ``--config`` is.
  """
  from diffusion_jax import config_lib  # pylint: disable=g-import-not-at-top  (it imports us)
  result = config_lib.base_config()
  _merge(result, result, config, '')
  result.lock()
  return result


def apply_overrides(config, overrides: Mapping[str, Any], *,
                    trained: bool) -> ml_collections.ConfigDict:
  """A copy of ``config`` with ``overrides`` (``{'sampling.num_steps': 10, ...}``) set.

  Values are coerced as by :func:`complete`. Raises ValueError naming the key
  for an unknown key (``config_lib.unknown_key_message``), a section, or a
  value of the wrong type; with ``trained`` (``config`` is a trained model's),
  also for a :data:`FROZEN_KEYS` key whose value differs from ``config``'s:
  the checkpoint's network or schedule would not match it. A ConfigDict
  ``config`` is copied with its lock state; a plain mapping goes through
  :func:`complete` (locked).
  """
  from diffusion_jax import config_lib  # pylint: disable=g-import-not-at-top  (it imports us)
  result = (copy.deepcopy(config) if isinstance(config, ml_collections.ConfigDict)
            else complete(config))
  for dotted, value in overrides.items():
    message = config_lib.unknown_key_message(result, dotted)
    if message:
      raise ValueError(message)
    *sections, field = dotted.split('.')
    node = functools.reduce(lambda n, k: n[k], sections, result)
    current = _fields(node)[field]
    if isinstance(current, ml_collections.ConfigDict):
      raise ValueError(f'config key {dotted!r} is a section; override its keys '
                       f'({", ".join(f"{dotted}.{k}" for k in sorted(current.keys()))}).')
    value, old = _coerced(dotted, value, current), node[field]
    if trained and dotted in FROZEN_KEYS and value != old and not (
        {value, old} <= set(FIXED_VARIANCES)):   # the two fixed variances: same network
      what = 'network' if dotted.startswith('model.') else 'schedule and output'
      raise ValueError(f'{dotted}={value!r} would not match the trained {what} '
                       f'({dotted}={old!r}); train a new model in a new workdir instead.')
    node[field] = value
  return result
