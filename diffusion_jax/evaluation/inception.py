"""The FID Inception network in Flax: InceptionV3 as in TF's "2015-12-05" graph.

The Fréchet Inception Distance (Heusel et al. 2017, "GANs Trained by a Two
Time-Scale Update Rule Converge to a Local Nash Equilibrium") and the
Inception Score (Salimans et al. 2016, "Improved Techniques for Training GANs")
are defined with one specific network: the TensorFlow Inception graph
``inception-2015-12-05.tgz`` (``classify_image_graph_def.pb``) used by the
reference code of both papers (TTUR ``fid.py``, openai ``improved-gan``).
pytorch-fid (``mseitzer/pytorch-fid``, ``src/pytorch_fid/inception.py``)
ported that graph to PyTorch as torchvision's ``Inception3`` patched with
``FIDInceptionA/C/E_1/E_2``; this module reproduces that port layer by layer,
with the same submodule names, so that pytorch-fid's weight file
``pt_inception-2015-12-05-6726825d.pth`` maps onto it one to one.

How the FID graph differs from torchvision's ImageNet InceptionV3:

- 1008 output classes (the 2015 graph's softmax), no auxiliary classifier;
- the 3x3 average pools inside the A, C and first E blocks (``Mixed_5b-d``,
  ``Mixed_6b-e``, ``Mixed_7b``) exclude the zero padding from the average
  (TF ``avg_pool`` 'SAME'; ``count_include_pad=False`` in PyTorch);
- the pool branch of the last E block (``Mixed_7c``) uses a 3x3 *max* pool
  (stride 1, 'SAME') instead of an average pool;
- every convolution is followed by batch norm with epsilon 1e-3 and a ReLU.

Input convention: ``InceptionV3FID.input_range`` chooses how pixels come in.

- ``'0_255'`` (the default, the FID convention): images in [0, 255], uint8
  or float, e.g. the uint8 samples this project writes to ``.npz``;
- ``'-1_1'``: float images in [-1, 1], the project's convention for model
  inputs and outputs (``docs/design.md``).

Either way the images are NHWC with 3 channels (1 channel is repeated to 3),
bilinearly resized to 299x299 (half-pixel centres, no antialiasing: PyTorch's
``F.interpolate(mode='bilinear', align_corners=False)`` as in pytorch-fid) and
mapped to [-1, 1] as ``x / 127.5 - 1`` (pytorch-fid's ``2 * (x / 255) - 1``).
TTUR feeds the TF graph [0, 255] and the graph computes ``(x - 128) / 128``
after its own resize (TF1 ``resize_bilinear`` without half-pixel centres);
pytorch-fid documents the resulting small differences from TTUR's FIDs.

Outputs: ``(pool3, logits)`` with ``pool3`` the 2048-d global average pool of
``Mixed_7c`` (TF ``pool_3:0``, the FID features) and ``logits`` the 1008-way
``softmax/logits`` of the graph (with the fc bias; note that the original
Inception Score code multiplies pool3 by the fc weight matrix without the
bias).

Weights: :mod:`diffusion_jax.evaluation.inception_weights` loads them from a
local file (nothing is downloaded) or draws random ones for tests.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INCEPTION_SIZE = 299
NUM_FEATURES = 2048
NUM_CLASSES = 1008
BN_EPSILON = 1e-3

Variables = Mapping[str, Any]

# He-normal initialisation keeps activations O(1) through the ~95 layers when
# the network is run with random weights (tests); real use loads weights.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')


def _pad(padding: int | tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
  """PyTorch's symmetric (ph, pw) padding as Flax explicit padding."""
  ph, pw = (padding, padding) if isinstance(padding, int) else padding
  return ((ph, ph), (pw, pw))


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm(eps=1e-3, running statistics) -> ReLU.

  torchvision's ``BasicConv2d``; the submodule names ``conv`` and ``bn``
  match the PyTorch state dict.
  """
  features: int
  kernel_size: int | tuple[int, int]
  strides: int = 1
  padding: int | tuple[int, int] = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    k = (k, k) if isinstance(k, int) else tuple(k)
    x = nn.Conv(self.features, k, strides=(self.strides, self.strides),
                padding=_pad(self.padding), use_bias=False,
                kernel_init=_conv_init, dtype=self.dtype, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON,
                     momentum=0.9, dtype=self.dtype, name='bn')(x)
    return nn.relu(x)


def avg_pool_same_exclude_pad(x: jax.Array) -> jax.Array:
  """3x3/stride 1 average pool, 'SAME' padding that is excluded from the mean.

  TF's ``avg_pool`` (``count_include_pad=False`` in PyTorch); the FID graph's
  A, C and first E blocks use it (pytorch-fid's ``FIDInception*`` patch).
  """
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def max_pool_same(x: jax.Array) -> jax.Array:
  """3x3/stride 1 max pool with 'SAME' (-inf) padding: ``Mixed_7c``'s pool."""
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class FIDInceptionA(nn.Module):
  """InceptionA (35x35) with the padding-excluding average pool."""
  pool_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: BasicConv2d(*a, dtype=self.dtype, **k)
    b1 = conv(64, 1, name='branch1x1')(x)
    b5 = conv(48, 1, name='branch5x5_1')(x)
    b5 = conv(64, 5, padding=2, name='branch5x5_2')(b5)
    b3 = conv(64, 1, name='branch3x3dbl_1')(x)
    b3 = conv(96, 3, padding=1, name='branch3x3dbl_2')(b3)
    b3 = conv(96, 3, padding=1, name='branch3x3dbl_3')(b3)
    bp = conv(self.pool_features, 1, name='branch_pool')(
        avg_pool_same_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """InceptionB (35x35 -> 17x17 reduction, ``Mixed_6a``); as in torchvision."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: BasicConv2d(*a, dtype=self.dtype, **k)
    b3 = conv(384, 3, strides=2, name='branch3x3')(x)
    bd = conv(64, 1, name='branch3x3dbl_1')(x)
    bd = conv(96, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = conv(96, 3, strides=2, name='branch3x3dbl_3')(bd)
    bp = _max_pool_3x3_s2(x)
    return jnp.concatenate([b3, bd, bp], axis=-1)


class FIDInceptionC(nn.Module):
  """InceptionC (17x17, factorised 7x7) with the padding-excluding average pool."""
  channels_7x7: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: BasicConv2d(*a, dtype=self.dtype, **k)
    c7 = self.channels_7x7
    b1 = conv(192, 1, name='branch1x1')(x)
    b7 = conv(c7, 1, name='branch7x7_1')(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = conv(c7, 1, name='branch7x7dbl_1')(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = conv(192, 1, name='branch_pool')(avg_pool_same_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """InceptionD (17x17 -> 8x8 reduction, ``Mixed_7a``); as in torchvision."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: BasicConv2d(*a, dtype=self.dtype, **k)
    b3 = conv(192, 1, name='branch3x3_1')(x)
    b3 = conv(320, 3, strides=2, name='branch3x3_2')(b3)
    b7 = conv(192, 1, name='branch7x7x3_1')(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = conv(192, 3, strides=2, name='branch7x7x3_4')(b7)
    bp = _max_pool_3x3_s2(x)
    return jnp.concatenate([b3, b7, bp], axis=-1)


class FIDInceptionE(nn.Module):
  """InceptionE (8x8, expanded filter bank).

  ``pool='avg'``: ``FIDInceptionE_1`` (``Mixed_7b``, padding-excluding
  average pool); ``pool='max'``: ``FIDInceptionE_2`` (``Mixed_7c``, max pool,
  a quirk of the 2015 graph kept for comparable FIDs).
  """
  pool: str = 'avg'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.pool not in ('avg', 'max'):
      raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
    conv = lambda *a, **k: BasicConv2d(*a, dtype=self.dtype, **k)
    b1 = conv(320, 1, name='branch1x1')(x)
    b3 = conv(384, 1, name='branch3x3_1')(x)
    b3 = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
        conv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3)], axis=-1)
    bd = conv(448, 1, name='branch3x3dbl_1')(x)
    bd = conv(384, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
        conv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd)], axis=-1)
    pooled = (avg_pool_same_exclude_pad(x) if self.pool == 'avg'
              else max_pool_same(x))
    bp = conv(192, 1, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def preprocess_images(images: jax.Array, input_range: str = '0_255',
                      resize: bool = True) -> jax.Array:
  """NHWC images -> float32 in [-1, 1], 3 channels, bilinearly resized to 299.

  Args:
    images: ``[N, H, W, C]`` with C in {1, 3}; uint8 or float.
    input_range: ``'0_255'`` (FID convention) or ``'-1_1'`` (project convention).
    resize: resize to 299x299 (pytorch-fid's ``resize_input=True``).
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'expected NHWC images with 1 or 3 channels, got shape '
                     f'{images.shape}')
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if resize and x.shape[1:3] != (INCEPTION_SIZE, INCEPTION_SIZE):
    # Half-pixel centres, no antialias: F.interpolate(bilinear, align_corners=False).
    x = jax.image.resize(x, (x.shape[0], INCEPTION_SIZE, INCEPTION_SIZE, 3),
                         method='bilinear', antialias=False)
  if input_range == '0_255':
    x = x / 127.5 - 1.0
  elif input_range != '-1_1':
    raise ValueError(f"input_range must be '0_255' or '-1_1', got {input_range!r}")
  return x


class InceptionV3FID(nn.Module):
  """InceptionV3 as in the TF 2015-12-05 FID graph (pytorch-fid's port).

  Attributes:
    input_range: ``'0_255'`` (default; uint8-range images, the FID
      convention) or ``'-1_1'`` (float images in [-1, 1]).
    resize_input: bilinearly resize inputs to 299x299 (default True). Without
      it the network is fully convolutional down to pool3 and accepts any
      size >= 75x75.
    dtype: compute dtype (parameters are float32).

  Call: ``module.apply(variables, images) -> (pool3 [N, 2048], logits [N, 1008])``.
  BatchNorm always uses the stored running statistics (the network is only
  used for inference); ``variables`` is ``{'params', 'batch_stats'}``.
  """
  input_range: str = '0_255'
  resize_input: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = preprocess_images(images, self.input_range, self.resize_input)
    x = x.astype(self.dtype)
    conv = lambda *a, **k: BasicConv2d(*a, dtype=self.dtype, **k)
    x = conv(32, 3, strides=2, name='Conv2d_1a_3x3')(x)       # 149x149x32
    x = conv(32, 3, name='Conv2d_2a_3x3')(x)                  # 147x147x32
    x = conv(64, 3, padding=1, name='Conv2d_2b_3x3')(x)       # 147x147x64
    x = _max_pool_3x3_s2(x)                                   # 73x73x64
    x = conv(80, 1, name='Conv2d_3b_1x1')(x)                  # 73x73x80
    x = conv(192, 3, name='Conv2d_4a_3x3')(x)                 # 71x71x192
    x = _max_pool_3x3_s2(x)                                   # 35x35x192
    x = FIDInceptionA(32, dtype=self.dtype, name='Mixed_5b')(x)   # 35x35x256
    x = FIDInceptionA(64, dtype=self.dtype, name='Mixed_5c')(x)   # 35x35x288
    x = FIDInceptionA(64, dtype=self.dtype, name='Mixed_5d')(x)   # 35x35x288
    x = InceptionB(dtype=self.dtype, name='Mixed_6a')(x)          # 17x17x768
    x = FIDInceptionC(128, dtype=self.dtype, name='Mixed_6b')(x)
    x = FIDInceptionC(160, dtype=self.dtype, name='Mixed_6c')(x)
    x = FIDInceptionC(160, dtype=self.dtype, name='Mixed_6d')(x)
    x = FIDInceptionC(192, dtype=self.dtype, name='Mixed_6e')(x)  # 17x17x768
    x = InceptionD(dtype=self.dtype, name='Mixed_7a')(x)          # 8x8x1280
    x = FIDInceptionE('avg', dtype=self.dtype, name='Mixed_7b')(x)  # 8x8x2048
    x = FIDInceptionE('max', dtype=self.dtype, name='Mixed_7c')(x)  # 8x8x2048
    pool3 = jnp.mean(x.astype(jnp.float32), axis=(1, 2))         # N x 2048
    logits = nn.Dense(NUM_CLASSES, dtype=jnp.float32, name='fc')(pool3)
    return pool3, logits


# ----------------------------------------------------------------------------
# Batched feature extraction.
# ----------------------------------------------------------------------------

def make_inception_fn(variables: Variables, *, input_range: str = '0_255',
                      dtype: Any = jnp.float32
                      ) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
  """A jitted ``images -> (pool3, logits)`` bound to ``variables``.

  The weights are passed to the compiled function as arguments (not baked in
  as ~95 MB of constants); one compilation per input shape.
  """
  model = InceptionV3FID(input_range=input_range, dtype=dtype)
  variables = jax.tree_util.tree_map(jnp.asarray, variables)
  apply = jax.jit(model.apply)

  def fn(images):
    return apply(variables, images)
  return fn


def inception_features(variables_or_fn: Variables | Callable,
                       images: np.ndarray | Iterable[np.ndarray], *,
                       batch_size: int = 100, input_range: str = '0_255'
                       ) -> tuple[np.ndarray, np.ndarray]:
  """pool3 features ``[N, 2048]`` and logits ``[N, 1008]`` of many images.

  Args:
    variables_or_fn: Inception variables, or a function from
      :func:`make_inception_fn` (reused to avoid recompiling).
    images: an ``[N, H, W, C]`` array (split into ``batch_size`` chunks; the
      last chunk is padded so that one shape compiles), or an iterable of
      batches.
    batch_size: images per forward pass when ``images`` is an array.
    input_range: as in :class:`InceptionV3FID` (ignored when a function is given).
  """
  fn = (variables_or_fn if callable(variables_or_fn)
        else make_inception_fn(variables_or_fn, input_range=input_range))
  def array_batches(x):
    n = x.shape[0]
    for i in range(0, n, batch_size):
      batch = np.asarray(x[i:i + batch_size])
      k = batch.shape[0]
      if k < batch_size and n > batch_size:   # pad: no recompilation
        batch = np.concatenate(
            [batch, np.repeat(batch[-1:], batch_size - k, axis=0)], axis=0)
      yield batch, k

  if isinstance(images, (np.ndarray, jax.Array)):
    batches = array_batches(images)
  else:
    batches = ((np.asarray(b), len(b)) for b in images)
  feats, logits = [], []
  for batch, k in batches:
    f, l = fn(batch)
    feats.append(np.asarray(f[:k], np.float64))
    logits.append(np.asarray(l[:k], np.float64))
  return np.concatenate(feats, 0), np.concatenate(logits, 0)
