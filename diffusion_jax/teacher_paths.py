"""The original model's sampler paths, stored once per workdir: distillation's inputs and targets.

With ``distill.inputs='teacher_paths'`` a distillation does not noise training
images and run its teacher inside every optimiser step. It first follows the
original model's deterministic sampler (``distill.start_steps`` steps on the
trailing grid, the teacher's clipping and guidance; DPM-Solver++ of
``distill.path_solver_order`` 2 or 3, or DDIM with eta = 0 for order 1) from
``distill.num_paths`` fresh x_T ~ N(0, I) and keeps x_T and the state after
every ``start_steps / N_1``-th step, N_1 the first student's steps. Every round
then draws a stored path and a student step i and regresses the student's step
from the path's state z_i onto the path's state z_{i+1} (Algorithm 2's target
with the original model's path in place of a teacher's two steps). So the
students learn on the states the sampler meets, towards targets that carry no
earlier round's error, and a round's optimiser step costs only the student's
forward and backward pass.

The paths live in ``DIR/distilled/teacher_paths/``: ``meta.json`` (what they
were made with) and one ``chunk_<c>.npz`` per ``distill.path_chunk`` paths,
each written whole (a temporary file and a rename), so a run killed while
making them makes only the missing chunks when it is rerun; chunk c's x_T
(and labels) come from the config's seed and c alone (:func:`chunk_inputs`),
so a resumed pool equals an uninterrupted one.
"""

import functools
import io
import json
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
from tqdm import tqdm

from diffusion_jax import distillation as dl
from diffusion_jax import dpm_solver
from diffusion_jax import host
from diffusion_jax import runner
from diffusion_jax import settings
from diffusion_jax import storage
from diffusion_jax import timesteps as timesteps_lib
from diffusion_jax import workdir as workdir_lib

DISTILLED_DIR = 'distilled'   # DIR/distilled: the students' workdirs and the stored paths
PATHS_DIR = 'teacher_paths'
RNG_PATHS = 0x9A75   # folded into PRNGKey(seed), then with the chunk index: chunk c's x_T (labels)


class Paths(NamedTuple):
  """Stored paths: ``states`` [S + 1, P, H, W, C] (x_T first, then every ``stride``-th
  teacher state, the sample last) and ``labels`` [P] int32 (None if unconditional)."""
  states: jax.Array
  labels: Optional[jax.Array]

  @property
  def num_steps(self) -> int:
    """S: the stored steps (the first student's step count)."""
    return int(self.states.shape[0]) - 1


def paths_dir(workdir):
  """``DIR/distilled/teacher_paths``."""
  return workdir_lib.as_path(workdir) / DISTILLED_DIR / PATHS_DIR


def settings_of(config, stored_steps: int, checkpoint_step: int) -> dict:
  """What a pool's content depends on: ``meta.json`` must match it to be reused."""
  ds = config.distill
  return dict(start_steps=int(ds.start_steps), stored_steps=int(stored_steps),
              path_chunk=int(ds.path_chunk), seed=int(config.seed),
              checkpoint_step=int(checkpoint_step), mean_type=config.diffusion.mean_type,
              clip_denoised=bool(config.diffusion.clip_denoised),
              path_solver_order=int(ds.path_solver_order),
              guidance_scale=float(config.sampling.guidance_scale),
              num_classes=int(config.model.num_classes),
              image_shape=list(settings.image_shape(config)))


