"""The training state and the optimiser (DDPM App. B: Adam, warm-up, gradient clipping, EMA).

Separate from the training loop (:mod:`diffusion_jax.train`) so that restoring a
checkpoint for sampling or evaluation needs only the state's shape
(``jax.eval_shape`` of :func:`create_train_state`), never the loop.
"""

import functools
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import optax

from diffusion_jax import checkpoint as ckpt
from diffusion_jax import settings
from diffusion_jax import timestep_sampler


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs. The schedule is not in it (it is a constant)."""
  step: jnp.ndarray          # int32 scalar: number of optimiser steps taken
  params: Any
  ema_params: Any            # Polyak average of params (DDPM: decay 0.9999)
  opt_state: Any
  rng: jnp.ndarray           # raw uint32 PRNG key; per-step keys are fold_in(rng, step)
  loss_history: Optional[timestep_sampler.LossHistory] = None  # importance sampling of t


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warm-up from 0 to ``optim.lr`` over ``optim.warmup_steps`` (DDPM App. B), then the decay.

  ``optim.lr_decay``: ``none`` keeps ``optim.lr`` (the paper); ``cosine`` decays it
  to 0 at ``training.num_train_steps`` (Loshchilov & Hutter 2017). On digits the
  cosine decay did not make short runs as good as the constant rate's longer
  ones (``benchmarks/RESULTS.md``, "The README job").
  """
  o = config.optim
  decay = o.lr_decay
  if decay == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        0.0, o.lr, o.warmup_steps, max(config.training.num_train_steps, o.warmup_steps + 1))
  if o.warmup_steps == 0:
    return optax.constant_schedule(o.lr)
  return optax.linear_schedule(0.0, o.lr, o.warmup_steps)


def create_optimizer(config) -> optax.GradientTransformation:
  """Adam (DDPM: lr 2e-4, or 2e-5 at 256²) with global-norm gradient clipping at ``optim.grad_clip``."""
  o = config.optim
  lr = learning_rate_schedule(config)
  if o.optimizer == 'adam':
    opt = optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
  else:
    opt = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
  return optax.chain(optax.clip_by_global_norm(o.grad_clip), opt) if o.grad_clip > 0 else opt


def create_train_state(config, model, optimizer, rng) -> TrainState:
  """Initial parameters (the EMA starts equal to them), optimiser state and RNG."""
  init_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
  x = jnp.zeros((1,) + settings.image_shape(config), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  params = model.init({'params': init_rng, 'dropout': dropout_rng}, x, t, train=False)['params']
  history = None
  if config.diffusion.t_sampler == 'importance':
    history = timestep_sampler.init_history(config.diffusion.num_timesteps)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=optimizer.init(params), rng=state_rng, loss_history=history)


def restore_params(config, model, workdir, mesh: Mesh, *, step: Optional[int] = None,
                   use_ema: bool = True) -> tuple[int, Any]:
  """(step, params) of ``workdir``'s newest finished checkpoint (or ``step``), replicated on ``mesh``.

  Restored onto the abstract shape of the training state (``jax.eval_shape`` of
  :func:`create_train_state` for ``config`` and ``model``), so nothing is
  initialised or compiled for it; the EMA parameters, or the raw ones.
  """
  abstract = jax.eval_shape(
      functools.partial(create_train_state, config, model, create_optimizer(config)),
      jax.random.PRNGKey(config.seed))
  replicated = NamedSharding(mesh, P())
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        abstract)
  step, state = ckpt.restore_params(workdir, target, step=step)
  return int(step), state.ema_params if use_ema else state.params
