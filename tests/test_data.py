"""Tests for diffusion_jax.data: digits, tfds (mock), image folders, resume."""

import collections
import json
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from diffusion_jax import config_lib
from diffusion_jax import data


def _digits_config(batch_size=50, **data_kw):
  config = config_lib.digits_config()
  config.training.batch_size = batch_size
  for k, v in data_kw.items():
    config.data[k] = v
  return config


def _take(it, n):
  return [next(it)['image'] for _ in range(n)]


def _keys(images):
  """Hashable keys of images, for multiset comparisons."""
  return [x.tobytes() for x in images]


# --------------------------------------------------------------------------
# digits: shapes, sharding, seeding, flips, resume
# --------------------------------------------------------------------------


@pytest.mark.parametrize('process_count', [1, 2])
def test_digits_batches_shape_dtype_range(process_count):
  config = _digits_config(batch_size=64)
  it = data.create_train_iterator(config, process_index=0,
                                  process_count=process_count)
  for images in _take(it, 3):
    assert images.shape == (64 // process_count, 8, 8, 1)
    assert images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
  assert images.min() == -1.0 and images.max() == 1.0


def test_digits_split_and_scaling():
  from sklearn import datasets as sk_datasets
  raw = sk_datasets.load_digits().images
  config = _digits_config()
  train, test = data.load_split(config, 'train'), data.load_split(config, 'test')
  assert train.shape == (1500, 8, 8, 1) and test.shape == (297, 8, 8, 1)
  np.testing.assert_allclose(test[..., 0], raw[-297:] / 16 * 2 - 1, atol=1e-6)
  u8 = data.load_uint8(config, 'test', num=5)
  assert u8.dtype == np.uint8 and u8.shape == (5, 8, 8, 1)
  np.testing.assert_array_equal(u8[..., 0], np.rint(raw[-297:-292] / 16 * 255))


def test_digits_resize_and_channels():
  config = _digits_config(image_size=16, num_channels=3)
  x = data.load_split(config, 'test', num=4)
  assert x.shape == (4, 16, 16, 3) and x.dtype == np.float32
  assert x.min() >= -1 and x.max() <= 1
  np.testing.assert_array_equal(x[..., 0], x[..., 2])


def test_two_hosts_disjoint_and_cover_an_epoch():
  config = _digits_config(batch_size=50)   # 25 per host, 750 per host-epoch
  epochs = []
  for host in range(2):
    it = data.create_train_iterator(config, process_index=host, process_count=2)
    stream = np.concatenate(_take(it, 60))   # two epochs
    epochs.append((stream[:750], stream[750:]))
  train = data.load_split(config, 'train')
  everything = collections.Counter(_keys(train))
  first = collections.Counter(_keys(epochs[0][0])) + collections.Counter(
      _keys(epochs[1][0]))
  assert first == everything   # disjoint and covering within the epoch
  for host in range(2):   # the same shard again, in another order
    assert collections.Counter(_keys(epochs[host][0])) == collections.Counter(
        _keys(epochs[host][1]))
    assert not np.array_equal(epochs[host][0], epochs[host][1])


def test_seeding():
  config = _digits_config()
  a = _take(data.create_train_iterator(config, process_index=0,
                                       process_count=1, seed=1), 3)
  b = _take(data.create_train_iterator(config, process_index=0,
                                       process_count=1, seed=1), 3)
  c = _take(data.create_train_iterator(config, process_index=0,
                                       process_count=1, seed=2), 3)
  np.testing.assert_array_equal(np.stack(a), np.stack(b))
  assert not np.array_equal(np.stack(a), np.stack(c))
  config.seed = 1   # default seed comes from the config
  d = _take(data.create_train_iterator(config, process_index=0,
                                       process_count=1), 3)
  np.testing.assert_array_equal(np.stack(a), np.stack(d))


def test_flips_only_when_configured_and_mirror():
  plain_cfg = _digits_config(random_flip=False)
  flip_cfg = _digits_config(random_flip=True)
  plain = np.concatenate(_take(data.create_train_iterator(
      plain_cfg, process_index=0, process_count=1, seed=3), 6))
  flipped = np.concatenate(_take(data.create_train_iterator(
      flip_cfg, process_index=0, process_count=1, seed=3), 6))
  train = set(_keys(data.load_split(plain_cfg, 'train')))
  assert set(_keys(plain)) <= train   # no flips without random_flip
  same = np.all(flipped == plain, axis=(1, 2, 3))
  mirrored = np.all(flipped == plain[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same | mirrored)
  symmetric = np.all(plain == plain[:, :, ::-1], axis=(1, 2, 3))
  num_flipped = np.sum(mirrored & ~symmetric)
  assert 0.3 * len(plain) < num_flipped < 0.7 * len(plain)


@pytest.mark.parametrize('random_flip', [False, True])
def test_exact_resume_after_json_round_trip(random_flip):
  config = _digits_config(batch_size=200, random_flip=random_flip)   # 100/host
  make = lambda: data.create_train_iterator(config, process_index=1,
                                            process_count=2, seed=5)
  it = make()
  _take(it, 6)   # 600 of 750: the next batches straddle the epoch boundary
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 4)
  resumed = make()
  resumed.set_state(state)
  np.testing.assert_array_equal(np.stack(_take(resumed, 4)), np.stack(expected))


def test_eval_iterator_in_order_with_partial_batch():
  config = _digits_config(random_flip=True)
  batches = [b['image'] for b in data.create_eval_iterator(config, 'test', 100)]
  assert [len(b) for b in batches] == [100, 100, 97]
  np.testing.assert_array_equal(np.concatenate(batches),
                                data.load_split(config, 'test'))
  assert len(list(data.create_eval_iterator(config, 'test', 100, num=150))) == 2


def test_shard_batch_single_device():
  import jax
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  batch = {'image': np.ones((4, 8, 8, 1), np.float32)}
  out = data.shard_batch(batch, sharding)
  assert out['image'].shape == (4, 8, 8, 1)
  assert out['image'].sharding == sharding


# --------------------------------------------------------------------------
# tfds (mock data, no network) and image folders
# --------------------------------------------------------------------------


def _tfds_config(name, image_size, num_channels, tmp_path, batch_size=8):
  config = config_lib.base_config()
  config.data.name = name
  config.data.image_size = image_size
  config.data.num_channels = num_channels
  config.data.data_dir = str(tmp_path / 'tfds')
  config.training.batch_size = batch_size
  return config


@pytest.mark.parametrize('name,size,channels', [
    ('cifar10', 32, 3), ('mnist', 28, 1), ('mnist', 32, 3)])
def test_tfds_mock(name, size, channels, tmp_path):
  config = _tfds_config(name, size, channels, tmp_path)
  config.data.random_flip = True
  with tfds.testing.mock_data(num_examples=20):
    it = data.create_train_iterator(config, process_index=0, process_count=2)
    images = _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 2)
    resumed = data.create_train_iterator(config, process_index=0, process_count=2)
    resumed.set_state(state)
    np.testing.assert_array_equal(np.stack(_take(resumed, 2)), np.stack(expected))
    test = data.load_split(config, 'test')
    u8 = data.load_uint8(config, 'test', num=3)
  for x in images:
    assert x.shape == (4, size, size, channels) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1
  assert test.shape == (20, size, size, channels)
  assert u8.dtype == np.uint8 and u8.shape == (3, size, size, channels)
  np.testing.assert_allclose(u8 / 127.5 - 1, test[:3], atol=1e-6)


