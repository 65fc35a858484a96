"""``--mode inpaint`` and ``--mode edit``: :mod:`diffusion_jax.editing` on a split of the data set.

* :func:`run_inpaint` completes ``inpaint.num_images`` images of
  ``inpaint.split`` with ``inpaint.missing`` removed (RePaint or the
  replacement baseline) and writes ``DIR/samples/inpaint_<missing>.npz``
  (``images``, ``originals`` uint8 NHWC, ``known`` bool NHWC, ``labels`` when
  the data set has them) and a PNG grid next to it: rows of masked inputs
  (missing pixels grey), completions and originals.
* :func:`run_edit` edits ``edit.num_images`` images of ``edit.split`` with
  SDEdit at ``edit.strength`` and writes ``DIR/samples/edit_s<strength>.npz``
  (``images``, ``originals``, ``labels``) and a PNG grid (originals above
  their edits).

Both use the EMA parameters of the latest checkpoint
(:func:`evaluation.runtime.restore_for_eval`), chunks of ``sampling.batch_size``
images (rounded up to a multiple of the device count, the last chunk padded
so that one shape compiles) sharded on the batch axis, and chunk i's key
``fold_in(key, i)``. :func:`check_inpaint` / :func:`check_edit` are the checks
``main.preflight`` runs before anything is written.
"""

from __future__ import annotations

from typing import Callable

from etils import epath
import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from diffusion_jax import data as data_lib
from diffusion_jax import editing
from diffusion_jax import images as image_lib
from diffusion_jax.evaluation import runtime as rt

# Streams of randomness, folded into PRNGKey(config.seed).
RNG_INPAINT, RNG_EDIT, RNG_MASK = 0x1E9A, 0xED17, 0x3A5C
GRID_COLUMNS, GRID_IMAGES = 10, 30   # the PNG grids show the first 30 images, 10 per row
MASKED_GREY = 128


# --- checks before any work (main.preflight) ---------------------------------------------


def read_mask_image(config) -> np.ndarray:
  """``inpaint.mask_path`` as bool ``[H, W]`` (white = known); ValueError/OSError on a bad file."""
  path = config.inpaint.mask_path
  size = config.data.image_size
  try:
    with epath.Path(path).open('rb') as f, Image.open(f) as pil:
      image = np.asarray(pil.convert('L'))
  except FileNotFoundError as e:
    raise FileNotFoundError(f'inpaint.mask_path {path!r} does not exist.') from e
  except (OSError, ValueError, SyntaxError) as e:   # PIL's decode errors
    raise ValueError(f'inpaint.mask_path {path!r} is not an image ({e}).') from e
  return editing.mask_from_image(image, size, size)


def _check_split(config, split: str, field: str):
  """The data source of ``split``; ValueError / DatasetNotFoundError naming ``field``."""
  try:
    return data_lib.get_source(config, split)
  except ValueError as e:
    raise ValueError(f'{field}={split!r}: {e}') from e


def check_inpaint(config) -> None:
  """``--mode inpaint``'s input: the split exists, the mask image has the images' size."""
  _check_split(config, config.inpaint.split, 'inpaint.split')
  if config.inpaint.missing == 'mask':
    read_mask_image(config)


def check_edit(config) -> None:
  """``--mode edit``'s input: the split exists and the sampler can start mid-chain."""
  if config.sampling.sampler not in editing.EDIT_SAMPLERS:
    raise ValueError(f'sampling.sampler={config.sampling.sampler!r} is not supported by '
                     f'--mode edit; allowed values: {", ".join(editing.EDIT_SAMPLERS)}.')
  _check_split(config, config.edit.split, 'edit.split')


# --- inputs and outputs --------------------------------------------------------------------


def load_originals(config, split: str, num: int):
  """(float32 images in [-1, 1], uint8 images, int32 labels or None): the first ``num`` of a split."""
  source = data_lib.get_source(config, split)
  n = min(int(num), len(source))
  if n < int(num):
    rt.say(f'  {split!r} has {n} images; using all of them (asked for {num}).')
  images = data_lib.load_split(config, split, num=n)
  originals = data_lib.load_uint8(config, split, num=n)
  try:
    labels = np.asarray([source.example(i)['label'] for i in range(n)], np.int32)
  except (KeyError, TypeError, IndexError, AttributeError):   # a data set without labels
    labels = None
  return images, originals, labels


