"""The train state with each parameter-shaped tree stored as one flat vector.

The optimiser's update (gradient clipping, Adam, ``optax.apply_updates``), the
EMA (``optax.incremental_update``) and the non-finite guard are elementwise,
so they compute the same numbers on one raveled vector as on a tree of arrays,
except for the summation order of the gradient's global norm (float32
rounding). On a tree, XLA:CPU runs them as thousands of small operations: for
the digits U-Net's 182 arrays about 1,600 fusions and 550 copies per device and
step, each of which costs the runtime a few microseconds whatever its size. On
flat vectors they are a handful of operations.

The training loop keeps its state flat (:func:`flatten`) between steps and
converts it back (:class:`Layout`) only for what leaves the loop:
checkpoints, sample grids and the returned state. Inside the step the model
sees the parameter tree (``unravel``, slices of the vector), and the gradient
comes back as one vector. Checkpoints hold the same trees as before.
"""

from typing import Callable

import jax
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding, PartitionSpec as P

FLAT_STATES = ('auto', 'on', 'off')   # training.flat_state


def enabled(config, mesh) -> bool:
  """Whether the training loop keeps its state flat: ``training.flat_state``; 'auto' on the CPU.

  'auto' flattens where it was measured faster (the CPU: the digits step
  about 1.1x on 2 AVX-512 cores, ``docs/performance.md``). GPU and TPU keep
  the tree unless ``'on'``.
  """
  mode = config.training.flat_state
  if mode == 'auto':
    return mesh.devices.flat[0].platform == 'cpu'
  return mode == 'on'


def _params_like(params):
  """A predicate: whether a subtree has the structure of ``params`` (the Adam moments do)."""
  treedef = jax.tree.structure(params)
  return lambda x: jax.tree.structure(x) == treedef


class Layout:
  """How a flat state maps back to trees (made by :func:`flatten`; its programs compile once).

  ``unravel(vector)`` is the parameter tree of a flat vector (for the model,
  inside the step), ``params_tree(vector)`` the same as a replicated array
  tree (e.g. the EMA, for a sample grid) and ``unflatten(flat_state)`` the
  tree-shaped state (new arrays; the flat state is kept).
  """

  def __init__(self, unravel: Callable, mesh):
    self.unravel = unravel
    replicated = NamedSharding(mesh, P())
    self.params_tree = jax.jit(unravel, out_shardings=replicated)
    self.unflatten = jax.jit(self._tree, out_shardings=replicated)

  def _tree(self, s):
    size = s.params.shape
    back = lambda t: jax.tree.map(lambda x: self.unravel(x) if x.shape == size else x, t)
    return s.replace(params=self.unravel(s.params), ema_params=self.unravel(s.ema_params),
                     opt_state=back(s.opt_state))


def flatten(state, mesh):
  """``(flat state, Layout)``: params, EMA and every params-shaped tree of ``opt_state`` raveled.

  The flat arrays are replicated over ``mesh``, as the train step takes its
  state.
  """
  like = _params_like(state.params)
  _, unravel = ravel_pytree(state.params)

  def ravel(tree):
    return jax.tree.map(lambda t: ravel_pytree(t)[0] if like(t) else t, tree, is_leaf=like)

  def flat(s):
    return s.replace(params=ravel(s.params), ema_params=ravel(s.ema_params),
                     opt_state=ravel(s.opt_state))

  replicated = NamedSharding(mesh, P())
  return jax.jit(flat, out_shardings=replicated)(state), Layout(unravel, mesh)
