"""``--mode distill``: progressive distillation of a trained workdir (Salimans & Ho 2022).

The teacher is the workdir's EMA parameters. Each round trains a student,
initialised from the previous round's (the first from the teacher), to take
one deterministic DDIM step where its target takes two
(:mod:`diffusion_jax.distillation`): start_steps = 32, final_steps = 1 gives
students of 16, 8, 4, 2 and 1 steps (``distill.teacher_steps = 4`` with
start_steps = 64: 16, 4 and 1, one step for four). By default
(``distill.inputs='teacher_paths'``, ``distill.teacher='original'``) the
targets are the original model's own ``start_steps``-step sampler paths
(DPM-Solver++ 3M on the trailing grid), made once before the first round and
stored (:mod:`diffusion_jax.teacher_paths`), so no round inherits an earlier
student's error. With ``distill.inputs='data'`` the rounds noise training
images and run the teacher's DDIM steps (eta = 0, trailing grid) inside each
optimiser step: the previous round's student (``teacher='previous'``, the
paper's chain) or the original model along its whole ``start_steps``-step
path (``teacher='original'``). Round N writes ``DIR/distilled/steps_<N>/``, a
complete workdir: its ``config.json`` (diffusion.mean_type of the student,
``sampling.sampler='ddim'``, ``num_steps=N``, ``skip_type='trailing'``, eta
``distill.student_eta``, guidance 0) and ``checkpoints/`` (the training format),
so ``--mode sample`` and ``--mode eval`` work on it.

Each round is a training run of :mod:`diffusion_jax.train`'s machinery: its mesh,
batch sharding, optimiser, EMA and non-finite guard; orbax checkpoints every
``training.checkpoint_every_steps`` and on SIGTERM / Ctrl-C; a rerun resumes the
round where its last checkpoint left it and skips the finished rounds.

A class-conditional teacher is distilled with its labels at the fixed guidance
``sampling.guidance_scale`` (Meng et al. 2023): the teacher's guided output is
what the DDIM steps use, the student sees the labels and samples with
guidance 0.
"""

import functools
import json
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import optax
from tqdm import tqdm

from diffusion_jax import checkpoint as ckpt
from diffusion_jax import claim as claim_lib
from diffusion_jax import config_lib
from diffusion_jax import data as data_lib
from diffusion_jax import distillation as dl
from diffusion_jax import host
from diffusion_jax import metric_writers
from diffusion_jax import models
from diffusion_jax import preemption
from diffusion_jax import runner
from diffusion_jax import schedule as schedule_lib
from diffusion_jax import settings
from diffusion_jax import teacher_paths
from diffusion_jax import train
from diffusion_jax import train_state
from diffusion_jax import workdir as workdir_lib

DISTILLED_DIR = teacher_paths.DISTILLED_DIR
RNG_ROUND = 0xD157   # folded with the student's step count into PRNGKey(seed): a round's stream


def round_dir(workdir, steps: int):
  """``DIR/distilled/steps_<N>``: the workdir of the N-step student."""
  return workdir_lib.as_path(workdir) / DISTILLED_DIR / f'steps_{int(steps)}'


def student_config(config, steps: int):
  """The N-step student's config: what its workdir's ``config.json`` holds.

  The teacher's model and data; ``diffusion.mean_type = distill.student_mean_type``;
  DDIM with ``distill.student_eta`` (default 0.3; the students are trained for
  eta 0) on the trailing grid in N steps, guidance 0; the round's
  optimiser (``distill.lr``, ``lr_decay``, ``warmup_steps``, ``ema_decay``) and
  ``training.num_train_steps = distill.steps_per_round``.
  """
  c = config.copy_and_resolve_references()
  ds = c.distill
  c.diffusion.mean_type = ds.student_mean_type
  c.diffusion.t_sampler = 'uniform'
  c.diffusion.loss_type = 'simple'
  c.sampling.sampler, c.sampling.num_steps = 'ddim', int(steps)
  c.sampling.skip_type, c.sampling.eta = 'trailing', float(ds.student_eta)
  c.sampling.guidance_scale = 0.0
  c.optim.lr, c.optim.lr_decay, c.optim.warmup_steps = ds.lr, ds.lr_decay, ds.warmup_steps
  c.optim.ema_decay, c.optim.ema_warmup = ds.ema_decay, True
  c.training.num_train_steps = int(ds.steps_per_round)
  c.training.steps_per_call = 1
  for key in ('log_every_steps', 'checkpoint_every_steps', 'sample_every_steps'):
    c.training[key] = min(int(c.training[key]), int(ds.steps_per_round))
  return c


