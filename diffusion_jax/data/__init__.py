"""Input pipelines: per-host, seeded, resumable batches of images in [-1, 1].

One module per concern: :mod:`.checks` (the ``data`` section's one-line
errors), :mod:`.sources` (the data sets below, as random-access sources) and
:mod:`.pipeline` (the grain iterators and batch sharding); their public names
are re-exported here, so ``from diffusion_jax import data`` is the API.

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

from diffusion_jax.data.checks import (CELEB_A_HQ_RESOLUTIONS, DATASETS, LSUN_CATEGORIES,
                                       NUM_CHANNELS, NUM_CLASSES, TFDS_DATASETS,
                                       DatasetNotFoundError, check_batch_fits, conditional,
                                       validate_data_config)
from diffusion_jax.data.pipeline import (create_eval_iterator, create_train_iterator,
                                         load_labels, load_split, load_uint8, shard_batch,
                                         shard_bounds)
from diffusion_jax.data.sources import (DIGITS_NUM_TEST, DIGITS_SPLITS, FOLDER_SPLITS,
                                        IMAGE_EXTENSIONS, ArraySource, FolderSource, TfdsSource,
                                        folder_class_labels, get_source, list_image_files,
                                        tfds_name)

__all__ = [
    'CELEB_A_HQ_RESOLUTIONS', 'DATASETS', 'LSUN_CATEGORIES', 'NUM_CHANNELS', 'NUM_CLASSES',
    'TFDS_DATASETS', 'DatasetNotFoundError', 'check_batch_fits', 'conditional',
    'validate_data_config', 'create_eval_iterator', 'create_train_iterator', 'load_labels',
    'load_split', 'load_uint8', 'shard_batch', 'shard_bounds', 'DIGITS_NUM_TEST',
    'DIGITS_SPLITS', 'FOLDER_SPLITS', 'IMAGE_EXTENSIONS', 'ArraySource', 'FolderSource',
    'TfdsSource', 'folder_class_labels', 'get_source', 'list_image_files', 'tfds_name',
]
