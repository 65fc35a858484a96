"""Data sets as random-access sources: scikit-learn digits, prepared tfds data sets, image folders.

Every source has ``__len__``, ``__getitem__`` (one float32 ``[H, W, C]`` image
in [-1, 1] at ``data.image_size`` with ``data.num_channels`` channels) and
``uint8(index)``; labelled ones also ``example(index)`` returning ``{'image',
'label'}``. :func:`get_source` picks one for a config (the package docstring
of :mod:`diffusion_jax.data` says how each data set is read).
"""

import dataclasses
import inspect
import os
from typing import Any, Optional, Sequence

from absl import logging
import numpy as np
from PIL import Image

from diffusion_jax.data import checks

DIGITS_NUM_TEST = 297
DIGITS_SPLITS = ('train', 'test')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
FOLDER_SPLITS = ('train', 'test', 'validation')


# --- image helpers ---------------------------------------------------------


def _to_float(image: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return image.astype(np.float32) / 127.5 - 1.0


def _to_uint8(image: np.ndarray) -> np.ndarray:
  """float [-1, 1] -> uint8 [0, 255] (rounded, clipped)."""
  return np.clip(np.rint((image + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _convert_channels(image: np.ndarray, num_channels: int) -> np.ndarray:
  """uint8 [H, W, c] -> uint8 [H, W, num_channels] (gray <-> RGB, drops alpha)."""
  if image.ndim == 2:
    image = image[..., None]
  c = image.shape[-1]
  if c == 4:
    image, c = image[..., :3], 3
  if c == num_channels:
    return image
  if c == 1:
    return np.repeat(image, num_channels, axis=-1)
  gray = Image.fromarray(np.ascontiguousarray(image), 'RGB').convert('L')
  return np.asarray(gray)[..., None]


def _center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, C] -> uint8 [size, size, C]: central square crop, then resize."""
  h, w = image.shape[:2]
  if h == w == size:
    return image
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  image = image[top:top + s, left:left + s]
  if s == size:
    return np.ascontiguousarray(image)
  c = image.shape[-1]
  pil = Image.fromarray(image[..., 0] if c == 1 else image)
  out = np.asarray(pil.resize((size, size), Image.BICUBIC))
  return out[..., None] if c == 1 else out


def _prepare_uint8(image: np.ndarray, size: int, num_channels: int) -> np.ndarray:
  """Raw uint8 image -> uint8 [size, size, num_channels]."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = np.clip(image, 0, 255).astype(np.uint8)
  image = _convert_channels(image, num_channels)
  return _center_crop_resize(image, size)


# --- sources ---------------------------------------------------------------


@dataclasses.dataclass
class ArraySource:
  """An in-memory array of float32 images [N, H, W, C] in [-1, 1] (and int labels [N])."""
  images: np.ndarray
  labels: Optional[np.ndarray] = None

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> np.ndarray:
    return self.images[index]

  def uint8(self, index: int) -> np.ndarray:
    return _to_uint8(self.images[index])

  def example(self, index: int) -> dict[str, np.ndarray]:
    return {'image': self.images[index], 'label': np.int32(self.labels[index])}


@dataclasses.dataclass
class TfdsSource:
  """A tfds random-access data source of records with an ``'image'`` feature."""
  source: Sequence[Any]
  image_size: int
  num_channels: int

  def __len__(self) -> int:
    return len(self.source)

  def uint8(self, index: int) -> np.ndarray:
    record = self.source[index]
    return _prepare_uint8(record['image'], self.image_size, self.num_channels)

  def __getitem__(self, index: int) -> np.ndarray:
    return _to_float(self.uint8(index))

  def example(self, index: int) -> dict[str, np.ndarray]:
    record = self.source[index]
    image = _prepare_uint8(record['image'], self.image_size, self.num_channels)
    return {'image': _to_float(image), 'label': np.int32(record['label'])}


@dataclasses.dataclass
class FolderSource:
  """Image files (PNG/JPEG) read lazily, center-cropped and resized.

  A file that cannot be decoded (corrupt, truncated, not an image) is skipped
  with a warning naming it (once per file): its index reads the next readable
  file instead, so the epoch length and the order of every other image stay
  the same and runs stay deterministic.
  """
  paths: Sequence[str]
  image_size: int
  num_channels: int
  labels: Optional[Sequence[int]] = None   # the class of each path (class sub-folders)
  _warned: set = dataclasses.field(default_factory=set, repr=False, compare=False)

  def __len__(self) -> int:
    return len(self.paths)

  def _read(self, path: str) -> np.ndarray:
    with Image.open(path) as pil:
      pil = pil.convert('L' if self.num_channels == 1 else 'RGB')
      return np.asarray(pil)

  def _readable(self, index: int) -> tuple[np.ndarray, int]:
    """(uint8 image, index of the file read): ``index``'s file or the next readable one."""
    n = len(self.paths)
    for offset in range(n):
      i = (index + offset) % n
      path = self.paths[i]
      try:
        image = self._read(path)
      except (OSError, ValueError, SyntaxError) as e:  # PIL's decode errors
        if path not in self._warned:
          self._warned.add(path)
          logging.warning('Skipping corrupt image file %s (%s: %s); the next readable file '
                          'is used in its place.', path, type(e).__name__, e)
        continue
      return _prepare_uint8(image, self.image_size, self.num_channels), i
    raise checks.DatasetNotFoundError(f"Data set 'image_folder': none of the {n} image files under "
                               'data.data_dir can be decoded.')

  def uint8(self, index: int) -> np.ndarray:
    return self._readable(index)[0]

  def __getitem__(self, index: int) -> np.ndarray:
    return _to_float(self.uint8(index))

  def example(self, index: int) -> dict[str, np.ndarray]:
    image, i = self._readable(index)   # the label of the file actually read
    return {'image': _to_float(image), 'label': np.int32(self.labels[i])}


def _digits_source(config, split: str) -> ArraySource:
  """scikit-learn digits: train = first 1500 images, test = last 297."""
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  if split not in DIGITS_SPLITS:
    raise ValueError(
        f'split {split!r} (data.train_split / data.eval_split) is not a digits '
        f'split; allowed: {DIGITS_SPLITS}.')
  digits = sk_datasets.load_digits()
  images = digits.images.astype(np.float32)   # 0..16
  labels = digits.target.astype(np.int32)
  part = slice(None, -DIGITS_NUM_TEST) if split == 'train' else slice(-DIGITS_NUM_TEST, None)
  images, labels = images[part], labels[part]
  images = images / 16.0 * 2.0 - 1.0
  size = config.data.image_size
  if size != images.shape[1]:
    images = np.stack([
        np.asarray(Image.fromarray(x, 'F').resize((size, size), Image.BILINEAR))
        for x in images])
  images = np.clip(images, -1.0, 1.0)[..., None]
  if config.data.num_channels == 3:
    images = np.repeat(images, 3, axis=-1)
  return ArraySource(np.ascontiguousarray(images, dtype=np.float32), labels)


def tfds_name(config) -> str:
  """The tensorflow-datasets name for ``config.data.name``."""
  name = config.data.name
  if name == 'celeb_a_hq':
    fits = [r for r in checks.CELEB_A_HQ_RESOLUTIONS if r >= config.data.image_size]
    return f'celeb_a_hq/{fits[0] if fits else checks.CELEB_A_HQ_RESOLUTIONS[-1]}'
  return name


def _tfds_default_data_dir() -> str:
  """The directory tfds searches when ``data.data_dir`` is unset."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return os.path.expanduser(tfds.core.constants.DATA_DIR)


def _prepared_dirs(data_dir: str, name: str) -> list[str]:
  """Version folders of ``name`` under ``data_dir`` that hold a dataset_info.json."""
  root = os.path.join(data_dir, *name.split('/'))
  if not os.path.isdir(root):
    return []
  return sorted(os.path.join(root, v) for v in os.listdir(root)
                if os.path.isfile(os.path.join(root, v, 'dataset_info.json')))


def _tfds_missing_message(config, name: str, split: str, data_dir: str | None,
                          error: Exception) -> str:
  """One message: what is missing, where we looked, how to prepare it."""
  searched = data_dir or _tfds_default_data_dir()
  where = searched if data_dir else (
      f'{searched} (the tfds default; set data.data_dir to change it)')
  prepared = _prepared_dirs(searched, name)
  head = (f"Data set {config.data.name!r} (tfds {name!r}, split {split!r})")
  if prepared:
    lines = [
        f'{head} is in {prepared[-1]} but cannot be opened for random access. '
        f'Check that split {split!r} exists (data.train_split / '
        'data.eval_split) and that it was prepared in the array_record format '
        '(rebuild with --file_format=array_record if it is tfrecord).',
        f'(tfds said: {type(error).__name__}: {str(error)[:300]})']
  else:
    lines = [
        f'{head} was not found in data_dir {where}.',
        'This library never downloads. Prepare it on a machine with network '
        'access and TensorFlow: `pip install tensorflow tensorflow-datasets && '
        f'tfds build {name} --data_dir {searched} --file_format=array_record`, '
        'then copy that directory here and point --config.data.data_dir at it.']
    if name.startswith('celeb_a_hq'):
      lines.append(
          'celeb_a_hq needs a manual download first (see the tfds catalog page '
          'for celeb_a_hq; put the files in <data_dir>/downloads/manual).')
  return '\n'.join(lines)


def _tfds_source(config, split: str) -> TfdsSource:
  """Opens a prepared tfds data set for random access; never downloads."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = tfds_name(config)
  data_dir = config.data.data_dir
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  kwargs = dict(split=split, data_dir=data_dir)
  params = inspect.signature(tfds.data_source).parameters
  if 'download' in params:
    kwargs['download'] = False
  if 'try_gcs' in params:
    kwargs['try_gcs'] = False
  try:
    source = tfds.data_source(name, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    raise checks.DatasetNotFoundError(
        _tfds_missing_message(config, name, split, data_dir, e)) from e
  return TfdsSource(source, config.data.image_size, config.data.num_channels)


def list_image_files(data_dir: str, split: str | None = None) -> list[str]:
  """Sorted PNG/JPEG paths under ``data_dir`` (or ``data_dir/split``, see module doc)."""
  return _image_files(data_dir, split)[1]


def folder_class_labels(root: str, paths: Sequence[str],
                        num_classes: int) -> tuple[list[int], list[str]]:
  """(label of every path, class names): one class per sub-folder of ``root``, sorted by name.

  Raises:
    DatasetNotFoundError: an image outside every class folder, or a number of
      class folders other than ``num_classes`` (``model.num_classes``).
  """
  tops = [os.path.relpath(p, root).split(os.sep) for p in paths]
  loose = [os.path.join(root, *t) for t in tops if len(t) == 1]
  if loose:
    raise checks.DatasetNotFoundError(
        f"model.num_classes={num_classes} needs one sub-folder per class under {root!r} "
        f"(data.data_dir), but {loose[0]!r} is not in one; move the images into class folders "
        'or set model.num_classes=0.')
  names = sorted({t[0] for t in tops})
  if len(names) != num_classes:
    raise checks.DatasetNotFoundError(
        f'model.num_classes={num_classes} does not match the {len(names)} class folders under '
        f'{root!r} (data.data_dir: {", ".join(names[:10])}{", ..." if len(names) > 10 else ""}); '
        f'use {len(names)}.')
  index = {name: i for i, name in enumerate(names)}
  return [index[t[0]] for t in tops], names


def _image_files(data_dir: str, split: str | None) -> tuple[str, list[str]]:
  """(the folder searched, its sorted PNG/JPEG paths); see :func:`list_image_files`."""
  root = os.path.expanduser(data_dir)
  if not os.path.isdir(root):
    raise checks.DatasetNotFoundError(
        f"Data set 'image_folder': data_dir {root!r} (data.data_dir) is not a "
        'directory. Point --config.data.data_dir at a folder of PNG/JPEG images.')
  if split is not None:
    split_dirs = [s for s in FOLDER_SPLITS if os.path.isdir(os.path.join(root, s))]
    if os.path.isdir(os.path.join(root, split)):
      root = os.path.join(root, split)
    elif split_dirs:
      raise checks.DatasetNotFoundError(
          f"Data set 'image_folder': data_dir {data_dir!r} has split "
          f'sub-folders {split_dirs} but none named {split!r}. Add '
          f'{os.path.join(data_dir, split)} or change data.train_split / '
          'data.eval_split.')
  paths = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames.sort()
    paths.extend(os.path.join(dirpath, f) for f in filenames
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  if not paths:
    raise checks.DatasetNotFoundError(
        f"Data set 'image_folder': no {'/'.join(IMAGE_EXTENSIONS)} files found "
        f'under data_dir {root!r} (data.data_dir). Point --config.data.data_dir '
        'at a folder of images.')
  return root, sorted(paths)


def get_source(config, split: str):
  """A random-access source of float32 [H, W, C] images in [-1, 1] for a split.

  Sources also have ``uint8(index)`` returning the uint8 image [H, W, C], and
  labelled ones ``example(index)`` returning ``{'image', 'label'}``.

  Raises:
    ValueError: bad config values.
    DatasetNotFoundError: the data set is not on disk.
  """
  checks.check_name(config.data.name)
  checks.check_labels_available(config)
  name = config.data.name
  if name == 'digits':
    return _digits_source(config, split)
  if name == 'image_folder':
    if not config.data.data_dir:
      raise checks.DatasetNotFoundError(
          "Data set 'image_folder': data.data_dir is not set. Point "
          '--config.data.data_dir at a folder of PNG/JPEG images.')
    root, paths = _image_files(config.data.data_dir, split)
    labels = None
    if checks.conditional(config):
      labels, _ = folder_class_labels(root, paths, config.model.num_classes)
    return FolderSource(paths, config.data.image_size, config.data.num_channels, labels)
  return _tfds_source(config, split)