def teacher_model_fn(config, model, params, y):
  """The teacher's ``model_fn(x, t)``: guided at ``sampling.guidance_scale`` if conditional."""
  return settings.conditioning(config).model_fn(runner.apply_fn_for(model), params, y)


def round_loss(params, teacher_params, batch, rng, *, teacher_config, config, model, schedule,
               grid, dropout_rng=None):
  """(mean loss, terms) of one round on a batch: :func:`distillation.student_loss` at random steps.

  The student steps i (uniform over the grid's N) and the noise are drawn from
  ``rng`` for the whole batch; ``config`` is the student's, ``teacher_config`` the
  teacher's (its mean type and guidance).
  """
  x = batch['image']
  i_rng, noise_rng = jax.random.split(rng)
  i = jax.random.randint(i_rng, (x.shape[0],), 0, grid.t.shape[0])
  noise = jax.random.normal(noise_rng, x.shape, x.dtype)
  y = batch['label'] if config.model.num_classes else None
  student_fn = train.model_fn_for(model, params, train=dropout_rng is not None,
                                  dropout_rng=dropout_rng, y=y)
  terms = dl.student_loss(schedule, student_fn, teacher_model_fn(teacher_config, model,
                                                                 teacher_params, y),
                          x, noise, i, grid, teacher_mean_type=teacher_config.diffusion.mean_type,
                          student_mean_type=config.diffusion.mean_type,
                          clip_denoised=bool(teacher_config.diffusion.clip_denoised),
                          weighting=config.distill.loss_weighting)
  return jnp.mean(terms['loss']), terms


def path_round_loss(params, teacher_params, batch, rng, *, teacher_config, config, model,
                    schedule, grid, mesh, dropout_rng=None):
  """(mean loss, terms) of one round on stored paths (``distill.inputs='teacher_paths'``).

  ``teacher_params`` are the stored :class:`teacher_paths.Paths`. Draws a path and
  a student step i per example (:func:`teacher_paths.draw`; ``batch`` gives only
  the batch size) and regresses the student's step from the path's z_i onto its
  z_{i+1} (:func:`distillation.step_loss`). ``teacher_config`` is unused: the
  paths are the original model's.
  """
  del teacher_config
  paths = teacher_params
  steps = int(grid.t.shape[0])
  i, b = teacher_paths.draw(paths, rng, batch['image'].shape[0], steps)
  shard = lambda a: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P('data')))
  i, b = shard(i), shard(b)
  z, z_end = teacher_paths.step_pairs(paths, i, b, steps)
  y = paths.labels[b] if config.model.num_classes else None
  student_fn = train.model_fn_for(model, params, train=dropout_rng is not None,
                                  dropout_rng=dropout_rng, y=y)
  terms = dl.step_loss(schedule, student_fn, shard(z), shard(z_end), i, grid,
                       student_mean_type=config.diffusion.mean_type,
                       weighting=config.distill.loss_weighting)
  return jnp.mean(terms['loss']), terms


def distill_step(state: train.TrainState, teacher_params, batch, *, teacher_config, config,
                 model, schedule, grid, optimizer, lr_fn, loss=round_loss):
  """One optimiser step of the student; the update, EMA and non-finite guard of ``train.train_step``.

  ``loss``: :func:`round_loss` (``teacher_params`` are a teacher's parameters) or
  :func:`path_round_loss` with ``mesh`` bound (``teacher_params`` are the stored
  :class:`teacher_paths.Paths`).
  """
  rng = jax.random.fold_in(state.rng, state.step)
  loss_rng, dropout_rng = jax.random.split(rng)
  loss_fn = functools.partial(loss, teacher_params=teacher_params, batch=batch,
                              rng=loss_rng, teacher_config=teacher_config, config=config,
                              model=model, schedule=schedule, grid=grid, dropout_rng=dropout_rng)
  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = optax.incremental_update(params, state.ema_params,
                                 1.0 - train.ema_decay(config, state.step))
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                            opt_state=opt_state)
  new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state,
                           state.replace(step=state.step + 1))
  metrics = dict(loss=loss, mse=jnp.mean(terms['mse']), grad_norm=grad_norm,
                 learning_rate=lr_fn(state.step), finite=finite.astype(jnp.float32))
  return new_state, metrics