def run_in_chunks(fn: Callable, params, rng, arrays, chunk: int, desc: str) -> np.ndarray:
  """``fn(params, fold_in(rng, i), *chunk_i)`` over chunks of the arrays, as uint8 images.

  The last chunk is padded (its first image repeated) to ``chunk`` and truncated.
  """
  n = len(arrays[0])
  out = []
  for i in tqdm(range(-(-n // chunk)), desc=desc, unit='chunk', disable=not rt.is_main(),
                dynamic_ncols=True):
    part = [a[i * chunk:(i + 1) * chunk] for a in arrays]
    pad = chunk - len(part[0])
    if pad:
      part = [np.concatenate([p, np.repeat(p[:1], pad, axis=0)]) for p in part]
    x = fn(params, jax.random.fold_in(rng, i), *part)
    out.append(image_lib.to_uint8(rt.to_host(x))[:chunk - pad])
  return np.concatenate(out, axis=0)


def _chunk_size(config, num: int) -> int:
  return rt.round_up(min(int(config.sampling.batch_size), num), jax.device_count())


def comparison_grid(rows_of_images, *, columns: int = GRID_COLUMNS,
                    num: int = GRID_IMAGES) -> np.ndarray:
  """uint8 cells for ``images.save_grid(..., nrow=columns)``: for every ``columns`` images,
  one row of each array in ``rows_of_images`` (e.g. masked inputs, completions, originals)."""
  n = min(num, len(rows_of_images[0]))
  cells = []
  for start in range(0, n, columns):
    for images in rows_of_images:
      row = np.full((columns,) + images.shape[1:], 255, np.uint8)
      part = images[start:min(start + columns, n)]
      row[:len(part)] = part
      cells.append(row)
  return np.concatenate(cells, axis=0)


def strength_tag(strength: float) -> str:
  """``edit.strength`` as it appears in file names: ``0.15`` -> ``'0.15'``, ``1.0`` -> ``'1'``."""
  return f'{float(strength):g}'


# --- the modes --------------------------------------------------------------------------------


def run_inpaint(config, workdir: str) -> dict:
  """``--mode inpaint``: completions of ``inpaint.num_images`` images of ``inpaint.split``.

  Known pixels of ``images`` equal ``originals`` exactly (pasted after the
  chain, in uint8). Returns the paths (``npz``, ``png``) and the checkpoint ``step``.
  """
  ic = config.inpaint
  workdir = rt.workdir_path(workdir)
  model, schedule, _, step, params = rt.restore_for_eval(config, workdir)
  images, originals, labels = load_originals(config, ic.split, ic.num_images)
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), RNG_INPAINT)
  known = editing.known_mask(
      ic.missing, images.shape, rng=jax.random.fold_in(key, RNG_MASK),
      fraction=float(ic.random_fraction),
      mask=read_mask_image(config) if ic.missing == 'mask' else None)
  chunk = _chunk_size(config, len(images))
  fn = editing.make_inpaint_fn(config, schedule, rt.apply_fn_for(model), batch_size=chunk)
  steps, jump = editing.inpaint_walk(config)
  how = (f'{ic.method}, {steps} steps' + (
      f', resample {ic.resample}, jump {jump}' if ic.method == 'repaint' else '')
      + (f', DDIM eta {ic.eta:g}' if ic.get('eta', -1.0) >= 0 else ''))
  completions = run_in_chunks(fn, params, key, [images, known], chunk,
                              f'inpainting {ic.missing} ({how})')
  completions = np.where(known, originals, completions)
  npz = rt.join(workdir, 'samples', f'inpaint_{ic.missing}.npz')
  png = rt.join(workdir, 'samples', f'inpaint_{ic.missing}.png')
  rt.save_npz(npz, images=completions, originals=originals, known=known,
              **({} if labels is None else {'labels': labels}))
  if rt.is_main():
    masked = np.where(known, originals, np.uint8(MASKED_GREY))
    image_lib.save_grid(comparison_grid([masked, completions, originals]), png,
                        nrow=GRID_COLUMNS)
  rt.say(f'Inpainted {len(completions)} images of {ic.split!r} ({ic.missing} missing; {how}) '
         f'with checkpoint step {step}:\n  {npz}\n  {png}')
  return dict(npz=npz, png=png, step=step)


def run_edit(config, workdir: str) -> dict:
  """``--mode edit``: SDEdit of ``edit.num_images`` images of ``edit.split`` at ``edit.strength``.

  Returns the paths (``npz``, ``png``) and the checkpoint ``step``.
  """
  ec, sc = config.edit, config.sampling
  workdir = rt.workdir_path(workdir)
  model, schedule, _, step, params = rt.restore_for_eval(config, workdir)
  images, originals, labels = load_originals(config, ec.split, ec.num_images)
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), RNG_EDIT)
  chunk = _chunk_size(config, len(images))
  fn = editing.make_sdedit_fn(config, schedule, rt.apply_fn_for(model), batch_size=chunk)
  T = config.diffusion.num_timesteps
  t0 = editing.edit_start_index(T, float(ec.strength))
  steps = t0 + 1 if sc.sampler == 'ancestral' else editing.segment_num_steps(
      int(sc.num_steps), T, t0)
  how = f'strength {ec.strength:g}: t0 = {t0 + 1} of {T}, {sc.sampler} {steps} steps'
  edited = run_in_chunks(fn, params, key, [images], chunk, f'editing ({how})')
  tag = strength_tag(ec.strength)
  npz = rt.join(workdir, 'samples', f'edit_s{tag}.npz')
  png = rt.join(workdir, 'samples', f'edit_s{tag}.png')
  rt.save_npz(npz, images=edited, originals=originals,
              **({} if labels is None else {'labels': labels}))
  if rt.is_main():
    image_lib.save_grid(comparison_grid([originals, edited]), png, nrow=GRID_COLUMNS)
  rt.say(f'Edited {len(edited)} images of {ec.split!r} ({how}) with checkpoint step {step}:\n'
         f'  {npz}\n  {png}')
  return dict(npz=npz, png=png, step=step)
