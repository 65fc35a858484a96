"""What every evaluation needs: a checkpoint's parameters, sharded batches, output files.

* :func:`restore_for_eval`: the EMA parameters of the latest checkpoint (DDPM
  App. B reports every sample and metric with the EMA, decay 0.9999);
* :func:`put` / :func:`batch_sharding` / :func:`to_host` (of :mod:`diffusion_jax.runner`):
  host batches to batch-sharded device arrays over ``runner.make_mesh()`` and back;
  :func:`over_batches` runs a :func:`runner.jit_batched` per-image computation
  over a whole image set in padded, sharded batches (bits/dim, ODE bits/dim);
* :func:`write_json`, :func:`save_npz`, :func:`write_bytes`, :func:`load_npz`:
  files under the workdir, written by process 0 only and through
  ``etils.epath`` (so ``gs://`` workdirs work), atomically (temporary file,
  then rename).

Conventions (docs/design.md): images in [-1, 1], NHWC; only process 0 writes
files; every process takes part in the (sharded) computations.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Callable, Optional

from etils import epath
import jax
from jax.sharding import Mesh
import numpy as np
from tqdm import tqdm

from diffusion_jax import config_lib
from diffusion_jax import models
from diffusion_jax import schedule as schedule_lib
from diffusion_jax import storage
from diffusion_jax import runner
from diffusion_jax import train_state

ApplyFn = runner.ApplyFn
# The batch placement and the model adapter of diffusion_jax.runner.
to_host, put, batch_sharding, round_up, apply_fn_for = (
    runner.to_host, runner.put, runner.batch_sharding, runner.round_up, runner.apply_fn_for)


def is_main() -> bool:
  return jax.process_index() == 0


def say(msg: str) -> None:
  """Prints from process 0 only."""
  if is_main():
    print(msg, flush=True)


def workdir_path(workdir) -> str:
  """A workdir as a string: absolute for local paths, unchanged for ``gs://...``."""
  workdir = os.fspath(workdir)
  return workdir if '://' in workdir else os.path.abspath(workdir)


def join(*parts) -> str:
  return os.fspath(epath.Path(parts[0]).joinpath(*parts[1:]))






def model_fn_of(apply_fn: ApplyFn, params, y=None):
  """The ``model_fn(x_t, t)`` of ``apply_fn`` at ``params`` (with labels ``y`` for a conditional model)."""
  if y is None:
    return lambda x, t: apply_fn(params, x, t)
  return lambda x, t: apply_fn(params, x, t, y)


def pad_batch(x: np.ndarray, size: int) -> np.ndarray:
  """``x`` padded to ``size`` rows by repeating its last row (one compiled shape per batch size)."""
  if x.shape[0] == size:
    return x
  return np.concatenate([x, np.repeat(x[-1:], size - x.shape[0], axis=0)], axis=0)


def eval_batch_size(config, num: int, batch_size: Optional[int], mesh: Optional[Mesh]) -> int:
  """``batch_size`` (default ``eval.batch_size``), at most ``num``, rounded up to the mesh's size."""
  bs = min(int(batch_size or config.eval.batch_size), num)
  return round_up(bs, mesh.size) if mesh is not None else bs


def mesh_devices(mesh: Optional[Mesh]) -> list:
  """The devices of ``mesh`` (None: the first device, unsharded)."""
  return list(mesh.devices.flat) if mesh is not None else jax.devices()[:1]


