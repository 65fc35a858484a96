"""Input pipelines: per-host, seeded, resumable batches of images in [-1, 1].

Every data set is exposed as a random-access *source* (``__len__`` and
``__getitem__`` returning one float32 ``[H, W, C]`` image in [-1, 1] at
``config.data.image_size`` with ``config.data.num_channels`` channels) and fed
through a `grain <https://github.com/google/grain>`_ ``MapDataset`` pipeline.

Data sets (``config.data.name``):

- ``digits``: scikit-learn's 8x8 digits (1797 images, shipped in its wheel, the
  offline default). Values 0..16 are scaled as ``x / 16 * 2 - 1``. Split: the
  first 1500 images are ``train``, the last 297 are ``test`` (a fixed,
  deterministic split; the images are not permuted). Resized with Pillow
  bilinear if ``image_size != 8``.
- ``mnist``, ``cifar10``, ``celeb_a_hq``, ``lsun/<category>``: read with
  ``tfds.data_source`` (random access; needs the data set prepared in the
  ``array_record`` file format under ``config.data.data_dir``, default
  ``~/tensorflow_datasets``). Never downloads. ``celeb_a_hq`` uses the tfds
  config of the smallest resolution >= ``image_size`` (``celeb_a_hq/256`` for
  256), or ``celeb_a_hq/<res>`` when given explicitly.
- ``image_folder``: every ``.png``/``.jpg``/``.jpeg`` file under
  ``config.data.data_dir``, recursively, in sorted path order (a file that
  cannot be decoded is skipped with a warning naming it, see
  :class:`FolderSource`). If
  ``data_dir/<split>`` is a directory, a split reads only that folder; if the
  folder has none of ``train``/``test``/``validation`` sub-folders, every split
  is the whole folder.

Images that are not ``image_size`` square are center-cropped to a square and
resized (Pillow bicubic, antialiased), as in the DDPM reference pipeline for
CelebA-HQ and LSUN. Grayscale images are repeated to 3 channels when
``num_channels == 3``; colour images are converted to luminance (ITU-R 601-2,
as Pillow's ``'L'`` mode) when ``num_channels == 1``.

Training iterator: each host reads only its shard (a contiguous block of
``len // process_count`` examples; the remainder is dropped so that every host
has the same epoch length), shuffles it with a seed derived from
``(seed, process_index)``, reshuffles every epoch, flips horizontally at random
(seeded per element position) when ``config.data.random_flip``, and yields
``{'image': float32 [local_batch, H, W, C]}`` forever (plus ``'label'``, int32
``[local_batch]``, for a class-conditional config); batches may straddle
epoch boundaries.

Labels (class-conditional configs, ``model.num_classes > 0``): digits (the
scikit-learn targets), mnist and cifar10 (tfds ``label``), and image folders
with one sub-folder per class (classes in sorted folder-name order; every
image must lie inside a class folder). ``model.num_classes`` must equal the
data set's number of classes; celeb_a_hq and LSUN have no labels. The iterator is a grain ``DatasetIterator``: ``get_state()``
returns a small JSON-serialisable dict and ``set_state(state)`` on a fresh
iterator built from the same config resumes exactly where it stopped.
"""

import dataclasses
import inspect
import os
from typing import Any, Iterator, Optional, Sequence

from absl import logging
import grain
import jax
import numpy as np
from PIL import Image

TFDS_DATASETS = ('mnist', 'cifar10', 'celeb_a_hq', 'lsun')
# Number of classes of the labelled data sets (image folders: their class folders).
NUM_CLASSES = {'digits': 10, 'mnist': 10, 'cifar10': 10}
DATASETS = ('digits', 'mnist', 'cifar10', 'celeb_a_hq', 'lsun/<category>',
            'image_folder')
LSUN_CATEGORIES = (
    'classroom', 'bedroom', 'bridge', 'church_outdoor', 'conference_room',
    'dining_room', 'kitchen', 'living_room', 'restaurant', 'tower', 'airplane',
    'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
    'dining_table', 'dog', 'horse', 'motorbike', 'person', 'potted_plant',
    'sheep', 'sofa', 'train', 'tv-monitor')
CELEB_A_HQ_RESOLUTIONS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
NUM_CHANNELS = (1, 3)
DIGITS_NUM_TEST = 297
DIGITS_SPLITS = ('train', 'test')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
FOLDER_SPLITS = ('train', 'test', 'validation')
_PREFETCH_BYTES = 256 * 2**20   # host memory budget for prefetched batches


class DatasetNotFoundError(FileNotFoundError):
  """A data set is not on disk; the message says where we looked and what to do."""


# --------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------