def make_distill_fn(teacher_config, config, model, schedule, grid, optimizer, mesh):
  """``jax.jit`` of :func:`distill_step`: state and teacher replicated, the batch sharded on ``data``."""
  loss = round_loss
  if config.distill.inputs == 'teacher_paths':
    loss = functools.partial(path_round_loss, mesh=mesh)
  step = functools.partial(distill_step, teacher_config=teacher_config, config=config, model=model,
                           schedule=schedule, grid=grid, optimizer=optimizer,
                           lr_fn=train.learning_rate_schedule(config), loss=loss)

  def fn(state, teacher_params, batches):   # batches [1, B, ...], as train.next_batches stacks them
    state, metrics = step(state, teacher_params, jax.tree.map(lambda x: x[0], batches))
    return state, metrics

  replicated = NamedSharding(mesh, P())
  return jax.jit(fn, in_shardings=(replicated, replicated, train.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=(0,),
                 compiler_options=host.cpu_compiler_options(mesh))


def initial_student(config, teacher_params, optimizer, mesh) -> train.TrainState:
  """The round's start: params and EMA equal to the teacher's, a fresh optimiser, the round's key."""
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), RNG_ROUND)
  rng = jax.random.fold_in(rng, int(config.sampling.num_steps))
  make = lambda p, r: train.TrainState(step=jnp.zeros((), jnp.int32), params=p, ema_params=p,
                                       opt_state=optimizer.init(p), rng=r)
  return jax.jit(make, out_shardings=NamedSharding(mesh, P()))(teacher_params, rng)


def _say(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def round_teacher_steps(ds, steps: int) -> int:
  """The teacher's DDIM steps per student step in the round whose student takes ``steps``.

  ``distill.teacher='previous'``: ``distill.teacher_steps`` (the previous round's
  student takes K steps for one); ``'original'``: ``start_steps / steps`` (the
  original model's whole ``start_steps``-step DDIM path, every round).
  """
  if ds.teacher == 'original':
    return int(ds.start_steps) // int(steps)
  return int(ds.teacher_steps)


def run_round(teacher_config, config, teacher_params, out_dir, *, label: str,
              init_params=None, stop_at: Optional[int] = None) -> tuple[Any, dict]:
  """Trains one student in ``out_dir`` (resuming there); returns (its EMA params, timing).

  The student starts from ``init_params`` (default: the teacher's). ``stop_at``:
  stop at this step as a preemption would (save, return); for tests.
  """
  tr = config.training
  model = models.create_model(config)
  schedule = schedule_lib.schedule_from_config(config)
  steps = int(config.sampling.num_steps)
  grid = dl.round_grid(schedule, steps, round_teacher_steps(config.distill, steps))
  optimizer = train.create_optimizer(config)
  mesh = train.make_mesh()
  if jax.process_index() == 0:
    workdir_lib.prepare(out_dir, config.to_json_best_effort(indent=2, sort_keys=True))
  state = initial_student(config, teacher_params if init_params is None else init_params,
                          optimizer, mesh)
  train_iter = data_lib.create_train_iterator(config)
  manager = ckpt.create_manager(out_dir, max_to_keep=tr.keep_checkpoints)
  state = train._restore(manager, state, train_iter, tr.num_train_steps, _say)  # pylint: disable=protected-access
  start = step = int(state.step)
  fn = make_distill_fn(teacher_config, config, model, schedule, grid, optimizer, mesh)
  sharding = train.batch_sharding(mesh)
  writer = metric_writers.MetricWriter(out_dir / 'tensorboard')
  saver = ckpt.Saver(manager)
  bar = tqdm(total=tr.num_train_steps, initial=start, disable=jax.process_index() != 0,
             unit='step', dynamic_ncols=True, desc=label)
  pending, calls, t0 = [], 0, time.time()
  try:
    with preemption.Preemption(manager, multi_host=jax.process_count() > 1) as preempt:
      while step < tr.num_train_steps:
        state, metrics = fn(state, teacher_params, train.next_batches(train_iter, 1, sharding))
        step += 1
        pending.append(jax.tree.map(lambda m: m[None], metrics))
        bar.update(1)
        stop = preempt.should_stop(calls) or step == stop_at
        calls += 1
        boundary = lambda every: step % every == 0 or step == tr.num_train_steps
        if boundary(tr.log_every_steps) or boundary(tr.checkpoint_every_steps) or stop:
          flushed = metric_writers.fetch(pending)
          pending = []
          metric_writers.check_finite(flushed, step)
          summary = metric_writers.summarise(flushed)
          writer.write(step, summary)
          bar.set_postfix(loss=f"{summary['loss']:.4g}")
        if boundary(tr.checkpoint_every_steps) or stop:
          saver.save(step, state, train_iter.get_state())
        if stop:
          break
  finally:   # the save in flight completes, even on an error
    bar.close()
    writer.close()
    saver.close()
  wall = time.time() - t0
  if step >= tr.num_train_steps:
    sample_fn = train.make_sample_fn(config, model, schedule, tr.num_sample_images)
    train.save_sample_grid(sample_fn, state.ema_params,
                           jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x5A17),
                           out_dir / 'samples' / f'samples_{step:08d}.png',
                           nrow=train.grid_row_length(config, tr.num_sample_images))
  return state.ema_params, dict(steps=step - start, wall_s=round(wall, 1), done=step >= tr.num_train_steps)