def over_batches(fn: Callable, params, images: np.ndarray, rng, batch_size: int, sharding, *,
                 labels: Optional[np.ndarray] = None, desc: str, progress: bool = True):
  """Yields ``(fn(params, fold_in(rng, i), x_i, y_i), k_i)`` over batches of ``images``.

  ``fn`` is a :func:`runner.jit_batched` function with one batched input.

  Batch i holds images ``[i * batch_size, (i + 1) * batch_size)``, the last one
  padded by repeating its final image (:func:`pad_batch`; ``k_i`` of its rows
  are real), placed with :func:`put`; ``labels`` (int32) are batched alike.
  """
  n = images.shape[0]
  for i in tqdm(range(-(-n // batch_size)), desc=desc, unit='batch',
                disable=not (progress and is_main()), dynamic_ncols=True):
    rows = slice(i * batch_size, (i + 1) * batch_size)
    y = None if labels is None else put(pad_batch(np.asarray(labels[rows], np.int32), batch_size),
                                        sharding)
    yield (fn(params, jax.random.fold_in(rng, i), put(pad_batch(images[rows], batch_size), sharding),
              y), min(batch_size, n - i * batch_size))


def write_bytes(path, data: bytes) -> None:
  """Writes ``data`` to ``path`` (process 0), via a temporary file and a rename.

  A full disk raises :class:`storage.StorageFullError` naming ``path``.
  """
  if is_main():
    storage.write_file(path, data)


def write_json(path, obj: dict) -> None:
  write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def write_csv(path, columns, rows) -> None:
  """``rows`` (dicts) as CSV with a header of ``columns``; absent/None cells empty, numbers as %.8g."""
  text = io.StringIO(newline='')
  writer = csv.writer(text)
  writer.writerow(columns)
  for row in rows:
    writer.writerow(['' if row.get(c) is None else
                     (row[c] if isinstance(row[c], str) else f'{row[c]:.8g}') for c in columns])
  write_bytes(path, text.getvalue().encode())


def csv_and_pyplot(eval_dir, stem: str, columns, rows):
  """``(<stem>.csv, <stem>.png, pyplot)``: writes the CSV of a curve and readies a plot of it.

  On processes other than 0 nothing is written and ``pyplot`` is None.
  """
  csv_path, png_path = join(eval_dir, f'{stem}.csv'), join(eval_dir, f'{stem}.png')
  if not is_main():
    return csv_path, png_path, None
  write_csv(csv_path, columns, rows)
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return csv_path, png_path, plt


def read_json(path) -> dict:
  return json.loads(epath.Path(path).read_text())


def save_npz(path, **arrays) -> None:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  write_bytes(path, buf.getvalue())


def load_npz(path) -> dict:
  """All arrays of an ``.npz`` file (local or ``gs://``)."""
  with np.load(io.BytesIO(epath.Path(path).read_bytes())) as f:
    return {k: f[k] for k in f.files}


def save_figure(fig, path) -> None:
  """A matplotlib figure as a PNG (process 0)."""
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=100)
  write_bytes(path, buf.getvalue())


def save_titled_figure(fig, path, title: str) -> None:
  """Adds the title, lays the figure out, saves it as a PNG (process 0) and closes it."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.suptitle(title)
  fig.tight_layout()
  save_figure(fig, path)
  plt.close(fig)


def cached(path) -> bool:
  """Whether a cached file may be reused: it exists and this is a single-process run.

  With several processes every one must take the same (collective) path, and
  only process 0 writes files, so caches are not reused there.
  """
  return jax.process_count() == 1 and epath.Path(path).exists()


def restore_for_eval(config, workdir: str, *, step: Optional[int] = None,
                     use_ema: Optional[bool] = None):
  """(model, schedule, mesh, step, params): a checkpoint's EMA (or raw) params.

  The checkpoint (the newest finished one, or ``step``) is restored onto the
  abstract shape of the training state (``jax.eval_shape`` of
  :func:`train_state.create_train_state`), replicated over
  :func:`runner.make_mesh`, so nothing is initialised or compiled for it and
  the training loop is not imported.

  ``use_ema`` (default ``config.sampling.use_ema``) picks the exponential moving
  average (DDPM App. B reports every sample and metric with the EMA parameters).
  """
  config_lib.validate_config(config)
  model = models.create_model(config)
  schedule = schedule_lib.schedule_from_config(config)
  mesh = runner.make_mesh()
  use_ema = config.sampling.use_ema if use_ema is None else use_ema
  step, params = train_state.restore_params(config, model, workdir, mesh, step=step,
                                            use_ema=use_ema)
  return model, schedule, mesh, step, params
