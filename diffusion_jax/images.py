"""Converting model images to 8-bit pixels and saving PNG grids (Pillow)."""

import io
import math

import numpy as np
from PIL import Image

from diffusion_jax import storage


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8 in [0, 255], rounding as the DDPM reference code does."""
  x = np.asarray(images, np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images, *, nrow: int | None = None, padding: int = 1, pad_value: int = 255) -> np.ndarray:
  """Tiles uint8 images [N, H, W, C] into one [rows*H', cols*W', C] array."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = to_uint8(images)
  n, h, w, c = images.shape
  ncol = nrow or max(1, int(math.ceil(math.sqrt(n))))
  nrows = int(math.ceil(n / ncol))
  grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value,
                 np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, ncol)
    y, x = padding + r * (h + padding), padding + col * (w + padding)
    grid[y:y + h, x:x + w] = img
  return grid


def save_grid(images, path, *, nrow: int | None = None, scale: int | None = None):
  """Saves images ([-1, 1] floats or uint8, NHWC) as a PNG grid; small images are upscaled.

  ``path`` is a string or ``epath.Path`` (local or ``gs://...``), written through
  epath under a temporary name, then renamed (:func:`storage.write_file`); its
  folder is created if needed. Returns ``path`` as given.
  """
  grid = make_grid(images, nrow=nrow)
  if scale is None:
    scale = max(1, 512 // max(grid.shape[0], 1))
  img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  png = io.BytesIO()
  img.save(png, format='PNG')
  storage.write_file(path, png.getvalue())
  return path
