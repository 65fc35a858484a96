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

``inpaint.input`` / ``edit.input`` take your own images instead of a split: a
folder of images or an ``.npz`` file with ``images`` (:func:`images.read_images`).
Both modes run :class:`diffusion_jax.Pipeline`'s own functions
(:meth:`Pipeline.inpaint_float`, :meth:`Pipeline.edit_float`) on the EMA
parameters of the newest checkpoint: chunks of ``sampling.batch_size`` images
(rounded up to a multiple of the device count, the last chunk padded so that
one shape compiles) sharded on the batch axis, chunk i's key ``fold_in(key, i)``. :func:`check_inpaint` / :func:`check_edit` are the checks
``main.preflight`` runs before anything is written.
"""

from __future__ import annotations

from etils import epath
import jax
import numpy as np
from PIL import Image

from diffusion_jax import data as data_lib
from diffusion_jax import editing
from diffusion_jax import images as image_lib
from diffusion_jax import pipeline
from diffusion_jax import settings
from diffusion_jax.evaluation import runtime as rt

# The mask stream, folded into the inpainting key (pipeline.RNG_INPAINT of PRNGKey(config.seed)).
RNG_MASK = 0x3A5C
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


def _check_input(config, section: str):
  """Your own images (``<section>.input``) if given, else the split's source must exist."""
  sec = config[section]
  if sec.input:
    read_input(config, section)
  else:
    _check_split(config, sec.split, f'{section}.split')


def check_inpaint(config) -> None:
  """``--mode inpaint``'s input: the images exist, the mask image has the images' size."""
  _check_input(config, 'inpaint')
  if config.inpaint.missing == 'mask':
    read_mask_image(config)


def check_edit(config) -> None:
  """``--mode edit``'s input: the images exist and the sampler can start mid-chain."""
  if config.sampling.sampler not in editing.EDIT_SAMPLERS:
    raise ValueError(f'sampling.sampler={config.sampling.sampler!r} is not supported by '
                     f'--mode edit; allowed values: {", ".join(editing.EDIT_SAMPLERS)}.')
  _check_input(config, 'edit')


def read_input(config, section: str) -> np.ndarray:
  """uint8 images of ``<section>.input`` (a folder of images or an .npz with ``images``)."""
  d = config.data
  return image_lib.read_images(config[section].input, d.image_size, d.num_channels,
                               f'{section}.input')


# --- inputs and outputs --------------------------------------------------------------------


def load_originals(config, split: str, num: int, section: str = ''):
  """(float32 images in [-1, 1], uint8 images, int32 labels or None): the first ``num`` of a split.

  With ``<section>.input`` set, your own images instead (all of them; no labels).
  """
  if section and config[section].input:
    originals = read_input(config, section)
    return originals.astype(np.float32) / 127.5 - 1.0, originals, None
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
  ic = settings.inpaint_settings(config)
  workdir = rt.workdir_path(workdir)
  pipe = pipeline.Pipeline.from_workdir(workdir, config)
  step = pipe.step
  images, originals, labels = load_originals(config, ic.split, ic.num_images, 'inpaint')
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), pipeline.RNG_INPAINT)
  known = editing.known_mask(
      ic.missing, images.shape, rng=jax.random.fold_in(key, RNG_MASK),
      fraction=ic.random_fraction,
      mask=read_mask_image(config) if ic.missing == 'mask' else None)
  how = (f'{ic.method}, {ic.num_steps} steps' + (
      f', resample {ic.resample}, jump {ic.jump_length}' if ic.method == 'repaint' else '')
      + (f', DDIM eta {ic.eta:g}' if ic.eta is not None else ''))
  completions = pipe.inpaint_float(config, images, known, seed=config.seed,
                                   desc=f'inpainting {ic.missing} ({how})')
  completions = np.where(known, originals, completions)
  npz = rt.join(workdir, 'samples', f'inpaint_{ic.missing}.npz')
  png = rt.join(workdir, 'samples', f'inpaint_{ic.missing}.png')
  rt.save_npz(npz, images=completions, originals=originals, known=known,
              **({} if labels is None else {'labels': labels}))
  if rt.is_main():
    masked = np.where(known, originals, np.uint8(MASKED_GREY))
    image_lib.save_grid(comparison_grid([masked, completions, originals]), png,
                        nrow=GRID_COLUMNS)
  rt.say(f'Inpainted {len(completions)} images of {ic.input or ic.split!r} ({ic.missing} missing; {how}) '
         f'with checkpoint step {step}:\n  {npz}\n  {png}')
  return dict(npz=npz, png=png, step=step)


def run_edit(config, workdir: str) -> dict:
  """``--mode edit``: SDEdit of ``edit.num_images`` images of ``edit.split`` at ``edit.strength``.

  Returns the paths (``npz``, ``png``) and the checkpoint ``step``.
  """
  ec, sc = settings.edit_settings(config), config.sampling
  workdir = rt.workdir_path(workdir)
  pipe = pipeline.Pipeline.from_workdir(workdir, config)
  step = pipe.step
  images, originals, labels = load_originals(config, ec.split, ec.num_images, 'edit')
  T = config.diffusion.num_timesteps
  t0 = editing.edit_start_index(T, float(ec.strength))
  steps = t0 + 1 if sc.sampler == 'ancestral' else editing.segment_num_steps(
      int(sc.num_steps), T, t0)
  how = f'strength {ec.strength:g}: t0 = {t0 + 1} of {T}, {sc.sampler} {steps} steps'
  edited = pipe.edit_float(config, images, strength=ec.strength, seed=config.seed,
                           desc=f'editing ({how})')
  tag = strength_tag(ec.strength)
  npz = rt.join(workdir, 'samples', f'edit_s{tag}.npz')
  png = rt.join(workdir, 'samples', f'edit_s{tag}.png')
  rt.save_npz(npz, images=edited, originals=originals,
              **({} if labels is None else {'labels': labels}))
  if rt.is_main():
    image_lib.save_grid(comparison_grid([originals, edited]), png, nrow=GRID_COLUMNS)
  rt.say(f'Edited {len(edited)} images of {ec.input or ec.split!r} ({how}) with checkpoint '
         f'step {step}:\n  {npz}\n  {png}')
  return dict(npz=npz, png=png, step=step)