def _name_error(name: Any) -> ValueError:
  """The ValueError for an unsupported ``data.name``."""
  return ValueError(
      f'data.name={name!r} is not supported; allowed: {", ".join(DATASETS)} '
      f'(LSUN categories: {", ".join(LSUN_CATEGORIES)}; celeb_a_hq may be '
      f'given as celeb_a_hq/<res>, res in {CELEB_A_HQ_RESOLUTIONS}).')


def _check_name(name: Any) -> None:
  """Raises ValueError unless ``name`` is a supported ``data.name``."""
  if not isinstance(name, str):
    raise _name_error(name)
  if name in ('digits', 'mnist', 'cifar10', 'celeb_a_hq', 'image_folder'):
    return
  base, _, sub = name.partition('/')
  if base == 'lsun' and sub in LSUN_CATEGORIES:
    return
  if base == 'celeb_a_hq' and sub in {str(r) for r in CELEB_A_HQ_RESOLUTIONS}:
    return
  raise _name_error(name)


def validate_data_config(config, *, process_count: int | None = None,
                         num_devices: int | None = None) -> None:
  """Checks the ``data`` section and the global batch size.

  Args:
    config: the experiment config (``ml_collections.ConfigDict``).
    process_count: number of hosts (default ``jax.process_count()``).
    num_devices: number of devices over all hosts (default
      ``jax.device_count()``).

  Raises:
    ValueError: naming the offending field and its allowed values.
  """
  data = config.data
  _check_name(data.name)
  size = data.image_size
  if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
    raise ValueError(
        f'data.image_size={size!r} must be a positive integer.')
  if data.num_channels not in NUM_CHANNELS:
    raise ValueError(
        f'data.num_channels={data.num_channels!r} is not supported; allowed: '
        f'{NUM_CHANNELS} (grayscale data sets are repeated to 3 channels, '
        'colour ones converted to luminance for 1).')
  if data.name == 'image_folder' and not data.data_dir:
    raise ValueError(
        'data.data_dir must be set to a folder of PNG/JPEG images when '
        "data.name='image_folder'.")
  _check_labels_available(config)
  process_count = jax.process_count() if process_count is None else process_count
  num_devices = jax.device_count() if num_devices is None else num_devices
  batch = config.training.batch_size
  if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
    raise ValueError(
        f'training.batch_size={batch!r} must be a positive integer.')
  if batch % process_count:
    raise ValueError(
        f'training.batch_size={batch} (global) must be divisible by the '
        f'number of processes ({process_count}).')
  if batch % num_devices:
    raise ValueError(
        f'training.batch_size={batch} (global) must be divisible by the '
        f'number of devices ({num_devices}).')


def conditional(config) -> bool:
  """Whether batches carry labels: a class-conditional model (``model.num_classes > 0``)."""
  return bool(config.model.get('num_classes', 0))


def _check_labels_available(config) -> None:
  """A conditional config needs a labelled data set with ``model.num_classes`` classes."""
  k, name = config.model.get('num_classes', 0), config.data.name
  if not k or name == 'image_folder':   # image folders: checked when listed (get_source)
    return
  if name not in NUM_CLASSES:
    raise ValueError(
        f'model.num_classes={k} needs labels, but data.name={name!r} has none; labelled data '
        f'sets: {", ".join(NUM_CLASSES)}, image_folder with one sub-folder per class '
        '(or set model.num_classes=0).')
  if k != NUM_CLASSES[name]:
    raise ValueError(f'model.num_classes={k} does not match data.name={name!r}, which has '
                     f'{NUM_CLASSES[name]} classes; use {NUM_CLASSES[name]}.')


def check_batch_fits(config, num_examples: int, process_count: int) -> None:
  """Raises ValueError when a host's batch is larger than its shard of the training split."""
  per_host = num_examples // process_count
  local_batch = config.training.batch_size // process_count
  if local_batch > per_host:
    hosts = f' over {process_count} hosts ({per_host} per host)' if process_count > 1 else ''
    raise ValueError(
        f'training.batch_size={config.training.batch_size} is larger than the training split '
        f'of data.name={config.data.name!r} ({config.data.train_split!r}: {num_examples} '
        f'images{hosts}); use at most {per_host * process_count}.')


# --------------------------------------------------------------------------
# Image helpers
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Sources: random access, float32 [H, W, C] in [-1, 1]
# --------------------------------------------------------------------------


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
    raise DatasetNotFoundError(f"Data set 'image_folder': none of the {n} image files under "
                               'data.data_dir can be decoded.')

  def uint8(self, index: int) -> np.ndarray:
    return self._readable(index)[0]

  def __getitem__(self, index: int) -> np.ndarray:
    return _to_float(self.uint8(index))

  def example(self, index: int) -> dict[str, np.ndarray]:
    image, i = self._readable(index)   # the label of the file actually read
    return {'image': _to_float(image), 'label': np.int32(self.labels[i])}