def test_tfds_mock_lsun_non_square_is_cropped(tmp_path):
  config = _tfds_config('lsun/church_outdoor', 16, 3, tmp_path)
  assert data.tfds_name(config) == 'lsun/church_outdoor'
  with tfds.testing.mock_data(num_examples=4):
    x = data.load_split(config, 'train')
  assert x.shape == (4, 16, 16, 3)


def test_celeb_a_hq_tfds_name(tmp_path):
  assert data.tfds_name(_tfds_config('celeb_a_hq', 256, 3, tmp_path)) == 'celeb_a_hq/256'
  assert data.tfds_name(_tfds_config('celeb_a_hq', 100, 3, tmp_path)) == 'celeb_a_hq/128'
  assert data.tfds_name(_tfds_config('celeb_a_hq/512', 256, 3, tmp_path)) == 'celeb_a_hq/512'


def _save(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def test_image_folder(tmp_path):
  root = tmp_path / 'images'
  rng = np.random.default_rng(0)
  for i in range(5):
    _save(str(root / 'sub' / f'{i}.png'),
          rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
  tall = np.zeros((20, 10, 3), np.uint8)   # red top, green centre, blue bottom
  tall[:5, :, 0] = 255
  tall[5:15, :, 1] = 255
  tall[15:, :, 2] = 255
  _save(str(root / 'a_tall.png'), tall)
  _save(str(root / 'gray.jpg'), np.full((8, 8), 128, np.uint8))
  (root / 'notes.txt').write_text('not an image')
  config = _tfds_config('image_folder', 8, 3, tmp_path, batch_size=4)
  config.data.data_dir = str(root)
  paths = data.list_image_files(str(root), 'train')
  assert [os.path.basename(p) for p in paths] == [
      'a_tall.png', 'gray.jpg', '0.png', '1.png', '2.png', '3.png', '4.png']
  x = data.load_split(config, 'test')   # no split folders: every split is all
  assert x.shape == (7, 8, 8, 3) and x.dtype == np.float32
  np.testing.assert_allclose(x[0], np.broadcast_to([-1., 1., -1.], (8, 8, 3)))
  assert np.all(np.abs(x[1] - (128 / 127.5 - 1)) < 0.02)   # gray -> RGB
  it = data.create_train_iterator(config, process_index=0, process_count=1)
  assert next(it)['image'].shape == (4, 8, 8, 3)


def test_image_folder_split_subfolders(tmp_path):
  root = tmp_path / 'images'
  for split, n in [('train', 3), ('test', 2)]:
    for i in range(n):
      _save(str(root / split / f'{i}.png'), np.zeros((8, 8), np.uint8))
  config = _tfds_config('image_folder', 8, 1, tmp_path)
  config.data.data_dir = str(root)
  assert data.load_split(config, 'train').shape == (3, 8, 8, 1)
  assert data.load_split(config, 'test').shape == (2, 8, 8, 1)
  with pytest.raises(data.DatasetNotFoundError, match='validation'):
    data.load_split(config, 'validation')


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def test_missing_tfds_dataset(tmp_path):
  config = _tfds_config('cifar10', 32, 3, tmp_path)
  with pytest.raises(data.DatasetNotFoundError) as info:
    data.create_train_iterator(config, process_index=0, process_count=1)
  assert isinstance(info.value, FileNotFoundError)
  message = str(info.value)
  assert str(tmp_path / 'tfds') in message
  assert 'tfds build cifar10' in message and 'cifar10' in message


def test_unreadable_tfds_dataset_names_its_folder(tmp_path):
  version_dir = tmp_path / 'tfds' / 'cifar10' / '3.0.2'
  version_dir.mkdir(parents=True)
  (version_dir / 'dataset_info.json').write_text('{}')
  config = _tfds_config('cifar10', 32, 3, tmp_path)
  with pytest.raises(data.DatasetNotFoundError, match='array_record') as info:
    data.load_split(config, 'test')
  assert str(version_dir) in str(info.value)


def test_missing_image_folder(tmp_path):
  (tmp_path / 'empty').mkdir()
  config = _tfds_config('image_folder', 8, 3, tmp_path)
  for data_dir in [tmp_path / 'empty', tmp_path / 'absent']:
    config.data.data_dir = str(data_dir)
    with pytest.raises(data.DatasetNotFoundError, match=str(data_dir)):
      data.load_split(config, 'train')


@pytest.mark.parametrize('field,value,kwargs,match', [
    ('data.name', 'imagenet', {}, r"data\.name.*cifar10.*lsun"),
    ('data.name', 'lsun/moon', {}, r"data\.name.*church_outdoor"),
    ('data.image_size', 0, {}, r'data\.image_size'),
    ('data.num_channels', 2, {}, r'data\.num_channels'),
    ('training.batch_size', 10, {'process_count': 3}, r'training\.batch_size.*process'),
    ('training.batch_size', 6, {'num_devices': 4}, r'training\.batch_size.*devices'),
])
def test_bad_config_values(field, value, kwargs, match):
  config = _digits_config()
  section, key = field.split('.')
  config[section][key] = value
  kwargs = {'process_count': 1, 'num_devices': 1, **kwargs}
  with pytest.raises(ValueError, match=match):
    data.validate_data_config(config, **kwargs)


def test_bad_config_rejected_by_iterator():
  config = _digits_config(batch_size=10)
  with pytest.raises(ValueError, match=r'training\.batch_size'):
    data.create_train_iterator(config, process_index=0, process_count=3)
  config = _digits_config(name='mnist_typo')
  with pytest.raises(ValueError, match=r'data\.name'):
    data.create_train_iterator(config, process_index=0, process_count=1)


def test_corrupt_image_files_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
  root = tmp_path / 'images'
  good = [np.full((8, 8, 3), 40 * i, np.uint8) for i in range(3)]
  for i, image in enumerate(good):
    _save(str(root / f'{i}_good.png'), image)
  (root / '0_garbage.png').write_bytes(b'not a png at all')
  _save(str(root / '1_truncated.jpg'), np.full((64, 64, 3), 7, np.uint8))
  whole = (root / '1_truncated.jpg').read_bytes()
  (root / '1_truncated.jpg').write_bytes(whole[:len(whole) // 2])
  config = _tfds_config('image_folder', 8, 3, tmp_path, batch_size=2)
  config.data.data_dir = str(root)
  with caplog.at_level('WARNING'):
    x = data.load_uint8(config, 'train')
  # Sorted: 0_garbage, 0_good, 1_good, 1_truncated, 2_good; bad files read the next readable one.
  assert x.shape == (5, 8, 8, 3)
  np.testing.assert_array_equal(x[[0, 1, 2, 3, 4]],
                                np.stack([good[0], good[0], good[1], good[2], good[2]]))
  warned = [r.getMessage() for r in caplog.records if 'corrupt image file' in r.getMessage()]
  assert len(warned) == 2   # once per file
  assert any(str(root / '0_garbage.png') in m for m in warned)
  assert any(str(root / '1_truncated.jpg') in m for m in warned)


def test_no_decodable_image_is_an_error(tmp_path):
  root = tmp_path / 'images'
  root.mkdir()
  (root / 'a.png').write_bytes(b'garbage')
  config = _tfds_config('image_folder', 8, 3, tmp_path, batch_size=1)
  config.data.data_dir = str(root)
  with pytest.raises(data.DatasetNotFoundError, match='none of the 1 image files'):
    data.load_split(config, 'train')


def test_batch_larger_than_the_split_names_the_field():
  config = config_lib.digits_config()
  config.training.batch_size = 100_000
  with pytest.raises(ValueError, match=r'training.batch_size=100000 is larger than the training '
                                       r"split of data.name='digits' \('train': 1500 images\)"):
    data.create_train_iterator(config, process_index=0, process_count=1)
  config.training.batch_size = 1600   # 800 per host, more than its 750 images
  with pytest.raises(ValueError, match='over 2 hosts'):
    data.create_train_iterator(config, process_index=0, process_count=2)
