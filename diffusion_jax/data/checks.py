"""The ``data`` section's checks: every bad value is a one-line error naming the field and what is allowed."""

from typing import Any

import jax

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


class DatasetNotFoundError(FileNotFoundError):
  """A data set is not on disk; the message says where we looked and what to do."""


def _name_error(name: Any) -> ValueError:
  """The ValueError for an unsupported ``data.name``."""
  return ValueError(
      f'data.name={name!r} is not supported; allowed: {", ".join(DATASETS)} '
      f'(LSUN categories: {", ".join(LSUN_CATEGORIES)}; celeb_a_hq may be '
      f'given as celeb_a_hq/<res>, res in {CELEB_A_HQ_RESOLUTIONS}).')


def check_name(name: Any) -> None:
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
  check_name(data.name)
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
  check_labels_available(config)
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
  return bool(config.model.num_classes)


def check_labels_available(config) -> None:
  """A conditional config needs a labelled data set with ``model.num_classes`` classes."""
  k, name = config.model.num_classes, config.data.name
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