@dataclasses.dataclass
class _Examples:
  """``{'image', 'label'}`` examples of a labelled source, as a random-access source."""
  source: Any

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self.source.example(index)


@dataclasses.dataclass
class _Uint8View:
  """The uint8 images of a source, as a random-access source."""
  source: Any

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> np.ndarray:
    return self.source.uint8(index)


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
    fits = [r for r in CELEB_A_HQ_RESOLUTIONS if r >= config.data.image_size]
    return f'celeb_a_hq/{fits[0] if fits else CELEB_A_HQ_RESOLUTIONS[-1]}'
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
    raise DatasetNotFoundError(
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
    raise DatasetNotFoundError(
        f"model.num_classes={num_classes} needs one sub-folder per class under {root!r} "
        f"(data.data_dir), but {loose[0]!r} is not in one; move the images into class folders "
        'or set model.num_classes=0.')
  names = sorted({t[0] for t in tops})
  if len(names) != num_classes:
    raise DatasetNotFoundError(
        f'model.num_classes={num_classes} does not match the {len(names)} class folders under '
        f'{root!r} (data.data_dir: {", ".join(names[:10])}{", ..." if len(names) > 10 else ""}); '
        f'use {len(names)}.')
  index = {name: i for i, name in enumerate(names)}
  return [index[t[0]] for t in tops], names


def _image_files(data_dir: str, split: str | None) -> tuple[str, list[str]]:
  """(the folder searched, its sorted PNG/JPEG paths); see :func:`list_image_files`."""
  root = os.path.expanduser(data_dir)
  if not os.path.isdir(root):
    raise DatasetNotFoundError(
        f"Data set 'image_folder': data_dir {root!r} (data.data_dir) is not a "
        'directory. Point --config.data.data_dir at a folder of PNG/JPEG images.')
  if split is not None:
    split_dirs = [s for s in FOLDER_SPLITS if os.path.isdir(os.path.join(root, s))]
    if os.path.isdir(os.path.join(root, split)):
      root = os.path.join(root, split)
    elif split_dirs:
      raise DatasetNotFoundError(
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
    raise DatasetNotFoundError(
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
  _check_name(config.data.name)
  _check_labels_available(config)
  name = config.data.name
  if name == 'digits':
    return _digits_source(config, split)
  if name == 'image_folder':
    if not config.data.data_dir:
      raise DatasetNotFoundError(
          "Data set 'image_folder': data.data_dir is not set. Point "
          '--config.data.data_dir at a folder of PNG/JPEG images.')
    root, paths = _image_files(config.data.data_dir, split)
    labels = None
    if conditional(config):
      labels, _ = folder_class_labels(root, paths, config.model.num_classes)
    return FolderSource(paths, config.data.image_size, config.data.num_channels, labels)
  return _tfds_source(config, split)


# --------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------


def _as_example(image: np.ndarray) -> dict[str, np.ndarray]:
  return {'image': image}


def _random_flip(example: dict[str, np.ndarray],
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Mirrors the image left-right with probability 1/2 (a label is kept)."""
  if rng.random() < 0.5:
    return {**example, 'image': np.ascontiguousarray(example['image'][:, ::-1])}
  return example


def _training_examples(config, source, start: int, stop: int, shuffle_seed: int):
  """One host's shard, reshuffled every epoch, as ``{'image'}`` (+ ``'label'`` if conditional)."""
  if conditional(config):
    ds = grain.MapDataset.source(_Examples(source))[start:stop]
    return ds.shuffle(seed=shuffle_seed).repeat()
  ds = grain.MapDataset.source(source)[start:stop]
  return ds.shuffle(seed=shuffle_seed).repeat().map(_as_example)


def _to_plain_numpy(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Copies out of grain's shared memory (multiprocess workers)."""
  return {k: np.array(v) for k, v in batch.items()}


def _read_options(config, batch_size: int, in_memory: bool) -> grain.ReadOptions:
  """Threads and a prefetch buffer (in batches) within ~256 MiB of host memory."""
  size = config.data.image_size
  batch_bytes = max(1, batch_size * size * size * config.data.num_channels * 4)
  buffer = int(np.clip(_PREFETCH_BYTES // batch_bytes, 2, 16))
  threads = 0 if in_memory else min(buffer, 8)
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)


def _pipeline_seeds(seed: int, process_index: int) -> tuple[int, int]:
  """(shuffle seed, flip seed) for one host, derived from the run seed."""
  seq = np.random.SeedSequence([int(seed) % 2**32, int(process_index)])
  shuffle_seed, flip_seed = seq.generate_state(2)
  return int(shuffle_seed), int(flip_seed)


def shard_bounds(num_examples: int, process_index: int,
                 process_count: int) -> tuple[int, int]:
  """[start, stop) of one host's contiguous, equal-sized shard."""
  per_host = num_examples // process_count
  if per_host == 0:
    raise ValueError(
        f'the split has {num_examples} examples, fewer than the '
        f'{process_count} processes reading it.')
  return process_index * per_host, (process_index + 1) * per_host


def create_train_iterator(config, *, process_index: int | None = None,
                          process_count: int | None = None,
                          seed: int | None = None) -> grain.DatasetIterator:
  """The infinite, per-host training iterator (see the module docstring).

  Args:
    config: experiment config; uses ``data.*``, ``training.batch_size``
      (global) and ``seed``.
    process_index: this host (default ``jax.process_index()``).
    process_count: number of hosts (default ``jax.process_count()``).
    seed: shuffle/flip seed (default ``config.seed``).

  Returns:
    A grain ``DatasetIterator`` yielding ``{'image': float32 [B_local, H, W,
    C]}`` (and ``'label'`` int32 [B_local] for a conditional config) with ``B_local = training.batch_size // process_count``; it has
    ``get_state()`` (JSON-serialisable) and ``set_state(state)``.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  seed = config.seed if seed is None else seed
  if not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index={process_index} must be in [0, {process_count}).')
  validate_data_config(config, process_count=process_count, num_devices=1)
  local_batch = config.training.batch_size // process_count

  source = get_source(config, config.data.train_split)
  check_batch_fits(config, len(source), process_count)
  start, stop = shard_bounds(len(source), process_index, process_count)
  shuffle_seed, flip_seed = _pipeline_seeds(seed, process_index)

  ds = _training_examples(config, source, start, stop, shuffle_seed)
  if config.data.random_flip:
    ds = ds.random_map(_random_flip, seed=flip_seed)
  ds = ds.batch(local_batch, drop_remainder=True)
  it_ds = ds.to_iter_dataset(
      _read_options(config, local_batch, isinstance(source, ArraySource)))
  num_workers = config.data.get('num_workers', 0) or 0
  if num_workers > 0:
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers)).map(_to_plain_numpy)
  return iter(it_ds)


def _ordered_batches(config, source, batch_size: int,
                     num: int | None) -> grain.DatasetIterator:
  """Batches of ``source`` in order, the last one possibly partial."""
  if batch_size <= 0:
    raise ValueError(f'batch_size={batch_size} must be positive.')
  ds = grain.MapDataset.source(source)
  if num is not None and num >= 0:
    ds = ds[:num]
  ds = ds.batch(batch_size, drop_remainder=False)
  return iter(ds.to_iter_dataset(
      _read_options(config, batch_size, isinstance(source, ArraySource))))


def create_eval_iterator(config, split: str, batch_size: int, *,
                         num: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Finite batches ``{'image': float32 [b, H, W, C]}`` of a split, in order.

  No sharding, shuffling or flipping: every host sees the whole split. The
  last batch may be smaller than ``batch_size``. ``num`` (None or < 0: all)
  limits the number of examples.
  """
  source = get_source(config, split)
  for images in _ordered_batches(config, source, batch_size, num):
    yield {'image': images}


def load_split(config, split: str, *, num: int | None = None) -> np.ndarray:
  """A whole (small) split as float32 [N, H, W, C] in [-1, 1], in order."""
  size, c = config.data.image_size, config.data.num_channels
  batches = [b['image'] for b in create_eval_iterator(config, split, 256, num=num)]
  if not batches:
    return np.zeros((0, size, size, c), np.float32)
  return np.concatenate(batches, axis=0)


def load_labels(config, split: str, num: int | None = None) -> Optional[np.ndarray]:
  """int32 labels of the first ``num`` (None: all) examples of a split, in the order of
  :func:`load_split`; None for an unconditional config."""
  if not conditional(config):
    return None
  source = get_source(config, split)
  n = len(source) if num is None or num < 0 else min(int(num), len(source))
  return np.asarray([source.example(i)['label'] for i in range(n)], np.int32)


def load_uint8(config, split: str, num: int | None = None) -> np.ndarray:
  """The first ``num`` (None: all) images of a split as uint8 [N, H, W, C].

  The same images as :func:`load_split` (``float = uint8 / 127.5 - 1`` for
  tfds and image folders; digits are rounded from ``x / 16 * 255``), for
  reference statistics such as FID.
  """
  size, c = config.data.image_size, config.data.num_channels
  source = _Uint8View(get_source(config, split))
  batches = list(_ordered_batches(config, source, 256, num))
  if not batches:
    return np.zeros((0, size, size, c), np.uint8)
  return np.concatenate(batches, axis=0)


def shard_batch(batch, sharding: jax.sharding.Sharding):
  """Host-local numpy batch -> global jax.Arrays sharded along the batch axis.

  ``sharding`` is e.g. ``NamedSharding(mesh, PartitionSpec('data'))``; each
  host passes its own local batch (``jax.make_array_from_process_local_data``).
  """
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