def ddim_path(schedule, model_fn, z, *, start_steps: int, stored_steps: int, mean_type: str,
              clip_denoised: bool):
  """x_T = ``z`` [B, ...] and the state after every (start/stored)-th of ``start_steps`` DDIM steps.

  DDIM eq. 12 with eta = 0 on the trailing grid (:func:`distillation.ddim_eta0`),
  one ``lax.scan`` over the stored steps with the skipped ones inside. Returns
  [stored_steps + 1, B, ...]; the last entry is the sampler's output.
  """
  grid = dl.round_grid(schedule, start_steps, 1)   # entry k: teacher step k
  stride = start_steps // stored_steps
  t = grid.t.reshape(stored_steps, stride)
  abar = grid.abar.reshape(stored_steps, stride)
  abar_end = grid.abar_end.reshape(stored_steps, stride)
  ones = jnp.ones((z.shape[0],), grid.abar.dtype)

  def body(z, k):
    for j in range(stride):
      z = dl.ddim_eta0(schedule, model_fn, z, (t[k, j] * ones).astype(jnp.int32),
                       abar[k, j] * ones, abar_end[k, j] * ones, mean_type=mean_type,
                       clip_denoised=clip_denoised)
    return z, z

  _, states = jax.lax.scan(body, z, jnp.arange(stored_steps))
  return jnp.concatenate([z[None], states], axis=0)


def solver_path(schedule, model_fn, z, *, start_steps: int, stored_steps: int, order: int,
                mean_type: str, clip_denoised: bool):
  """:func:`ddim_path` with DPM-Solver++ (multistep, ``order`` 2 or 3) in place of DDIM.

  The same ``start_steps`` trailing grid and one model call per step
  (:func:`dpm_solver.dpm_solver_chain`), so the stored states lie at the same
  times as DDIM's, closer to the probability-flow ODE's solution from x_T
  (Lu et al. 2022). Returns [stored_steps + 1, B, ...].
  """
  grid = timesteps_lib.trailing_timesteps(schedule.num_timesteps, start_steps)
  states = dpm_solver.dpm_solver_chain(schedule, model_fn, z, grid, order=order,
                                       mean_type=mean_type, clip_denoised=clip_denoised,
                                       return_path=True)
  stride = start_steps // stored_steps
  return jnp.concatenate([z[None], states[stride - 1::stride]], axis=0)


def path_sampler_name(ds) -> str:
  """The sampler that makes the paths, as messages name it: DDIM or DPM-Solver++ (2M / 3M)."""
  order = int(ds.path_solver_order)
  return 'DDIM' if order == 1 else f'DPM-Solver++ ({order}M)'


def chunk_inputs(config, c: int, chunk: int):
  """(x_T [chunk, H, W, C], labels [chunk] or None) of chunk ``c``: from the config's seed and c."""
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), RNG_PATHS), c)
  noise_rng, label_rng = jax.random.split(rng)
  x = jax.random.normal(noise_rng, (chunk,) + settings.image_shape(config), jnp.float32)
  k = int(config.model.num_classes)
  y = jax.random.randint(label_rng, (chunk,), 0, k, jnp.int32) if k else None
  return x, y


def make_path_fn(config, model, schedule, stored_steps: int, mesh):
  """Jitted ``(params, x_T, y) -> states``: the batch sharded on ``data``, the result replicated."""
  cond = settings.conditioning(config)
  apply_fn = runner.apply_fn_for(model)
  ds = config.distill

  order = int(ds.path_solver_order)
  path_fn = ddim_path if order == 1 else functools.partial(solver_path, order=order)

  def fn(params, x, y):
    model_fn = cond.model_fn(apply_fn, params, y)
    return path_fn(schedule, model_fn, x, start_steps=int(ds.start_steps),
                   stored_steps=stored_steps, mean_type=config.diffusion.mean_type,
                   clip_denoised=bool(config.diffusion.clip_denoised))

  batch, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  return jax.jit(fn, in_shardings=(replicated, batch, batch), out_shardings=replicated,
                 compiler_options=host.cpu_compiler_options(mesh))


def _chunk_path(directory, c: int):
  return directory / f'chunk_{c:05d}.npz'


def _save_chunk(path, states, labels) -> None:
  buf = io.BytesIO()
  arrays = dict(states=states) if labels is None else dict(states=states, labels=labels)
  np.savez(buf, **arrays)
  storage.write_file(path, buf.getvalue())