def distill(config, workdir, *, stop_at: Optional[int] = None, claimed: bool = False) -> dict:
  """``--mode distill``: every round from ``distill.start_steps`` down to ``final_steps``.

  Returns ``{N: EMA params of the N-step student}`` (the rounds run or skipped so
  far; a preempted round's partial student is not in it) and writes
  ``DIR/distilled/rounds.json`` (per round: steps trained by this call, wall seconds).
  Holds ``workdir``'s claim while it runs, as training does (:func:`claim.hold`;
  ``claim.ClaimHeldError`` if another run writes there) unless ``claimed``: the
  caller holds it.
  """
  config_lib.validate_distill(config)
  if claimed:
    return _distill(config, workdir, stop_at)
  with claim_lib.hold(workdir, config.training.claim_timeout_s):
    return _distill(config, workdir, stop_at)


def _distill(config, workdir, stop_at: Optional[int]) -> dict:
  ds = config.distill
  model = models.create_model(config)
  mesh = train.make_mesh()
  step, original_params = train_state.restore_params(config, model, workdir, mesh)
  counts = dl.round_step_counts(ds.start_steps, ds.final_steps, ds.teacher_steps)
  targets = ('the previous student' if ds.teacher == 'previous'
             else f'the original model\'s {ds.start_steps} DDIM steps')
  if ds.inputs == 'teacher_paths':
    targets = (f'{ds.num_paths} stored paths of the original model\'s {ds.start_steps} '
               f'{teacher_paths.path_sampler_name(ds)} steps')
  _say(f'Distilling {workdir} (checkpoint step {step}, {config.diffusion.mean_type}-prediction) '
       f'from {ds.start_steps} steps: students of {", ".join(map(str, counts))} steps, '
       f'{ds.steps_per_round} optimiser steps each, targets from {targets}.')
  original_config = config.copy_and_resolve_references()
  teacher_config, params = original_config, original_params
  students, timing, prev, paths = {}, {}, ds.start_steps, None
  for r, n in enumerate(counts, 1):
    cfg = student_config(config, n)
    out = round_dir(workdir, n)
    label = f'round {r}/{len(counts)}: {prev}->{n} steps'
    done = ckpt.latest_step(out)   # None without a checkpoint
    if done is not None and done >= cfg.training.num_train_steps:
      _say(f'{label}: {out} is complete (step {done}); skipping.')
      _, params = train_state.restore_params(cfg, model, out, mesh)
    else:
      if ds.inputs == 'teacher_paths':
        if paths is None:
          paths = teacher_paths.make_paths(
              original_config, model, schedule_lib.schedule_from_config(config),
              original_params, workdir, stored_steps=counts[0], checkpoint_step=step,
              mesh=mesh, say=_say)
        teacher_config, teacher_params = original_config, paths
      elif ds.teacher == 'original':
        teacher_config, teacher_params = original_config, original_params
      else:
        teacher_params = params
      params, timing[n] = run_round(teacher_config, cfg, teacher_params, out, label=label,
                                    init_params=params, stop_at=stop_at)
      _say(f'{label}: {timing[n]["steps"]} steps in {timing[n]["wall_s"]} s -> {out}')
      if not timing[n]['done']:
        _say('Stopped; rerun the same command to resume.')
        break
    students[n] = params
    teacher_config, prev = cfg, n
  if jax.process_index() == 0 and timing:
    path = workdir_lib.as_path(workdir) / DISTILLED_DIR / 'rounds.json'
    workdir_lib.write_text(path, json.dumps({str(k): v for k, v in timing.items()}, indent=2))
  return students
