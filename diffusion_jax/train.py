"""Training a DDPM: a jitted data-parallel step over a device mesh, EMA, orbax auto-resume.

Layout after the Flax examples (small functions, ``train_and_evaluate`` as the
entry point) and big_vision (a ``data`` mesh axis with the batch sharded and the
parameters replicated, preemption-safe auto-resume, a non-finite guard).

Randomness: the per-step key is ``fold_in(state.rng, step)``; t, the diffusion
noise and dropout masks are drawn inside the jitted step for the *global*
batch, so the result does not depend on how the batch is split over devices or
hosts (the host index enters only through the input pipeline's shard).
"""

import functools
import json
import time
from typing import Optional

from absl import logging
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from diffusion_jax import checkpoint as ckpt
from diffusion_jax import claim as claim_lib
from diffusion_jax import config_lib
from diffusion_jax import data as data_lib
from diffusion_jax import diffusion
from diffusion_jax import flat_state
from diffusion_jax import guidance
from diffusion_jax import host
from diffusion_jax import images as image_lib
from diffusion_jax import metric_writers
from diffusion_jax import models
from diffusion_jax import preemption
from diffusion_jax import schedule as schedule_lib
from diffusion_jax import storage
from diffusion_jax import runner
from diffusion_jax import settings
from diffusion_jax import timestep_sampler
from diffusion_jax import workdir as workdir_lib
from diffusion_jax.runner import make_mesh, to_host  # pylint: disable=unused-import (public names)
from diffusion_jax.settings import image_shape  # pylint: disable=unused-import
from diffusion_jax.train_state import (TrainState, create_optimizer, create_train_state,  # pylint: disable=unused-import
                                       learning_rate_schedule)


def model_fn_for(model, params, *, train: bool = False, dropout_rng=None, y=None):
  """Closes a Flax module over its parameters (and labels ``y``): the ``model_fn(x_t, t)`` of docs/design.md."""
  rngs = {'dropout': dropout_rng} if train else None
  return lambda x_t, t: model.apply({'params': params}, x_t, t, y=y, train=train, rngs=rngs)


def training_labels(config, batch, rng):
  """The labels a step trains on: ``batch['label']`` with class dropout, or None (unconditional).

  Dropout (``model.class_dropout``, Ho & Salimans 2022 Algorithm 1) is drawn from
  ``rng``, a key of the step, for the global batch like t and the noise.
  """
  k = config.model.num_classes
  if not k:
    return None
  if 'label' not in batch:
    raise ValueError('model.num_classes > 0 but the batch has no labels.')
  return guidance.drop_labels(rng, batch['label'], k, config.model.class_dropout)


# --- the step -------------------------------------------------------------------------


def ema_decay(config, step):
  """``optim.ema_decay``; with ``optim.ema_warmup``, min(decay, (1 + n) / (10 + n)).

  The DDPM paper uses a plain 0.9999 (no warm-up). The warm-up (as in
  tf.train.ExponentialMovingAverage with num_updates) lets short runs use their
  EMA without it being dominated by the initial weights.
  """
  decay = jnp.asarray(config.optim.ema_decay, jnp.float32)
  if config.optim.ema_warmup:
    n = jnp.asarray(step, jnp.float32)
    decay = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
  return decay


def flat_all_reduce(config, mesh: Mesh) -> bool:
  """Whether the step sums the devices' gradients as one flat buffer.

  Only on a mesh of several CPU devices, where XLA:CPU all-reduces the
  gradient one parameter at a time, each a rendezvous of all the devices (184
  for the digits U-Net); one all-reduce of the whole gradient
  (:func:`flat_all_reduce_value_and_grad`) made the digits step 8-13% faster
  (A/B in one process). Only when the model draws no random
  numbers (``model.dropout == 0``): t, the noise and the class dropout are
  drawn for the global batch outside, so the result is the global-batch
  gradient, the same as the plain step up to summation order. Dropout masks
  drawn per device would depend on the device count. On TPU and GPU, XLA's
  own all-reduces overlap the backward pass and are kept.
  """
  return (mesh.devices.size > 1 and mesh.devices.flat[0].platform == 'cpu'
          and float(config.model.dropout) == 0.0)


def flat_all_reduce_value_and_grad(loss_fn, mesh: Mesh, params, examples):
  """``value_and_grad`` of a loss summed over examples: per device, then one all-reduce.

  ``loss_fn(params, *examples) -> (loss, per-example terms)``, with the loss a
  sum over the examples it is given (divided by the global batch). Each device
  differentiates its shard of ``examples`` (batch-sharded over ``data``); the
  raveled gradients and the losses are summed with one ``psum``.
  """
  def local(params, *examples):
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *examples)
    flat, unravel = ravel_pytree(grads)
    loss, flat = jax.lax.psum((loss, flat), 'data')
    return (loss, terms), unravel(flat)

  # check_vma=False: the gradient of the replicated parameters stays this
  # device's own (with it on, JAX would insert one psum per parameter).
  return jax.shard_map(local, mesh=mesh, in_specs=(P(),) + (P('data'),) * len(examples),
                       out_specs=((P(), P('data')), P()), check_vma=False)(params, *examples)