def _load_chunk(path):
  with path.open('rb') as f:
    data = np.load(io.BytesIO(f.read()))
    return data['states'], (data['labels'] if 'labels' in data.files else None)


def check_meta(directory, wanted: dict) -> None:
  """Writes ``meta.json`` in a new pool; ValueError if an existing one was made differently."""
  meta = directory / 'meta.json'
  if meta.exists():
    found = json.loads(meta.read_text())
    found.setdefault('path_solver_order', 1)   # pools made before the option existed: DDIM
    diff = sorted(k for k in wanted if found.get(k) != wanted[k])
    if diff:
      k = diff[0]
      raise ValueError(f'{directory} holds teacher paths made with {k}={found.get(k)!r}, not '
                       f'{wanted[k]!r}; remove that folder to make new ones.')
  elif jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    workdir_lib.write_text(meta, json.dumps(wanted, indent=2, sort_keys=True))


def make_paths(config, model, schedule, params, workdir, *, stored_steps: int,
               checkpoint_step: int, mesh, say=print) -> Paths:
  """The pool of ``distill.num_paths`` paths: made (or completed) in ``workdir``, then loaded.

  Chunks already on disk are read, not recomputed. Returns the states replicated
  on ``mesh``'s devices.
  """
  ds = config.distill
  chunk, num_chunks = int(ds.path_chunk), int(ds.num_paths) // int(ds.path_chunk)
  if chunk % mesh.devices.size:
    raise ValueError(f'distill.path_chunk={chunk} must be a multiple of the '
                     f'{mesh.devices.size} devices.')
  directory = paths_dir(workdir)
  check_meta(directory, settings_of(config, stored_steps, checkpoint_step))
  parts = {c: _load_chunk(_chunk_path(directory, c)) for c in range(num_chunks)
           if _chunk_path(directory, c).exists()}
  missing = [c for c in range(num_chunks) if c not in parts]
  if missing:
    say(f'Teacher paths: {len(missing) * chunk} of {num_chunks * chunk} to make '
        f'({ds.start_steps} {path_sampler_name(ds)} steps each, x_T and {stored_steps} of '
        f'their states kept) '
        f'-> {directory}')
    fn = make_path_fn(config, model, schedule, stored_steps, mesh)
    bar = tqdm(total=num_chunks * chunk, initial=(num_chunks - len(missing)) * chunk,
               unit='path', dynamic_ncols=True, desc='teacher paths',
               disable=jax.process_index() != 0)
    try:
      for c in missing:   # every process keeps what it computed; process 0 writes it
        x, y = chunk_inputs(config, c, chunk)
        parts[c] = np.asarray(fn(params, x, y)), None if y is None else np.asarray(y)
        if jax.process_index() == 0:
          _save_chunk(_chunk_path(directory, c), *parts[c])
        bar.update(chunk)
    finally:
      bar.close()
  replicated = NamedSharding(mesh, P())
  states = np.concatenate([parts[c][0] for c in range(num_chunks)], axis=1)
  labels = None
  if config.model.num_classes:
    labels = jax.device_put(np.concatenate([parts[c][1] for c in range(num_chunks)]), replicated)
  return Paths(states=jax.device_put(states, replicated), labels=labels)


def draw(paths: Paths, rng, batch_size: int, student_steps: int):
  """(i, b): student steps i [B] uniform over ``student_steps`` and paths b [B] uniform over P."""
  i_rng, b_rng = jax.random.split(rng)
  i = jax.random.randint(i_rng, (batch_size,), 0, student_steps)
  b = jax.random.randint(b_rng, (batch_size,), 0, paths.states.shape[1])
  return i, b


def step_pairs(paths: Paths, i, b, student_steps: int):
  """(z_i, z_{i+1}) of the N-step student's steps ``i`` on paths ``b``: states N_1/N apart."""
  stride = paths.num_steps // int(student_steps)
  return paths.states[i * stride, b], paths.states[(i + 1) * stride, b]
