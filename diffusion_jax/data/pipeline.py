"""Pipelines: per-host, seeded, resumable grain iterators over a source, and batch sharding.

The training iterator (:func:`create_train_iterator`) is described in the
package docstring of :mod:`diffusion_jax.data`; the evaluation readers
(:func:`create_eval_iterator`, :func:`load_split`, :func:`load_uint8`,
:func:`load_labels`) read a split in order, unsharded.
"""

import dataclasses
from typing import Any, Iterator, Optional

import grain
import jax
import numpy as np

from diffusion_jax.data import checks
from diffusion_jax.data import sources

_PREFETCH_BYTES = 256 * 2**20   # host memory budget for prefetched batches


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
  if checks.conditional(config):
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
  checks.validate_data_config(config, process_count=process_count, num_devices=1)
  local_batch = config.training.batch_size // process_count

  source = sources.get_source(config, config.data.train_split)
  checks.check_batch_fits(config, len(source), process_count)
  start, stop = shard_bounds(len(source), process_index, process_count)
  shuffle_seed, flip_seed = _pipeline_seeds(seed, process_index)

  ds = _training_examples(config, source, start, stop, shuffle_seed)
  if config.data.random_flip:
    ds = ds.random_map(_random_flip, seed=flip_seed)
  ds = ds.batch(local_batch, drop_remainder=True)
  it_ds = ds.to_iter_dataset(
      _read_options(config, local_batch, isinstance(source, sources.ArraySource)))
  num_workers = config.data.num_workers or 0
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
      _read_options(config, batch_size, isinstance(source, sources.ArraySource))))


def create_eval_iterator(config, split: str, batch_size: int, *,
                         num: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Finite batches ``{'image': float32 [b, H, W, C]}`` of a split, in order.

  No sharding, shuffling or flipping: every host sees the whole split. The
  last batch may be smaller than ``batch_size``. ``num`` (None or < 0: all)
  limits the number of examples.
  """
  source = sources.get_source(config, split)
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
  if not checks.conditional(config):
    return None
  source = sources.get_source(config, split)
  n = len(source) if num is None or num < 0 else min(int(num), len(source))
  return np.asarray([source.example(i)['label'] for i in range(n)], np.int32)


def load_uint8(config, split: str, num: int | None = None) -> np.ndarray:
  """The first ``num`` (None: all) images of a split as uint8 [N, H, W, C].

  The same images as :func:`load_split` (``float = uint8 / 127.5 - 1`` for
  tfds and image folders; digits are rounded from ``x / 16 * 255``), for
  reference statistics such as FID.
  """
  size, c = config.data.image_size, config.data.num_channels
  source = _Uint8View(sources.get_source(config, split))
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