def train_step(state: TrainState, batch, *, config, model, schedule, optimizer, lr_fn,
               mesh: Optional[Mesh] = None, unravel=None):
  """One optimiser step on a global batch; returns (new state, metrics).

  Loss: ``diffusion.training_losses`` (L_simple, eq. 14 by default) at t drawn
  uniformly (or by importance for L_vlb), averaged over the batch; a
  class-conditional model sees ``batch['label']`` with class dropout
  (:func:`training_labels`). On a multi-device CPU ``mesh`` the gradient may be
  summed as one buffer (:func:`flat_all_reduce`). A non-finite
  loss or gradient leaves the state unchanged and reports ``finite = 0``.
  With ``unravel``, ``state`` is flat (:mod:`flat_state`): the model sees
  ``unravel(params)`` and the optimiser, EMA and guard work on the vectors.
  """
  d = config.diffusion
  x0 = batch['image']
  rng = jax.random.fold_in(state.rng, state.step)
  t_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
  t, weights = timestep_sampler.sample_timesteps(t_rng, x0.shape[0], d.num_timesteps,
                                                 state.loss_history)
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  y = training_labels(config, batch, jax.random.fold_in(rng, guidance.RNG_LABELS))

  batch_size = x0.shape[0]
  weighting = d.loss_weighting   # 'none': L_simple, unweighted (eq. 14)
  weighting = None if weighting == 'none' else weighting

  def loss_fn(params, x0, t, noise, weights, y):
    params = params if unravel is None else unravel(params)
    model_fn = model_fn_for(model, params, train=True, dropout_rng=dropout_rng, y=y)
    terms = diffusion.training_losses(schedule, model_fn, x0, t, noise, mean_type=d.mean_type,
                                      var_type=d.var_type, loss_type=d.loss_type,
                                      hybrid_lambda=d.hybrid_lambda, weighting=weighting,
                                      min_snr_gamma=d.min_snr_gamma)
    # The batch mean, as a sum over (this device's) examples / the global batch.
    return jnp.sum(terms['loss'] * weights) / batch_size, terms

  examples = (x0, t, noise, weights, y)
  if mesh is not None and flat_all_reduce(config, mesh):
    (loss, terms), grads = flat_all_reduce_value_and_grad(loss_fn, mesh, state.params, examples)
  else:
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, *examples)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = optax.incremental_update(params, state.ema_params, 1.0 - ema_decay(config, state.step))
  history = state.loss_history
  if history is not None:
    history = timestep_sampler.update_history(history, t, jax.lax.stop_gradient(terms['loss']))
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                            opt_state=opt_state, loss_history=history)
  # Non-finite guard: keep the last finite state (only the step advances).
  new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state,
                           state.replace(step=state.step + 1))
  metrics = dict(loss=loss, mse=jnp.mean(terms['mse']), grad_norm=grad_norm,
                 learning_rate=jnp.asarray(lr_fn(state.step), jnp.float32),   # also a constant
                 finite=finite.astype(jnp.float32))
  if 'vb' in terms:
    metrics['vb'] = jnp.mean(terms['vb'])
  return new_state, metrics


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Stacked batches [steps_per_call, global_batch, ...]: split along the batch axis over ``data``."""
  return NamedSharding(mesh, P(None, 'data'))


def make_train_fn(config, model, schedule, optimizer, mesh: Mesh, unravel=None):
  """``jax.jit`` of ``steps_per_call`` train steps (an unrolled ``lax.scan``) over stacked batches.

  Batches arrive as [steps_per_call, global_batch, H, W, C] sharded along the
  batch axis on the mesh's ``data`` axis; the state is replicated. With
  ``unravel`` (``flat_state.Layout.unravel``) the step takes and returns the
  flat state.
  """
  step = functools.partial(train_step, config=config, model=model, schedule=schedule,
                           optimizer=optimizer, lr_fn=learning_rate_schedule(config),
                           mesh=mesh, unravel=unravel)

  def train_fn(state, batches):
    # No loop construct: XLA:CPU runs the convolutions of a step inside a while
    # loop ~18x slower (benchmarks/bench_train.py), and even a length-1 scan
    # emits one. k is small, so unrolling costs only compile time.
    if batches['image'].shape[0] == 1:
      state, metrics = step(state, jax.tree.map(lambda x: x[0], batches))
      return state, jax.tree.map(lambda x: x[None], metrics)
    return jax.lax.scan(step, state, batches, unroll=True)

  replicated = NamedSharding(mesh, P())
  return jax.jit(train_fn, in_shardings=(replicated, batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=(0,),
                 compiler_options=host.cpu_compiler_options(mesh, kind='train_step'))


def next_batches(it, num: int, sharding: NamedSharding):
  """Stacks ``num`` host-local batches and places them, batch-sharded, on the devices."""
  local = [next(it) for _ in range(num)]
  stacked = {k: np.stack([b[k] for b in local]) for k in local[0]}
  return data_lib.shard_batch(stacked, sharding)


# --- samples ------------------------------------------------------------------------------


def make_sample_fn(config, model, schedule, num_samples: int):
  """Jitted ``(params, rng) -> images`` with the configured sampler, batch-sharded when possible.

  A class-conditional model draws the labels of :func:`grid_labels` (one class
  per row of the grid).
  """
  sampler = runner.make_sampler(settings.sampler_spec(config), settings.conditioning(config),
                                schedule, model, (num_samples,) + settings.image_shape(config))
  y = grid_labels(config, num_samples)
  if y is None:
    return lambda params, rng: sampler({'params': params}, rng)
  return lambda params, rng: sampler({'params': params}, rng, y)


def grid_row_length(config, num: int) -> Optional[int]:
  """Images per row of a training-time sample grid: ``num // num_classes`` (None: square)."""
  k = config.model.num_classes
  return max(1, num // k) if k else None


def grid_labels(config, num: int):
  """Labels of a training-time sample grid, one class per row (or all ``sampling.class_label``).

  None for an unconditional model.
  """
  k = config.model.num_classes
  if not k:
    return None
  label = int(config.sampling.class_label)
  if label >= 0:
    return np.full(num, label, np.int32)
  return (np.arange(num, dtype=np.int32) // grid_row_length(config, num)) % k


def save_sample_grid(sample_fn, params, rng, path, nrow=None) -> Optional[str]:
  """Samples with ``sample_fn`` and writes the PNG grid (from process 0 only)."""
  images = to_host(sample_fn(params, rng))
  if jax.process_index() != 0:
    return None
  return image_lib.save_grid(images, path, nrow=nrow)


# --- the loop -------------------------------------------------------------------------------


def setup(config):
  """Validates the config and builds model, schedule, optimiser, mesh and initial state."""
  config_lib.validate_config(config)
  data_lib.validate_data_config(config, num_devices=jax.device_count())
  model = models.create_model(config)
  schedule = schedule_lib.schedule_from_config(config)
  optimizer = create_optimizer(config)
  mesh = make_mesh()
  rng = jax.random.PRNGKey(config.seed)
  state = jax.jit(functools.partial(create_train_state, config, model, optimizer),
                  out_shardings=NamedSharding(mesh, P()),
                  compiler_options=run_once_compiler_options(mesh))(rng)
  return model, schedule, optimizer, mesh, state


def run_once_compiler_options(mesh: Mesh) -> Optional[dict]:
  """XLA options for a program that runs once (the initial state): on CPU, no LLVM optimisation.

  XLA:CPU spends most of the digits initialiser's compile in LLVM (13 s of a
  README run's start-up, 4 s without it); the program runs once, in
  milliseconds either way, and gives the same bits (``tests/test_train.py``).
  Programs that run many times use :func:`host.cpu_compiler_options`' level 1.
  """
  return host.cpu_compiler_options(mesh, runs_once=True)


def _restore(manager, state, train_iter, num_train_steps: int, say):
  """The newest readable checkpoint (falling back past damaged ones) and the iterator position."""

  def check_data(data_state):
    if data_state:
      train_iter.set_state(data_state)

  restored = ckpt.restore_latest(manager, state, check_data=check_data, say=say)
  if restored is None:
    return state
  step, state, _ = restored
  logging.info('Resuming from %s at step %d.', manager.directory, step)
  say(f'Resuming from checkpoint {manager.directory}/{step} (step {step} of {num_train_steps}).')
  return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, *,
                       claimed: bool = False) -> TrainState:
  """Trains (resuming from ``workdir`` when it holds a checkpoint); returns the final state.

  ``workdir`` is any path ``etils.epath`` accepts (local or ``gs://...``).
  Writes ``workdir/config.json``, ``workdir/checkpoints/`` (orbax),
  ``workdir/tensorboard/`` (event files) and ``workdir/samples/*.png``.
  A full disk raises :class:`storage.StorageFullError` (one line; the
  half-written file or checkpoint removed, the earlier checkpoints intact).
  Holds the workdir's claim while it runs (:func:`claim.hold`;
  ``claim.ClaimHeldError`` if another run holds it) unless ``claimed``: the
  caller holds it.
  """
  if claimed:
    return _train_and_evaluate(config, workdir)
  with claim_lib.hold(workdir, config.training.claim_timeout_s):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> TrainState:
  tr = config.training
  model, schedule, optimizer, mesh, state = setup(config)
  is_main = jax.process_index() == 0
  say = (lambda msg: print(msg, flush=True)) if is_main else (lambda msg: None)
  workdir = workdir_lib.as_path(workdir)
  if is_main:
    workdir_lib.prepare(workdir, config.to_json_best_effort(indent=2, sort_keys=True))

  train_iter = data_lib.create_train_iterator(config)
  manager = ckpt.create_manager(workdir, max_to_keep=tr.keep_checkpoints)
  state = _restore(manager, state, train_iter, tr.num_train_steps, say)
  start = int(state.step)
  storage.silence_async_noise()   # a full disk is reported once, by the main thread
  low_space = storage.low_space_warning(workdir, ckpt.state_bytes(state))
  if low_space:
    say(low_space)

  layout = None
  if flat_state.enabled(config, mesh):   # the loop's state flat; trees only for what leaves it
    state, layout = flat_state.flatten(state, mesh)
  tree_state = lambda: state if layout is None else layout.unflatten(state)
  train_fn = make_train_fn(config, model, schedule, optimizer, mesh,
                           unravel=layout and layout.unravel)
  batches_sharding = batch_sharding(mesh)
  sample_fn = make_sample_fn(config, model, schedule, tr.num_sample_images)
  sample_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x5A17)
  writer = metric_writers.MetricWriter(workdir / 'tensorboard')
  samples_dir = workdir / 'samples'
  k = tr.steps_per_call
  param_count = sum(x.size for x in jax.tree.leaves(state.params))   # flat or not
  logging.info('Model: %s parameters; %d devices on %d hosts; global batch %d.',
               f'{param_count:,}', jax.device_count(), jax.process_count(), tr.batch_size)

  saver = ckpt.Saver(manager)

  def save(step):
    saver.save(step, tree_state(), train_iter.get_state())

  pending, history = [], []   # metrics on device / fetched but not yet logged
  t_last, step_last = time.time(), start
  bar = tqdm(total=tr.num_train_steps, initial=start, disable=not is_main, unit='step',
             dynamic_ncols=True)
  step, calls = start, 0
  try:
    with preemption.Preemption(manager, multi_host=jax.process_count() > 1) as preempt:
      while step < tr.num_train_steps:
        n = min(k, tr.num_train_steps - step)
        batches = next_batches(train_iter, n, batches_sharding)
        if n != k:  # a shorter tail compiles one more variant; only at the very end
          logging.info('Final call with %d steps.', n)
        state, metrics = train_fn(state, batches)
        step += n
        pending.append(metrics)
        bar.update(n)
        boundary = lambda every: step % every == 0 or step == tr.num_train_steps
        stop = preempt.should_stop(calls)
        calls += 1
        if boundary(tr.log_every_steps) or boundary(tr.checkpoint_every_steps) or stop:
          flushed = metric_writers.fetch(pending)
          pending = []
          metric_writers.check_finite(flushed, step)
          history.extend(flushed)   # every step since the last log line
          if boundary(tr.log_every_steps) or stop:
            summary = metric_writers.summarise(history)
            history = []
            now = time.time()
            summary['images_per_sec'] = (step - step_last) * tr.batch_size / max(now - t_last, 1e-9)
            t_last, step_last = now, step
            writer.write(step, summary)
            bar.set_postfix(loss=f"{summary['loss']:.4f}",
                            img_s=f"{summary['images_per_sec']:.0f}")
            logging.info('step %d: %s', step, json.dumps({k_: round(v, 6) for k_, v in summary.items()}))
        if boundary(tr.checkpoint_every_steps) or stop:
          save(step)
        if boundary(tr.sample_every_steps) and not stop:
          path = samples_dir / f'samples_{step:08d}.png'
          ema = state.ema_params if layout is None else layout.params_tree(state.ema_params)
          save_sample_grid(sample_fn, ema, sample_rng, path,
                           nrow=grid_row_length(config, tr.num_sample_images))
          if is_main:
            tqdm.write(f'step {step}: wrote {path}')
        if stop:
          break
  finally:   # also on an error: the asynchronous save in flight is completed, never lost
    bar.close()
    writer.close()
    saver.close()   # a full disk: StorageFullError, the partial save removed
  say(f'Outputs in {workdir}:\n  checkpoints: {ckpt.checkpoint_dir(workdir)}\n'
      f'  samples:     {samples_dir}\n  tensorboard: {workdir / "tensorboard"}\n'
      f'  config:      {workdir / workdir_lib.CONFIG_FILE}')
  return tree_state()
